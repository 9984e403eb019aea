"""The token factors of a set of examples: every example's layer inputs ``A`` (T, in) and output gradients ``G``
(T, out) per tracked module, in RAM or, past a budget, in a memory-mapped spill file (filled by
:func:`if_query.score.capture.capture_token_factors`, read by the engine module by module)."""

from __future__ import annotations

import mmap
import os
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from if_query.kron.factors import FileRange


class TokenFactorStore:
    """Layer inputs and output gradients of every example and tracked module.

    For module ``m`` and example ``i`` (of ``lengths[i]`` tokens), ``inputs(m, i)`` is (T_i, in) and
    ``output_grads(m, i)`` is (T_i, out), in ``dtype``. Each module's rows are contiguous: its slabs
    ``module_inputs(m)`` (tokens, in) and ``module_output_grads(m)`` (tokens, out) are what the engine copies
    to the device, one module at a time. Modules that see the same input tensor (``shared_inputs``: {module:
    the earlier module whose input it sees}, e.g. up_proj -> gate_proj, k_proj -> q_proj) share one inputs slab.
    Stored in RAM when they fit ``host_budget`` bytes, otherwise in a memory-mapped file in ``spill_dir`` (deleted
    at once: nothing is left behind; its descriptor stays open while the store lives, so that a slab is read with
    ``os.pread`` straight into a pinned buffer: :meth:`slab_source`).
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], lengths: Sequence[int], dtype: torch.dtype,
                 host_budget: int, spill_dir: str | Path | None = None, shared_inputs: dict[str, str] | None = None):
        self.shapes = dict(shapes)  # name -> (out, in)
        self.input_of = {name: (shared_inputs or {}).get(name, name) for name in self.shapes}  # whose slab
        self.lengths = list(lengths)
        self.offsets = [0]
        for length in self.lengths[:-1]:
            self.offsets.append(self.offsets[-1] + length)
        self.tokens = sum(self.lengths)
        self.dtype = dtype
        row = sum(out + (inp if self.input_of[name] == name else 0) for name, (out, inp) in self.shapes.items())
        self.nbytes = self.tokens * row * torch.empty(0, dtype=dtype).element_size()
        self.spilled = self.nbytes > host_budget
        if self.spilled:
            directory = Path(spill_dir or tempfile.gettempdir())
            directory.mkdir(parents=True, exist_ok=True)
            handle, path = tempfile.mkstemp(dir=directory, prefix=".if-query-token-factors.", suffix=".bin")
            try:
                os.ftruncate(handle, self.nbytes)
                flat = torch.from_file(path, shared=True, size=self.tokens * row, dtype=dtype)
            except BaseException:
                os.close(handle)
                raise
            finally:
                os.unlink(path)  # the mapping stays valid; the file vanishes with the process
            self.spill_path, self._fd = path, handle
            weakref.finalize(self, os.close, handle)
        else:
            flat = host_pages(self.tokens * row, dtype)
            self.spill_path, self._fd = None, -1
        self.flat = flat  # every slab, one after the other: what a device may page-lock (in RAM) and copy from
        self._inputs: dict[str, torch.Tensor] = {}
        self._output_grads: dict[str, torch.Tensor] = {}
        self._starts: dict[tuple[str, str], int] = {}  # (kind, module) -> the slab's first element
        start = 0
        for name, (out, inp) in self.shapes.items():
            if self.input_of[name] == name:
                self._starts["inputs", name] = start
                self._inputs[name] = flat[start : start + self.tokens * inp].view(self.tokens, inp)  # (tokens, in)
                start += self.tokens * inp
            self._starts["output_grads", name] = start
            self._output_grads[name] = flat[start : start + self.tokens * out].view(self.tokens, out)  # (tokens, out)
            start += self.tokens * out

    @property
    def input_groups(self) -> list[str]:
        """The modules that own an inputs slab (the others read one of these)."""
        return list(self._inputs)

    def rows(self, example: int) -> slice:
        return slice(self.offsets[example], self.offsets[example] + self.lengths[example])

    def module_inputs(self, module: str) -> torch.Tensor:
        return self._inputs[self.input_of[module]]

    def module_output_grads(self, module: str) -> torch.Tensor:
        return self._output_grads[module]

    def slab_source(self, kind: str, module: str) -> torch.Tensor | FileRange:
        """What the device copies a slab from (``kind``: ``inputs`` or ``output_grads``): the RAM slab itself, or
        for a spilled store its range of the spill file (read straight into a pinned buffer, not through the
        mapping's pages by a host copy)."""
        slab = self.module_inputs(module) if kind == "inputs" else self.module_output_grads(module)
        if not self.spilled:
            return slab
        owner = self.input_of[module] if kind == "inputs" else module
        itemsize = slab.element_size()
        return FileRange(self.spill_path, self._starts[kind, owner] * itemsize, slab.numel() * itemsize, slab.dtype,
                         tuple(slab.shape), self._fd)

    def inputs(self, module: str, example: int) -> torch.Tensor:
        return self.module_inputs(module)[self.rows(example)]

    def output_grads(self, module: str, example: int) -> torch.Tensor:
        return self._output_grads[module][self.rows(example)]

    def places(self, example: int) -> dict[str, torch.Tensor]:
        """Where one example's token factors go: ``"inputs:<group>"`` (T_i, in) and ``"output_grads:<module>"``
        (T_i, out), views of the store (contiguous: a device copies into them directly when the store's pages are
        page-locked)."""
        rows = self.rows(example)
        return {**{f"inputs:{name}": slab[rows] for name, slab in self._inputs.items()},
                **{f"output_grads:{name}": slab[rows] for name, slab in self._output_grads.items()}}

    def put(self, example: int, landed: dict[str, torch.Tensor]) -> None:
        """Copy one example's host copies into the store: ``landed`` holds ``"inputs:<group>"`` (T_i, in) and
        ``"output_grads:<module>"`` (T_i, out); a plain memory copy (:func:`host_copy`), whatever OpenMP's thread
        count."""
        for key, place in self.places(example).items():
            host_copy(place, landed[key])


def host_pages(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor in pages of its own (an anonymous mapping: page-aligned, shared with no other allocation), so
    that ``cudaHostRegister`` may page-lock it whatever else is locked: two registrations that share a page are
    refused (CUDA error 712), which allocations from the heap can do."""
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if not nbytes:
        return torch.empty(numel, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype)  # the tensor holds the mapping


def host_copy(target: torch.Tensor, source: torch.Tensor) -> None:
    """``source`` into ``target`` on the host: for contiguous tensors of one dtype numpy's ``copyto`` of their bytes
    (one ``memcpy``, on this thread: its speed does not depend on OpenMP's thread count, as a torch copy's does);
    any other pair through torch."""
    if (target.dtype == source.dtype and target.shape == source.shape and target.is_contiguous()
            and source.is_contiguous() and source.device.type == "cpu" and target.numel()):
        np.copyto(target.reshape(-1).view(torch.uint8).numpy(), source.reshape(-1).view(torch.uint8).numpy())
    else:
        target.copy_(source)
