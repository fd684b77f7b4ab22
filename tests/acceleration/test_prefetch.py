"""DevicePrefetcher: every batch prepared exactly once and returned in the loader's order, whichever way
``next`` and ``prefetch`` interleave; on CUDA the consumer's stream waits for the side stream's work."""

import pytest
import torch

from nnunetv2_mobilevim.acceleration.prefetch import DevicePrefetcher


class _Loader:
    """An endless loader of numbered batches that counts how many were fetched."""

    def __init__(self):
        self.fetched = 0
        self.num_processes = 12  # an attribute nnU-Net reads from its loaders

    def __next__(self):
        self.fetched += 1
        return {"data": torch.full((2,), float(self.fetched))}


def test_batches_in_order_each_prepared_once():
    loader, prepared = _Loader(), []

    def prepare(batch):
        prepared.append(batch["data"][0].item())
        return {"data": batch["data"] * 10}

    p = DevicePrefetcher(loader, prepare)
    got = [next(p)["data"][0].item()]          # nothing pending: fetched and prepared now
    p.prefetch()
    p.prefetch()                               # idempotent: still one ahead
    got.append(next(p)["data"][0].item())
    got.append(next(p)["data"][0].item())      # no prefetch in between
    p.prefetch()
    got.append(next(p)["data"][0].item())
    assert got == [10.0, 20.0, 30.0, 40.0]
    assert prepared == [1.0, 2.0, 3.0, 4.0] and loader.fetched == 4
    p.prefetch()                               # one ahead again, nothing returned twice
    assert loader.fetched == 5 and next(p)["data"][0].item() == 50.0


def test_reads_the_loaders_attributes():
    loader = _Loader()
    p = DevicePrefetcher(loader, lambda b: b)
    assert p.loader is loader and p.num_processes == 12 and iter(p) is p
    with pytest.raises(AttributeError):
        p.not_an_attribute


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_consumer_waits_for_the_side_stream():
    """``prepare`` spends ~50 ms on the side stream before writing the batch; the consumer reads it at
    once on its own stream and must see the written values, batch after batch."""
    loader = _Loader()

    def prepare(batch):
        out = torch.zeros(1 << 20, device="cuda")
        torch.cuda._sleep(50_000_000)  # cycles: a slow augmentation
        out.fill_(batch["data"][0].item())
        return {"data": out}

    p = DevicePrefetcher(loader, prepare, torch.device("cuda"))
    sums = []
    for _ in range(4):
        batch = next(p)
        p.prefetch()
        sums.append(batch["data"].sum().item() / (1 << 20))
    assert sums == [1.0, 2.0, 3.0, 4.0]
