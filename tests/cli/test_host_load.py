"""research.host_load: busy host cores and the GPU's busy fraction over a window (epoch_anatomy's columns)."""

import os
import time

import pytest

from nnunetv2_mobilevim.research import epoch_anatomy
from nnunetv2_mobilevim.research.host_load import GPUBusySampler, LoadWindow, host_cpu_busy_seconds


def test_busy_seconds_count_every_state_but_idle_and_iowait(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 10 50 1000 30 5 5 2 0 0\ncpu0 50 5 25 500 15 2 3 1 0 0\n")
    assert host_cpu_busy_seconds(str(stat)) == pytest.approx(172 / os.sysconf("SC_CLK_TCK"))
    assert host_cpu_busy_seconds(str(tmp_path / "missing")) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_busy_seconds_of_the_host_include_this_process():
    """The whole host's busy time grows at least by what this process spends (a tick is 10 ms)."""
    before, own_before = host_cpu_busy_seconds(), time.process_time()
    while time.process_time() - own_before < 0.3:  # CPU time, not wall time: the host may be busy
        sum(i * i for i in range(1000))
    grown, own = host_cpu_busy_seconds() - before, time.process_time() - own_before
    assert grown >= own - 0.05


def test_gpu_sampler_averages_percent_readings_as_a_fraction():
    readings = iter([50.0, 100.0] + [100.0] * 1000)
    sampler = GPUBusySampler(lambda: next(readings), interval=0.01)
    sampler.start()
    time.sleep(0.005)  # the first reading is taken at once, the second after the interval
    value = sampler.stop()
    assert 0.5 <= value <= 1.0
    samples = sampler._samples
    assert value == pytest.approx(sum(samples) / len(samples) / 100)
    assert GPUBusySampler(None).stop() is None  # no reader: not measured
    idle = GPUBusySampler(lambda: 0.0, interval=0.01)
    idle.start()
    assert idle.stop() == 0.0


def test_load_window_is_busy_cpu_seconds_per_wall_second():
    clock, cpu = iter([10.0, 12.0]), iter([100.0, 103.0])
    window = LoadWindow(None, clock=lambda: next(clock), cpu_seconds=lambda: next(cpu))
    window.start()
    assert window.stop() == {"cpu_cores_busy": pytest.approx(1.5), "gpu_busy_fraction": None}
    window = LoadWindow(None, cpu_seconds=lambda: None)  # not Linux
    window.start()
    assert window.stop()["cpu_cores_busy"] is None


def test_epoch_rows_carry_the_load_and_medians_stay_unmeasured_where_a_value_is():
    marks = [("train_start", 1, 0.0), ("step_start", 1, 0.5), ("step_end", 1, 1.0), ("step_start", 1, 1.25),
             ("step_end", 1, 2.0), ("train_end", 1, 2.0), ("val_start", 1, 2.0), ("val_end", 1, 2.5)]
    row = epoch_anatomy.per_epoch(marks, 1, {"cpu_cores_busy": 3.0, "gpu_busy_fraction": 0.8})
    assert row["data_wait_s"] == pytest.approx(0.75) and row["train_step_s"] == pytest.approx(1.25)
    assert row["cpu_cores_busy"] == 3.0 and row["gpu_busy_fraction"] == 0.8
    assert epoch_anatomy.per_epoch(marks, 1)["gpu_busy_fraction"] is None
    assert epoch_anatomy._median([1.0, 3.0, 2.0]) == 2.0
    assert epoch_anatomy._median([1.0, None]) is None
