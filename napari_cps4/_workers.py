"""Engine calls the widgets run off the GUI thread (as napari thread workers).

Each function here is a plain generator or function over :mod:`cps4_engine`; the widgets
wrap them with :func:`napari.qt.threading.create_worker`, so the Qt event loop keeps
running while torch works (torch releases the GIL inside its kernels). Engine modules are
imported inside the functions so opening a widget stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Literal

from cps4_engine.events import CancelToken, TrainEvent
from cps4_engine.io import Volume

Stage = Literal[1, 2]


@dataclass
class TrainingResult:
    """What a training worker returns to the widget.

    Attributes:
        run_dir: the run folder the trainer wrote (the configuration's ``out``).
        last_event: the trainer's final event (``end`` or ``cancelled``), or None.
        prediction: for stage 2, the prediction of the image chosen for preview
            (:class:`cps4_engine.inference.Prediction`), else None.
    """

    run_dir: Path
    last_event: TrainEvent | None
    prediction: Any | None


def release_device_memory(device: str) -> None:
    """Return cached GPU memory to the driver after a run (a no-op on CPU)."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        torch.cuda.empty_cache()


def training_events(
    stage: Stage, config: Any, cancel: CancelToken, preview: Volume | None = None
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
        if stage == 1:
            from cps4_engine.stage1 import iter_pretrain as iterate
        else:
            from cps4_engine.stage2 import iter_train as iterate
        last: TrainEvent | None = None
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


def predict(run_dir: Path, volume: Volume, device: str = "auto") -> Any:
    """Segment ``volume`` with a stage-2 run's model; returns an inference ``Prediction``."""
    from cps4_engine.device import resolve_device
    from cps4_engine.inference import load_segmenter, predict_volume

    model = load_segmenter(run_dir, resolve_device(device))
    try:
        return predict_volume(model, volume, keep_probabilities=False)
    finally:
        del model
        release_device_memory(device)
