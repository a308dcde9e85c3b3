"""Engine calls the widgets run off the GUI thread (as napari thread workers).

Each function here is a plain generator or function over :mod:`cps4_engine`; the widgets
wrap them with :func:`napari.qt.threading.create_worker`, so the Qt event loop keeps
running while torch works (torch releases the GIL inside its kernels). The engine modules
are imported here, when a widget opens, rather than inside the workers: a first import
holds the interpreter lock for long stretches and would stall the viewer mid-run.

Training shares the cores with the viewer and with whatever else the machine runs, so a
worker trains under :func:`background_priority`: torch uses one thread fewer than the
cores, which leaves a core for the GUI thread. The worker thread keeps the viewer's
scheduling priority on purpose: it holds the interpreter lock between torch kernels, and
a lowered (niced) worker preempted by another process while holding it makes the GUI
thread wait for it — the event loop's worst gap beside a busy process was 500–670 ms with
the worker at nice +10 against about 20 ms without (tests/test_plugin_responsiveness.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Iterator, Literal

import torch

from cps4_engine.active.rounds import iter_retrain_round
from cps4_engine.device import resolve_device
from cps4_engine.events import CancelToken, TrainEvent
from cps4_engine.inference import Prediction, load_segmenter, predict_volume
from cps4_engine.io import Volume
from cps4_engine.stage1 import Stage1Config, iter_pretrain
from cps4_engine.stage2 import Stage2Config, iter_train

Stage = Literal[1, 2]

def training_threads() -> int:
    """Torch threads for a training worker: one fewer than the cores, at least one."""
    return max(1, (os.cpu_count() or 1) - 1)


@contextlib.contextmanager
def background_priority() -> Iterator[None]:
    """Train in the calling (worker) thread with :func:`training_threads` torch threads.

    ``torch.set_num_threads`` is restored on exit (napari reuses pool threads).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, training_threads()))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class TrainingResult:
    """What a training worker returns to the widget.

    Attributes:
        run_dir: the run folder the trainer wrote (the configuration's ``out``).
        last_event: the trainer's final event (``end`` or ``cancelled``), or None.
        prediction: for stage 2, the prediction of the image chosen for preview, else None.
    """

    run_dir: Path
    last_event: TrainEvent | None
    prediction: Prediction | None


def release_device_memory(device: str) -> None:
    """Return cached GPU memory to the driver after a run (a no-op on CPU)."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        torch.cuda.empty_cache()


def training_events(
    stage: Stage,
    config: Stage1Config | Stage2Config,
    cancel: CancelToken,
    preview: Volume | None = None,
) -> Generator[TrainEvent, None, TrainingResult]:
    """Run stage 1 or stage 2 and yield its events; after stage 2, predict ``preview``.

    Args:
        stage: 1 for prompt pretraining, 2 for semi-supervised segmentation.
        config: a :class:`cps4_engine.stage1.Stage1Config` or
            :class:`cps4_engine.stage2.Stage2Config`.
        cancel: set by the widget's Stop button; the trainer saves a checkpoint and stops.
        preview: an image volume to segment with the trained model (stage 2 only).

    Returns:
        A :class:`TrainingResult` (the worker's ``returned`` signal carries it).
    """
    device = str(getattr(config, "device", "auto"))
    try:
        iterate = iter_pretrain if stage == 1 else iter_train
        last: TrainEvent | None = None
        with background_priority():
            for event in iterate(config, cancel):
                last = event
                yield event
        run_dir = Path(config.out)
        prediction = None
        if stage == 2 and preview is not None and (run_dir / "model.safetensors").is_file():
            prediction = predict(run_dir, preview, device)
        return TrainingResult(run_dir=run_dir, last_event=last, prediction=prediction)
    finally:
        release_device_memory(device)


def round_events(workspace: Any, config: Any, cancel: CancelToken) -> Generator[TrainEvent, None, None]:
    """A refinement round (:func:`cps4_engine.active.rounds.iter_retrain_round`) in the background.

    Args:
        workspace: the :class:`cps4_engine.active.workspace.Workspace` to retrain.
        config: a :class:`cps4_engine.active.rounds.RoundConfig`.
        cancel: set by the panel's Stop button.
    """
    with background_priority():
        yield from iter_retrain_round(workspace, config, cancel)


def predict(run_dir: Path, volume: Volume, device: str = "auto") -> Prediction:
    """Segment ``volume`` with a stage-2 run's model (labels and confidence, no probabilities)."""
    model = load_segmenter(run_dir, resolve_device(device))
    try:
        return predict_volume(model, volume, keep_probabilities=False)
    finally:
        del model
        release_device_memory(device)
