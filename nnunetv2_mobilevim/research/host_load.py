"""How busy the host's CPU cores and the GPU are over a window of time (an epoch's training loop).

- ``host_cpu_busy_seconds()``: CPU seconds all cores of the host have spent busy since boot (Linux
  ``/proc/stat``: every state but idle and iowait), so that the difference over a window divided by its
  wall time is the number of cores busy: the trainer, its augmentation workers, and anything else on
  the host (measure on an otherwise idle machine).
- ``GPUBusySampler``: the mean of NVML's GPU utilisation (the share of its last sample period in which
  a kernel was running; ``torch.cuda.utilization``, which needs ``nvidia-ml-py``), polled in a thread.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, List, Optional

BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (idle 3 and iowait 4 left out)


def host_cpu_busy_seconds(stat_path: str = "/proc/stat") -> Optional[float]:
    """Busy CPU seconds of all cores since boot; None where ``stat_path`` cannot be read (not Linux)."""
    try:
        with open(stat_path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    return sum(ticks[i] for i in BUSY_FIELDS if i < len(ticks)) / os.sysconf("SC_CLK_TCK")


def nvml_utilization_reader(device=None) -> Optional[Callable[[], float]]:
    """``torch.cuda.utilization`` for ``device`` (percent) if CUDA and NVML's Python binding are there and
    one reading works; else None (the reason is not needed: the result then says "not measured")."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        torch.cuda.utilization(device)
    except Exception:  # no nvidia-ml-py, or NVML not usable here
        return None
    return lambda: float(torch.cuda.utilization(device))


class GPUBusySampler:
    """Between ``start()`` and ``stop()``, ``read()`` (a utilisation in percent) every ``interval`` seconds in a
    daemon thread; ``stop()`` returns the mean as a fraction in [0, 1], or None without a reader or sample."""

    def __init__(self, read: Optional[Callable[[], float]], interval: float = 0.1):
        self.read, self.interval = read, interval
        self._samples: List[float] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self.read is None:
            return
        self._samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._poll, name="gpu-busy", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._samples.append(self.read())
            self._stop.wait(self.interval)

    def stop(self) -> Optional[float]:
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        return sum(self._samples) / len(self._samples) / 100 if self._samples else None


class LoadWindow:
    """Host cores busy and GPU busy fraction over one window: ``start()``, then ``stop()`` returns
    ``{"cpu_cores_busy", "gpu_busy_fraction"}`` (None where not measurable)."""

    def __init__(self, gpu_read: Optional[Callable[[], float]] = None, clock: Callable[[], float] = time.perf_counter,
                 cpu_seconds: Callable[[], Optional[float]] = host_cpu_busy_seconds):
        self.gpu, self.clock, self.cpu_seconds = GPUBusySampler(gpu_read), clock, cpu_seconds
        self._t0 = self._cpu0 = None

    def start(self) -> None:
        self._t0, self._cpu0 = self.clock(), self.cpu_seconds()
        self.gpu.start()

    def stop(self) -> dict:
        gpu = self.gpu.stop()
        wall, cpu = self.clock() - self._t0, self.cpu_seconds()
        cores = (cpu - self._cpu0) / wall if cpu is not None and self._cpu0 is not None and wall > 0 else None
        return {"cpu_cores_busy": cores, "gpu_busy_fraction": gpu}
