"""Copies between host and device (token factors in the model's dtype, factors as stored), counted, through pinned
buffers sized once per run.

What goes onto the device (:meth:`Transfers.to_device`), on the copy stream of :mod:`if_query.score.streams`:
- a slab of a store in RAM that the plan page-locks (:meth:`Transfers.register_store`, up to the plan's limit):
  copied directly, no host copy (``direct``); its token factors also come off the device straight into it
  (:meth:`Transfers.to_host_into`);
- a :class:`~if_query.kron.factors.FileRange` (a factor file's tensor, a spilled store's slab): read with
  ``os.pread`` straight into one of two pinned *bounce slots* (the kernel's copy, whatever OpenMP's thread count),
  then copied; larger ranges go in slot-sized pieces, the slots alternating (before a slot is refilled the host
  waits for the copy that read it, an event of the copy stream);
- any other host tensor (a store over the plan's page-lock limit): through the same slots by a host copy, a
  ``memcpy`` whatever OpenMP's thread count (:func:`~if_query.score.store.host_copy`).

What comes off it (:meth:`Transfers.to_host`): a batch's token factors, all at once into one pinned landing buffer
with one synchronisation, then into an unlocked store by a ``memcpy``.

The buffers are sized once (``bounce_bytes`` per slot, ``landing_bytes``: the run plan's,
:class:`~if_query.plan.estimates.Pinned`) and never grown: a batch larger than the landing buffer is an error of the
plan. On CUDA they are registered with ``cudaHostRegister`` at their exact size (the caching host allocator would
round each up to a power of two and keep it) and unregistered by :meth:`Transfers.close`. Nothing is converted on the
host: float32 is made on the device. On the CPU the "device" is the host: nothing is copied (tests set ``staged`` to
run the same path with unpinned buffers).

What ``--refine-steps`` moves (:mod:`if_query.score.refine`) goes through :meth:`Transfers.put` and
:meth:`Transfers.take` (plain synchronous copies of float32 vectors on the compute stream: refinement is compute-bound)
and, for its factors and the queries' slabs, :meth:`Transfers.to_device`; :meth:`Transfers.count` counts a copy made
in place (the engine's refined queries copied into their rows).

Counted: bytes onto the device by kind (``moved``: ``token factors``, ``factors``, ``refine``: everything refinement
moves, factors and slabs included), bytes off it by kind (``moved_off``: ``token factors``, ``refine``;
``to_host_bytes`` their sum), of both those straight from or into page-locked stores (``direct``), the most store bytes
page-locked at once (``page_locked_peak``) and the pinned buffers held (``pinned_bytes``): the plan line,
``if-query plan`` and ``run.json`` report the same counts. What page-locking gains (the host copies gone, the copy
engine reading the store) is measured only on a GPU (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping

import torch

from if_query.errors import RunError
from if_query.kron.factors import FileRange
from if_query.plan.sizes import STAGING_BYTES, human_bytes
from if_query.score.store import host_copy, host_pages
from if_query.score.streams import Streams, streams_for

ALIGNMENT = 64  # bytes: where each tensor starts in the device-to-host landing buffer
TOKEN_FACTORS, FACTORS, REFINE = "token factors", "factors", "refine"


def read_range(source: FileRange, into: torch.Tensor, start: int = 0) -> None:
    """Bytes ``start`` to ``start + into.numel()`` of ``source`` into the uint8 tensor ``into`` (``os.preadv``: the
    kernel copies the file's pages, no thread pool involved)."""
    view = memoryview(into.numpy()).cast("B")
    done = 0
    descriptor = source.fd if source.fd >= 0 else os.open(source.path, os.O_RDONLY)
    try:
        while done < len(view):
            count = os.preadv(descriptor, [view[done:]], source.offset + start + done)
            if count <= 0:
                raise RunError(f"{source.path}: ended before byte {source.offset + start + done}")
            done += count
    finally:
        if source.fd < 0:
            os.close(descriptor)


class Transfers:
    """Host <-> ``device`` copies through pinned buffers (CUDA) or none (CPU); counts the bytes."""

    def __init__(self, device: torch.device, bounce_bytes: int = STAGING_BYTES, staged: bool | None = None,
                 landing_bytes: int | None = None, streams: Streams | None = None):
        """``bounce_bytes``: each of the two bounce slots; ``landing_bytes``: the landing buffer (None: the first
        batch's size, for callers without a plan); ``staged`` (default: on CUDA) copies through the buffers;
        tests set it on the CPU, where the buffers are not pinned, to run the same path."""
        self.device = device
        self.copies = device.type == "cuda" if staged is None else staged
        self.pinned = self.copies and device.type == "cuda"
        self.streams = streams or streams_for(device)
        self.bounce_bytes = bounce_bytes
        self.landing_bytes = landing_bytes
        self.moved = {TOKEN_FACTORS: 0, FACTORS: 0, REFINE: 0}
        self.moved_off = {TOKEN_FACTORS: 0, REFINE: 0}
        self._slots: list[torch.Tensor] = []  # two uint8 bounce slots, host to device
        self._events: list = [None, None]  # each slot's last copy (CUDA events)
        self._slot = 0
        self._landing: torch.Tensor | None = None  # one uint8 buffer, device to host
        self._registered: list[torch.Tensor] = []
        self._stores: dict[int, tuple[int, int, torch.Tensor]] = {}  # page-locked stores: id -> (start, end, memory)
        self.direct = {"to device": 0, "from device": 0}  # bytes copied straight from or into a page-locked store
        self.page_locked_peak = 0  # the most store bytes page-locked at once (the plan's page_locked_bytes)

    @property
    def to_device_bytes(self) -> int:
        return sum(self.moved.values())

    @property
    def to_host_bytes(self) -> int:
        return sum(self.moved_off.values())

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the buffers held (pinned on CUDA)."""
        return sum(t.numel() for t in self._slots) + (0 if self._landing is None else self._landing.numel())

    def _allocate(self, size: int) -> torch.Tensor:
        buffer = host_pages(size, torch.uint8)  # pages of its own: see host_pages
        if self.pinned and size:
            code = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), size, 0)
            if int(code) != 0:
                raise RunError(f"could not pin {size} bytes of host memory for copies (cudaHostRegister: {code})")
            self._registered.append(buffer)
        return buffer

    def _release(self, buffer: torch.Tensor | None) -> None:
        if buffer is not None and any(b is buffer for b in self._registered):
            self.streams.land("release")
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
            self._registered = [b for b in self._registered if b is not buffer]

    def close(self) -> None:
        """Unregister and drop the buffers (the end of a run); a later copy allocates them again."""
        self.streams.land("close")
        for buffer in self._registered:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        for key in list(self._stores):
            self._unregister_store(key)
        self._registered, self._slots, self._landing, self._events = [], [], None, [None, None]

    def register_store(self, memory: torch.Tensor, owner: object) -> None:
        """Page-lock a store's memory (``memory``: its contiguous host tensor, the plan's decision) while ``owner``
        (the store) lives, so that its slabs go to the device and its token factors come off it with no host copy.
        On CUDA ``cudaHostRegister``; on the CPU's staged path (tests) only recorded, the copies taking the same
        branch. Unregistered when ``owner`` is collected, or by :meth:`close`."""
        if not self.copies or not memory.numel():
            return
        size = memory.numel() * memory.element_size()
        if self.pinned:
            code = torch.cuda.cudart().cudaHostRegister(memory.data_ptr(), size, 0)
            if int(code) != 0:  # no fallback: a failed cudaHostRegister leaves CUDA's last error set, which the
                # next kernel launch would raise as its own
                raise RunError(f"could not page-lock {human_bytes(size)} of token factors in RAM (cudaHostRegister: "
                               f"{code})")
        key = id(memory)
        self._stores[key] = (memory.data_ptr(), memory.data_ptr() + size, memory)
        self.page_locked_peak = max(self.page_locked_peak, sum(high - low for low, high, _ in self._stores.values()))
        weakref.finalize(owner, self._unregister_store, key)

    def _unregister_store(self, key: int) -> None:
        entry = self._stores.pop(key, None)
        if entry is not None and self.pinned:
            torch.cuda.synchronize(self.device)  # no copy on any stream may still read or write those pages
            torch.cuda.cudart().cudaHostUnregister(entry[0])

    def page_locked(self, tensor: torch.Tensor) -> bool:
        """Whether the contiguous host ``tensor`` lies in a page-locked store (the device copies it directly)."""
        if not self._stores or not tensor.is_contiguous() or tensor.device.type != "cpu":
            return False
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        return any(low <= start and end <= high for low, high, _ in self._stores.values())

    def _mark(self):
        """An event after the copies just issued, on ``self.device``'s current stream (the copy stream while
        copying); None on the CPU, whose copies are done when issued."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def to_device(self, source: torch.Tensor | FileRange, what: str = TOKEN_FACTORS) -> torch.Tensor:
        """``source`` on the device in its own dtype (call inside ``streams.copying``); on the CPU a host tensor is
        read in place and a file range read into a new tensor (counted as nothing moved)."""
        if not self.copies:
            if isinstance(source, FileRange):
                result = torch.empty(source.shape, dtype=source.dtype)
                read_range(source, result.view(-1).view(torch.uint8))
                return result
            return source
        shape, dtype = (source.shape, source.dtype)
        result = torch.empty(shape, dtype=dtype, device=self.device)
        target = result.view(-1).view(torch.uint8)  # (bytes,)
        if isinstance(source, torch.Tensor) and self.page_locked(source):
            target.copy_(source.view(-1).view(torch.uint8), non_blocking=self.pinned)  # no host copy
            self.direct["to device"] += target.numel()
        else:
            self._bounce(source, target)
        self.moved[what] += target.numel()
        return self.streams.hand_over(result)

    def _bounce(self, source: torch.Tensor | FileRange, target: torch.Tensor) -> None:
        """``source``'s bytes into ``target`` through the two bounce slots, in slot-sized pieces."""
        if not self._slots:
            self._slots = [self._allocate(self.bounce_bytes) for _ in range(2)]
        flat = None if isinstance(source, FileRange) else source.contiguous().view(-1).view(torch.uint8)
        for start in range(0, target.numel(), self.bounce_bytes):
            stop = min(start + self.bounce_bytes, target.numel())
            slot = self._slot
            self._slot = 1 - slot
            self.streams.reuse(self._events[slot])  # the slot's previous piece has left it
            staged = self._slots[slot][: stop - start]
            if flat is None:
                read_range(source, staged, start)
            else:
                host_copy(staged, flat[start:stop])  # pageable RAM: a memcpy, whatever OpenMP's threads
            target[start:stop].copy_(staged, non_blocking=self.pinned)
            self._events[slot] = self._mark()

    def to_host_into(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Each device tensor of ``pairs`` (host place, device tensor) copied straight into its place in a
        page-locked store (no landing buffer, no host copy), with one synchronisation for all of them."""
        for place, tensor in pairs:
            place.copy_(tensor, non_blocking=self.pinned)
        self.streams.land("batch")
        size = sum(t.numel() * t.element_size() for _, t in pairs)
        self.moved_off[TOKEN_FACTORS] += size
        self.direct["from device"] += size

    def to_host(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host copies of device ``tensors`` (views of one landing buffer, valid until the next call), with
        one synchronisation for all of them; on the CPU, the tensors themselves."""
        if not self.copies:
            return dict(tensors)
        sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
        starts, total = {}, 0
        for name, size in sizes.items():
            starts[name] = total
            total += -(-size // ALIGNMENT) * ALIGNMENT  # every view starts aligned for any dtype
        if self._landing is None or (self.landing_bytes is None and total > self._landing.numel()):
            self._release(self._landing)  # without a plan: sized to the largest batch so far
            self._landing = self._allocate(max(total, self.landing_bytes or 0))
        if total > self._landing.numel():
            raise RunError(f"a batch's token factors ({total} bytes) exceed the landing buffer the plan sized "
                           f"({self._landing.numel()} bytes)")
        landed = {}
        for name, tensor in tensors.items():
            raw = self._landing[starts[name] : starts[name] + sizes[name]]
            landed[name] = raw.view(tensor.dtype).view(tensor.shape)
            landed[name].copy_(tensor, non_blocking=self.pinned)
        self.streams.land("batch")
        self.moved_off[TOKEN_FACTORS] += sum(sizes.values())
        return landed

    def count(self, size: int, what: str = REFINE, onto: bool = True) -> None:
        """``size`` bytes of kind ``what`` copied onto the device (``onto``) or off it by the caller, in place (none
        on the CPU, where nothing is copied)."""
        if self.copies:
            (self.moved if onto else self.moved_off)[what] += size

    def put(self, tensor: torch.Tensor, what: str = REFINE) -> torch.Tensor:
        """A host tensor on the device, copied synchronously on the current stream (refinement's vectors); on the
        CPU the tensor itself."""
        self.count(tensor.numel() * tensor.element_size(), what)
        return tensor.to(self.device)

    def take(self, tensor: torch.Tensor, what: str = REFINE) -> torch.Tensor:
        """A device tensor on the host (``.cpu()``, synchronous); on the CPU the tensor itself."""
        self.count(tensor.numel() * tensor.element_size(), what, onto=False)
        return tensor.cpu()
