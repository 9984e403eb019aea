"""Copies of token factors between host and device, in the model's dtype, counted.

Token factors live on the host (RAM or a spill file) in the model's dtype. On a CUDA device, copies go
through pinned staging buffers with non-blocking copies: host to device in chunks through two alternating
buffers (the next chunk is staged while the previous one is in flight), device to host all at once into one
pinned buffer with a single synchronisation per batch (instead of one blocking copy per module and
example). Nothing is converted on the host: float32 is made on the device, so a bfloat16 model moves half
the bytes a float32 copy would. On the CPU the "device" is the host: nothing is copied.

:class:`Transfers` counts the bytes it moves each way (``to_device``, ``to_host``), for the plan and
``--verbose``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from if_query.plan.sizes import STAGING_BYTES

ALIGNMENT = 64  # bytes: where each tensor starts in the device-to-host landing buffer


class Transfers:
    """Host <-> ``device`` copies through pinned staging buffers (CUDA) or none (CPU); counts the bytes."""

    def __init__(self, device: torch.device, staging_bytes: int = STAGING_BYTES, staged: bool | None = None):
        """``staged`` (default: on CUDA) copies through the staging buffers; tests set it on the CPU, where the
        buffers are not pinned, to run the same chunking."""
        self.device = device
        self.copies = device.type == "cuda" if staged is None else staged
        self.pinned = self.copies and device.type == "cuda"
        self.staging_bytes = staging_bytes
        self.to_device_bytes = 0
        self.to_host_bytes = 0
        self._staging: list[torch.Tensor] = []  # two uint8 buffers, host to device
        self._events: list = [None, None]  # each buffer's last copy
        self._landing: torch.Tensor | None = None  # one uint8 buffer, device to host

    def _buffer(self, size: int, existing: torch.Tensor | None) -> torch.Tensor:
        if existing is not None and existing.numel() >= size:
            return existing
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` (contiguous) on the device in its own dtype; on the CPU, ``host`` itself."""
        if not self.copies:
            return host
        source = host.contiguous().view(-1).view(torch.uint8)  # (bytes,)
        result = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        target = result.view(-1).view(torch.uint8)  # (bytes,)
        if not self._staging:
            self._staging = [self._buffer(self.staging_bytes, None) for _ in range(2)]
        for number, start in enumerate(range(0, source.numel(), self.staging_bytes)):
            stop = min(start + self.staging_bytes, source.numel())
            slot = number % 2
            if self._events[slot] is not None:
                self._events[slot].synchronize()  # the buffer's previous chunk has left it
            staged = self._staging[slot][: stop - start]
            staged.copy_(source[start:stop])
            target[start:stop].copy_(staged, non_blocking=self.pinned)
            if self.device.type == "cuda":
                self._events[slot] = torch.cuda.Event()
                self._events[slot].record()
        self.to_device_bytes += source.numel()
        return result

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
        self._landing = self._buffer(total, self._landing)
        landed = {}
        for name, tensor in tensors.items():
            raw = self._landing[starts[name] : starts[name] + sizes[name]]
            landed[name] = raw.view(tensor.dtype).view(tensor.shape)
            landed[name].copy_(tensor, non_blocking=self.pinned)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.to_host_bytes += sum(sizes.values())
        return landed
