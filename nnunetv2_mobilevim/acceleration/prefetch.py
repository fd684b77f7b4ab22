"""Prepare the next batch on the device while the current one trains.

    loader = DevicePrefetcher(loader, prepare)   # prepare(batch) -> batch on the device
    batch = next(loader)       # prepared (waited for on the current stream)
    ...launch the training step on batch...
    loader.prefetch()          # fetch the following batch, prepare it on a side stream
    ...read the loss back...

On CUDA, ``prefetch()`` runs ``prepare`` (copy from pinned memory, augmentation) on a side stream, so
it overlaps the step already queued on the current stream: the copy engine and the SMs the step
leaves idle do the work. The batches, their order and what ``prepare`` does with them are unchanged;
only when the work runs moves. Elsewhere ``prefetch()`` prepares at once. This is apex's ImageNet
``data_prefetcher`` idea with the fetch moved after the step's launch (a loader that is not ready
then waits while the GPU works, not before).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch.utils._pytree import tree_leaves


class DevicePrefetcher:
    """An iterator over ``prepare(batch)`` for the batches of ``loader``, at most one prepared ahead.

    ``next(prefetcher)`` returns the batch ``prefetch()`` prepared, or fetches and prepares one now.
    Tensors ``prepare`` returns may be used on the stream that calls ``next`` (they are recorded on it,
    so the caching allocator does not reuse their memory early). Attributes it lacks are the loader's;
    ``.loader`` is the loader itself.
    """

    def __init__(self, loader: Iterator, prepare: Callable[[Any], Any],
                 device: Optional[torch.device] = None) -> None:
        self.loader, self.prepare = loader, prepare
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pending: Optional[Tuple[Any, Optional[torch.cuda.Event]]] = None

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> Any:
        if self._pending is None:
            self.prefetch()
        batch, ready = self._pending
        self._pending = None
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for t in tree_leaves(batch):
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(stream)
        return batch

    def prefetch(self) -> None:
        """Fetch the next batch and start preparing it; nothing if one is already waiting."""
        if self._pending is not None:
            return
        batch = next(self.loader)
        if self._stream is None:
            self._pending = (self.prepare(batch), None)
            return
        # no wait on the current stream: the batch is new memory, and overlapping the queued step is the point
        with torch.cuda.stream(self._stream):
            prepared = self.prepare(batch)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        self._pending = (prepared, ready)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "prepare", "device", "_stream", "_pending"):
            raise AttributeError(name)  # not set yet (during __init__ or unpickling)
        return getattr(self.loader, name)
