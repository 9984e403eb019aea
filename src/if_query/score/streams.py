"""The order of copies and compute while scoring: a copy stream, the compute stream and the events between them.

The engine scores module m on the compute stream while module m+1's factors and token factors are copied on a copy
stream (:mod:`if_query.score.engine`). What it asks of a :class:`Streams`:

- ``copying(label)``: the copies issued inside are on the copy stream; ``copied(label)`` marks their end (an event);
- ``wait(event)``: the compute stream waits for an event before it reads what was copied (the host does not wait);
- ``computed(label)``: marks the end of a module's compute (an event on the compute stream);
- ``retire(event)``: the host waits for an earlier module's compute (its results are in the device's totals and its
  copies' memory may be reused): the one synchronisation per module, with the next module already queued;
- ``reuse(event)``: the host waits before refilling a pinned bounce slot until the copy that read it is done;
- ``land(label)``: the host waits for the compute stream (results copied to the host);
- ``hand_over(tensor)``: a tensor made on the copy stream and read on the compute stream stays allocated until the
  compute stream is done with it (CUDA's caching allocator would otherwise reuse it for the next copy).

:class:`Streams` is the CPU's: every operation runs where it is called, in program order, and it records the order
(``log``: (what, label) pairs) so that tests can check the pipeline's order without a GPU. :class:`CudaStreams` does
the same with ``torch.cuda.Stream`` and ``torch.cuda.Event`` on the device it is made for. Which overlaps really
happen on a GPU is measured by ``scripts/gpu_check.sh``, not here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Streams:
    """The CPU: no streams, everything in program order; the order recorded in ``log`` for tests."""

    def __init__(self, record: bool = False):
        self.log: list[tuple[str, str]] | None = [] if record else None

    def _note(self, what: str, label: str) -> None:
        if self.log is not None:
            self.log.append((what, label))

    @contextmanager
    def copying(self, label: str) -> Iterator[None]:
        self._note("copy", label)
        yield

    def copied(self, label: str):
        self._note("copied", label)
        return label

    def wait(self, event, label: str = "") -> None:
        self._note("wait", label or str(event))

    def computed(self, label: str):
        self._note("computed", label)
        return label

    def retire(self, event, label: str = "") -> None:
        self._note("retire", label or str(event))

    def reuse(self, event) -> None:
        if event is not None:
            self._note("reuse", str(event))

    def land(self, label: str) -> None:
        self._note("land", label)

    def hand_over(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class CudaStreams(Streams):
    """A copy stream beside ``device``'s current (compute) stream, with events between them."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.compute = torch.cuda.current_stream(device)
        self.copy = torch.cuda.Stream(device)

    @contextmanager
    def copying(self, label: str) -> Iterator[None]:
        with torch.cuda.stream(self.copy):
            yield

    def copied(self, label: str):
        event = torch.cuda.Event()
        event.record(self.copy)
        return event

    def wait(self, event, label: str = "") -> None:
        self.compute.wait_event(event)

    def computed(self, label: str):
        event = torch.cuda.Event()
        event.record(self.compute)
        return event

    def retire(self, event, label: str = "") -> None:
        event.synchronize()

    def reuse(self, event) -> None:
        if event is not None:
            event.synchronize()

    def land(self, label: str) -> None:
        self.compute.synchronize()

    def hand_over(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor.record_stream(self.compute)
        return tensor


def streams_for(device: torch.device, record: bool = False) -> Streams:
    """The streams of ``device``: CUDA's, or the CPU's program order (``record``: with its log)."""
    return CudaStreams(device) if device.type == "cuda" else Streams(record)
