"""nnU-Net's ``progress.png`` drawn in a worker process, so that training does not wait for it.

nnU-Net draws its progress plot (three panels, 3000 x 5400 pixels, matplotlib and seaborn) at the end
of every epoch on the training process, between one epoch and the next; with a network that trains
an epoch in a few seconds that is a noticeable share of the wall time (docs/nnunet.md, "Epoch,
validation and progress plot"). Here the logged values are copied and handed to one worker process,
which draws the same figure with nnU-Net's own ``LocalLogger.plot_progress_png`` into the same file.
When the worker is still busy with an earlier epoch's plot it skips to the newest values; at the end
of training the last plot is waited for, so the file left behind is the one nnU-Net would have
written. Deliberately not a thread: drawing holds the interpreter lock for most of a second, which
the training loop needs to keep the GPU fed.

Used when training on CUDA (on a CPU an epoch is long and the cores are the training's);
``NNUNETV2_MOBILEVIM_BACKGROUND_PLOT=0`` draws it in the training process, as nnU-Net does, ``=1`` in
a worker process on any device.
"""

from __future__ import annotations

import copy
import multiprocessing
import queue
from typing import Callable, Optional

from .switches import BACKGROUND_PLOT, background_plot_switch

_STOP = None  # sent to the worker: draw what is queued, then exit
_PARENT_CHECK_S = 5.0  # how often an idle worker checks that the training process still exists


def _local_logger(logger):
    """nnU-Net 2.8's ``MetaLogger`` keeps the values in its ``local_logger``; older versions are one."""
    return getattr(logger, "local_logger", logger)


def draw(values: dict, output_folder: str) -> None:
    """nnU-Net's progress plot of the logged ``values`` (``LocalLogger.my_fantastic_logging``) into
    ``output_folder/progress.png``, drawn by nnU-Net's own code."""
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    logger = LocalLogger()
    logger.my_fantastic_logging = values
    logger.plot_progress_png(output_folder)


def _serve(requests, failures) -> None:
    """The worker: draws the newest request, skipping older ones still queued; exits after ``_STOP``, or
    when the training process is gone (killed: nobody would send ``_STOP``)."""
    parent = multiprocessing.parent_process()
    while True:
        try:
            items = [requests.get(timeout=_PARENT_CHECK_S)]
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return
            continue
        while True:
            try:
                items.append(requests.get_nowait())
            except queue.Empty:
                break
        stop = any(item is _STOP for item in items)
        newest = [item for item in items if item is not _STOP]
        if newest:
            try:
                draw(*newest[-1])
            except Exception as err:  # the trainer reports it and draws in its own process from then on
                failures.put(f"{type(err).__name__}: {err}")
                return
        if stop:
            return


class ProgressPlotter:
    """Draws nnU-Net's progress plot in one worker process (started at the first ``submit``).

        plotter = ProgressPlotter(log=trainer.print_to_log_file)
        plotter.submit(trainer.logger, trainer.output_folder)   # returns at once
        plotter.close()                                          # waits for the last plot

    If the worker fails or disappears, the failure is logged once and every later plot is drawn in
    the calling process, as nnU-Net does."""

    def __init__(self, log: Callable[..., None] = print, close_timeout_s: float = 120.0) -> None:
        self.log, self.close_timeout_s = log, close_timeout_s
        self._process: Optional[multiprocessing.Process] = None
        self._requests = self._failures = None
        self._last = None  # the values and folder of the last submit
        self.in_process = False  # True after a failure: draw here

    def submit(self, logger, output_folder: str) -> None:
        """Draw ``logger``'s values as they are now (they are copied) into ``output_folder``."""
        values = copy.deepcopy(_local_logger(logger).my_fantastic_logging)
        self._last = (values, output_folder)
        if not self.in_process and self._worker_failed():
            self.in_process = True
        if self.in_process:
            draw(values, output_folder)
            return
        if self._process is None:
            context = multiprocessing.get_context("spawn")  # no copy of the trainer's CUDA state or threads
            self._requests, self._failures = context.Queue(), context.Queue()
            self._process = context.Process(target=_serve, args=(self._requests, self._failures), daemon=True,
                                            name="nnunetv2_mobilevim progress plot")
            self._process.start()
        self._requests.put((values, output_folder))

    def _worker_failed(self, stopped: bool = False) -> bool:
        """Whether the worker reported an error or (unless it was ``stopped``) exited; logs it."""
        if self._process is None:
            return False
        why = None
        try:
            why = self._failures.get_nowait()  # a worker that failed put its reason before it exited
        except queue.Empty:
            if not self._process.is_alive() and not (stopped and self._process.exitcode == 0):
                why = f"it exited (exit code {self._process.exitcode})"
        if why is None:
            return False
        self.log(f"progress plot: the worker process failed ({why}); drawing progress.png in the training "
                 f"process from now on, as nnU-Net does ({BACKGROUND_PLOT}=0 does so from the start)")
        return True

    def close(self) -> None:
        """Wait for the plot of the last values submitted (drawn here if the worker failed on the way),
        then stop the worker."""
        if self._process is None:
            return
        stopped = self._process.is_alive()
        if stopped:
            self._requests.put(_STOP)
            self._process.join(self.close_timeout_s)
            if self._process.is_alive():
                self.log(f"progress plot: the last plot did not finish within {self.close_timeout_s:.0f} s; "
                         "drawing it in the training process")
                self._process.terminate()
                self._process.join()
                self.in_process = True
                draw(*self._last)
        if not self.in_process and self._worker_failed(stopped):
            self.in_process = True
            draw(*self._last)
        self._process = None


class BackgroundProgressPlot:
    """Mixin for nnU-Net trainers (before ``nnUNetTrainer`` in the bases): ``progress.png`` is drawn by a
    ``ProgressPlotter`` instead of in the training loop (on CUDA, or everywhere with the switch at 1);
    the same file, same figure."""

    progress_plotter: Optional[ProgressPlotter] = None

    def on_train_start(self):
        super().on_train_start()
        switch = background_plot_switch()
        if switch is False or (switch is None and self.device.type != "cuda"):
            why = (f"{BACKGROUND_PLOT}=0" if switch is False else
                   f"training on {self.device.type}; {BACKGROUND_PLOT}=1 draws it in a worker process")
            self.print_to_log_file(f"progress.png: drawn in the training process, as nnU-Net does ({why})")
            return
        self.progress_plotter = ProgressPlotter(log=self.print_to_log_file)
        self.logger = _PlotElsewhere(self.logger, self.progress_plotter)
        self.print_to_log_file(f"progress.png: drawn in a worker process ({BACKGROUND_PLOT}=0 draws it here)")

    def on_train_end(self):
        try:
            super().on_train_end()
        finally:
            if self.progress_plotter is not None:
                self.progress_plotter.close()
                self.logger = self.logger.logger
                self.progress_plotter = None


class _PlotElsewhere:
    """nnU-Net's logger with ``plot_progress_png`` handed to a ``ProgressPlotter``; all else is the
    logger's own."""

    def __init__(self, logger, plotter: ProgressPlotter) -> None:
        self.logger, self.plotter = logger, plotter

    def plot_progress_png(self, output_folder: str) -> None:
        self.plotter.submit(self.logger, output_folder)

    def __getattr__(self, name):
        if name == "logger":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.logger, name)
