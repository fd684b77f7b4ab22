"""nnU-Net's progress.png drawn in a worker process (``nnunet.progress_plot``): the file it leaves is
the one nnU-Net draws in the training process from the same values, pixel for pixel; a busy worker
skips to the newest values; a failed worker is reported and the plot drawn in the training process."""

from __future__ import annotations

import pytest

nnunet_logger = pytest.importorskip("nnunetv2.training.logging.nnunet_logger")


def logger_with(epochs: int, offset: float = 0.0):
    """nnU-Net's logger holding ``epochs`` epochs of made-up values (``offset`` moves every curve)."""
    logger = nnunet_logger.MetaLogger(output_folder=None, resume=False)  # nnU-Net 2.8: no other logger unless enabled
    for e in range(epochs):
        for key, value in (("train_losses", 1.0 - 0.1 * e + offset), ("val_losses", 1.1 - 0.08 * e + offset),
                           ("mean_fg_dice", 0.1 * e + offset), ("lrs", 0.01 * (1 - e / 50)),
                           ("epoch_start_timestamps", 10.0 * e), ("epoch_end_timestamps", 10.0 * e + 7 + offset)):
            logger.log(key, value, e)
        logger.log("dice_per_class_or_region", [0.1 * e, 0.05 * e + offset], e)
    return logger


def pixels(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def nnunets_plot(logger, folder):
    """progress.png as nnU-Net draws it, in this process."""
    folder.mkdir()
    logger.plot_progress_png(str(folder))
    return pixels(folder / "progress.png")


def test_the_worker_leaves_nnunets_plot_of_the_last_values(tmp_path):
    """Five epochs submitted at once (the worker is still starting, so it skips to the newest), then
    close: the file is nnU-Net's plot of the fifth epoch's values, and differs from the fourth's."""
    import numpy as np

    from nnunetv2_mobilevim.nnunet.progress_plot import ProgressPlotter

    ours = tmp_path / "ours"
    ours.mkdir()
    messages = []
    plotter = ProgressPlotter(log=messages_to(messages))
    for epochs in range(1, 6):
        plotter.submit(logger_with(epochs), str(ours))
    plotter.close()
    assert messages == []
    drawn = pixels(ours / "progress.png")
    assert np.array_equal(drawn, nnunets_plot(logger_with(5), tmp_path / "nnunet5"))
    assert not np.array_equal(drawn, nnunets_plot(logger_with(4), tmp_path / "nnunet4"))


def test_values_are_copied_when_submitted(tmp_path):
    """The training process keeps logging while the worker draws: what is drawn is what was logged at
    the submit, not later values."""
    import numpy as np

    from nnunetv2_mobilevim.nnunet.progress_plot import ProgressPlotter

    logger = logger_with(3)
    plotter = ProgressPlotter(log=messages_to([]))
    plotter.submit(logger, str(tmp_path))
    local = getattr(logger, "local_logger", logger)
    local.my_fantastic_logging["train_losses"][-1] = 5.0  # changed after the submit
    plotter.close()
    assert np.array_equal(pixels(tmp_path / "progress.png"), nnunets_plot(logger_with(3), tmp_path / "nnunet"))


def test_a_failed_worker_is_reported_and_the_plot_drawn_here(tmp_path):
    """The worker killed mid-training: the next submit says so once in the log and draws in this process,
    and so does every later one."""
    import numpy as np

    from nnunetv2_mobilevim.nnunet.progress_plot import ProgressPlotter

    messages = []
    plotter = ProgressPlotter(log=messages_to(messages))
    plotter.submit(logger_with(2), str(tmp_path))
    plotter._process.kill()
    plotter._process.join()
    plotter.submit(logger_with(3, offset=0.2), str(tmp_path))  # drawn here, before submit returns
    assert np.array_equal(pixels(tmp_path / "progress.png"),
                          nnunets_plot(logger_with(3, offset=0.2), tmp_path / "nnunet3"))
    plotter.submit(logger_with(4), str(tmp_path))
    assert np.array_equal(pixels(tmp_path / "progress.png"), nnunets_plot(logger_with(4), tmp_path / "nnunet4"))
    plotter.close()
    assert len(messages) == 1 and "failed" in messages[0] and "NNUNETV2_MOBILEVIM_BACKGROUND_PLOT" in messages[0]


def test_a_plot_that_fails_in_the_worker_is_drawn_here_at_close(tmp_path):
    """The worker's own error (here: its folder does not exist yet) is reported with nnU-Net's message,
    and close draws the last values in this process."""
    import numpy as np

    from nnunetv2_mobilevim.nnunet.progress_plot import ProgressPlotter

    messages = []
    plotter = ProgressPlotter(log=messages_to(messages))
    folder = tmp_path / "later"
    plotter.submit(logger_with(2), str(folder))
    plotter._process.join(120)  # the worker fails and exits
    folder.mkdir()
    plotter.close()
    assert len(messages) == 1 and "FileNotFoundError" in messages[0]
    assert np.array_equal(pixels(folder / "progress.png"), nnunets_plot(logger_with(2), tmp_path / "nnunet"))


def test_the_mixin_hands_nnunets_plot_call_to_the_worker_and_restores_the_logger(tmp_path, monkeypatch):
    """In a trainer, nnU-Net's ``self.logger.plot_progress_png(folder)`` goes to the plotter; every other
    logger call is the logger's own; after training the trainer holds nnU-Net's logger again. The switch
    at 0, or unset on a CPU, keeps nnU-Net's logger and says why; at 1 the worker is used on a CPU too."""
    import torch

    from nnunetv2_mobilevim.nnunet import progress_plot

    class Base:
        def __init__(self):
            self.logger, self.calls, self.device = logger_with(2), [], torch.device("cuda")

        def print_to_log_file(self, *args):
            self.calls.append(args)

        def on_train_start(self):
            self.calls.append("start")

        def on_train_end(self):
            self.calls.append("end")

    class Trainer(progress_plot.BackgroundProgressPlot, Base):
        pass

    submitted = []
    monkeypatch.setattr(progress_plot.ProgressPlotter, "submit", lambda self, lg, f: submitted.append((lg, f)))
    monkeypatch.setattr(progress_plot.ProgressPlotter, "close", lambda self: submitted.append("closed"))
    monkeypatch.setattr(progress_plot, "background_plot_switch", lambda: None)  # unset: on CUDA
    trainer = Trainer()
    original = trainer.logger
    trainer.on_train_start()
    trainer.logger.log("train_losses", 0.5, 2)  # the logger's own method
    trainer.logger.plot_progress_png(str(tmp_path))
    assert submitted == [(original, str(tmp_path))]
    assert original.get_value("train_losses", step=-1) == 0.5
    trainer.on_train_end()
    assert submitted[-1] == "closed" and trainer.logger is original
    start, said, end = trainer.calls
    assert (start, end) == ("start", "end") and "drawn in a worker process" in said[0]
    for switch, device, where in ((False, "cuda", "=0"), (None, "cpu", "training on cpu")):
        monkeypatch.setattr(progress_plot, "background_plot_switch", lambda switch=switch: switch)
        trainer.device, trainer.calls = torch.device(device), []
        trainer.on_train_start()
        assert trainer.logger is original and trainer.progress_plotter is None
        assert "drawn in the training process" in trainer.calls[-1][0] and where in trainer.calls[-1][0]
    monkeypatch.setattr(progress_plot, "background_plot_switch", lambda: True)  # =1: on any device
    trainer.on_train_start()
    assert isinstance(trainer.logger, progress_plot._PlotElsewhere)


def messages_to(messages: list):
    return lambda *args: messages.append(" ".join(str(a) for a in args))


def test_the_worker_exits_when_the_training_process_is_killed(tmp_path):
    """A training process killed without closing its plotter (SIGKILL, SIGTERM) must not leave the idle
    worker behind: it notices its parent is gone and exits."""
    import multiprocessing
    import os
    import signal
    import time

    context = multiprocessing.get_context("spawn")
    pids = context.Queue()
    trainer = context.Process(target=_train_and_get_killed, args=(str(tmp_path), pids))
    trainer.start()
    worker = pids.get(timeout=120)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.join()
    deadline = time.monotonic() + 60
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(worker), "the plot worker outlived the killed training process"


def _train_and_get_killed(folder: str, pids) -> None:
    """A stand-in training process: one plot submitted, then waits to be killed."""
    import time

    from nnunetv2_mobilevim.nnunet.progress_plot import ProgressPlotter

    plotter = ProgressPlotter(log=print)
    plotter.submit(logger_with(2), folder)
    pids.put(plotter._process.pid)
    time.sleep(600)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped by its dead parent's adopter yet, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
