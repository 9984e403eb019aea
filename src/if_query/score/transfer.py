"""Copies between host and device (token factors in the model's dtype, factors as stored), counted, through pinned
buffers sized once per run.

What goes onto the device (:meth:`Transfers.to_device`), on the copy stream of :mod:`if_query.score.streams`:
- a host tensor whose pages the device can copy from (pinned or registered): copied directly, no host copy;
- a :class:`~if_query.kron.factors.FileRange` (a factor file's tensor, a spilled store's slab): read with
  ``os.pread`` straight into one of two pinned *bounce slots* (the kernel's copy, whatever OpenMP's thread count),
  then copied; larger ranges go in slot-sized pieces, the slots alternating (before a slot is refilled the host
  waits for the copy that read it, an event of the copy stream);
- any other host tensor (pageable RAM: the CPU's tests of this path): through the same slots by a host copy.

What comes off it (:meth:`Transfers.to_host`): a batch's token factors, all at once into one pinned landing buffer
with one synchronisation.

The buffers are sized once (``bounce_bytes`` per slot, ``landing_bytes``: the run plan's,
:class:`~if_query.plan.estimates.Pinned`) and never grown: a batch larger than the landing buffer is an error of the
plan. On CUDA they are registered with ``cudaHostRegister`` at their exact size (the caching host allocator would
round each up to a power of two and keep it) and unregistered by :meth:`Transfers.close`. Nothing is converted on the
host: float32 is made on the device. On the CPU the "device" is the host: nothing is copied (tests set ``staged`` to
run the same path with unpinned buffers).

Counted: bytes onto the device by kind (``moved``: ``token factors``, ``factors``), bytes off it
(``to_host_bytes``), and the pinned bytes held (``pinned_bytes``): the plan line, ``if-query plan`` and ``run.json``
report the same counts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from if_query.errors import RunError
from if_query.kron.factors import FileRange
from if_query.plan.sizes import STAGING_BYTES
from if_query.score.streams import Streams, streams_for

ALIGNMENT = 64  # bytes: where each tensor starts in the device-to-host landing buffer
TOKEN_FACTORS, FACTORS = "token factors", "factors"


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
        self.moved = {TOKEN_FACTORS: 0, FACTORS: 0}
        self.to_host_bytes = 0
        self._slots: list[torch.Tensor] = []  # two uint8 bounce slots, host to device
        self._events: list = [None, None]  # each slot's last copy (CUDA events)
        self._slot = 0
        self._landing: torch.Tensor | None = None  # one uint8 buffer, device to host
        self._registered: list[torch.Tensor] = []

    @property
    def to_device_bytes(self) -> int:
        return sum(self.moved.values())

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the buffers held (pinned on CUDA)."""
        return sum(t.numel() for t in self._slots) + (0 if self._landing is None else self._landing.numel())

    def _allocate(self, size: int) -> torch.Tensor:
        buffer = torch.empty(size, dtype=torch.uint8)
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
        self._registered, self._slots, self._landing, self._events = [], [], None, [None, None]

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
        if isinstance(source, torch.Tensor) and self.pinned and source.is_pinned() and source.is_contiguous():
            target.copy_(source.view(-1).view(torch.uint8), non_blocking=True)  # registered pages: no host copy
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
                staged.copy_(flat[start:stop])
            target[start:stop].copy_(staged, non_blocking=self.pinned)
            self._events[slot] = self._mark()

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
        self.to_host_bytes += sum(sizes.values())
        return landed
