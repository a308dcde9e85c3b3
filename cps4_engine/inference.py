"""Predicting label volumes with a trained stage-2 segmenter (``cps4 predict``).

A volume of any size and orientation is cut into sagittal slices in display orientation
and resized to the network's slice size (:func:`cps4_engine.preprocess.prepare_volume`),
segmented in batches without gradients (mixed precision on CUDA), and put back into the
volume's own voxel grid: the class probabilities are resized bilinearly and the labels
are their argmax there, so outlines are not the model's pixel staircase
(:func:`cps4_engine.preprocess.restore_soft_labels`). So every output
has the input's shape and is written with the input's affine.

The slices are fitted and stacked with their neighbours as the run was trained (its
``segmenter`` config: ``keep_aspect``, ``context_slices``). Optionally the probabilities
are the mean over copies of each slice moved along the spine (test-time shifts; off by
default, :data:`cps4_engine.options.DEFAULT_TEST_TIME_SHIFTS`), each moved back before
averaging. Then, unless switched off,
the 3D level step (:func:`cps4_engine.levels.make_levels_consistent`) gives every
vertebral body and disc one label across slices, in anatomical order; what it did is
kept in :attr:`Prediction.levels` and written beside the labels as
``<name>_levels.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from cps4_engine.checkpoint import load_weights, read_run_config
from cps4_engine.device import resolve_device
from cps4_engine.errors import CPS4Error
from cps4_engine.io import (
    Volume,
    is_nifti_path,
    nifti_bytes,
    nifti_stem,
    read_volume,
    write_bytes_atomic,
    write_text_atomic,
    write_volume,
)
from cps4_engine.labels import mrspineseg_scheme
from cps4_engine.levels import LevelReport, make_levels_consistent
from cps4_engine.models.segmenter import build_segmenter
from cps4_engine.options import DEFAULT_TEST_TIME_SHIFTS, check_test_time_shifts
from cps4_engine.preprocess import prepare_volume, restore_probabilities, restore_soft_labels, with_context
from cps4_engine.training import autocast

WEIGHTS_NAME = "model.safetensors"


@dataclass
class LoadedSegmenter:
    """A stage-2 network ready for inference.

    Attributes:
        network: the segmenter in eval mode on ``device``; ``(B, 1, H, W)`` -> logits
            ``(B, 20, H, W)``.
        slice_size: ``(H, W)`` in pixels the network was trained on.
        device: where it runs.
        run_dir: the run folder it came from (None for a network given in memory).
        config: the run's ``config.json`` (empty for a network given in memory).
        keep_aspect: slices are letterboxed rather than stretched.
        context_slices: neighbouring slices per side stacked as input channels.
    """

    network: nn.Module
    slice_size: tuple[int, int]
    device: torch.device
    run_dir: Path | None = None
    config: dict | None = None
    keep_aspect: bool = False
    context_slices: int = 0


@dataclass
class Prediction:
    """A volume's segmentation in its own voxel grid.

    Attributes:
        labels: uint8 ``(X, Y, Z)`` class ids 0..19.
        probabilities: float32 ``(20, X, Y, Z)`` softmax per class (background at 0), or
            None when not asked for (it takes ``80 * X * Y * Z`` bytes).
        confidence: float32 ``(X, Y, Z)`` in [0, 1]: the winning class's probability.
        levels: what the 3D level step changed, or None when it was switched off.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    confidence: np.ndarray
    levels: LevelReport | None = None


def load_segmenter(run_dir: str | Path, device: str | torch.device = "auto") -> LoadedSegmenter:
    """Rebuild a stage-2 run's network from its ``config.json`` and load its best weights.

    Args:
        run_dir: a stage-2 run folder (``config.json`` with ``"stage": 2`` and a
            ``"segmenter"`` entry, ``model.safetensors``).
        device: ``auto``, ``cpu``, ``cuda``, ``mps`` or a ``torch.device``.

    Returns:
        :class:`LoadedSegmenter` in eval mode.

    Raises:
        CPS4Error: not a stage-2 run, no segmenter description, missing or unreadable
            weights, or weights that do not fit the described network.
    """
    run_dir = Path(run_dir)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    config = read_run_config(run_dir, stage=2, scheme="mrspineseg")
    segmenter_config = config.get("segmenter")
    if not isinstance(segmenter_config, dict) or "slice_size" not in segmenter_config:
        raise CPS4Error("config.json has no 'segmenter' description with a slice_size", path=run_dir)
    network = build_segmenter(segmenter_config)
    state = load_weights(run_dir / WEIGHTS_NAME)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CPS4Error(
            f"weights do not fit the network in config.json ({first_line})", path=run_dir / WEIGHTS_NAME
        ) from None
    network.to(device).eval()
    height, width = (int(n) for n in segmenter_config["slice_size"])
    return LoadedSegmenter(
        network, (height, width), device, run_dir, config,
        keep_aspect=bool(segmenter_config.get("keep_aspect", False)),
        context_slices=int(segmenter_config.get("context_slices", 0)),
    )


def _as_loaded(model: LoadedSegmenter | nn.Module, slice_size: tuple[int, int] | None) -> LoadedSegmenter:
    if isinstance(model, LoadedSegmenter):
        return model
    if slice_size is None:
        raise ValueError("a bare network needs slice_size=(H, W)")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return LoadedSegmenter(model, (int(slice_size[0]), int(slice_size[1])), device)


def shift_rows(slices: torch.Tensor, rows: int) -> torch.Tensor:
    """Move every slice ``rows`` pixels towards the bottom (inferior); negative moves up.

    Args:
        slices: ``(S, C, H, W)``.
        rows: pixels to move; the rows moved in from outside are 0.

    Returns:
        A new tensor of the same shape.
    """
    moved = torch.zeros_like(slices)
    height = slices.shape[-2]
    if abs(rows) >= height:
        return moved
    if rows >= 0:
        moved[..., rows:, :] = slices[..., : height - rows, :]
    else:
        moved[..., : height + rows, :] = slices[..., -rows:, :]
    return moved


@torch.no_grad()
def _softmax_in_batches(loaded: LoadedSegmenter, images: torch.Tensor, batch_size: int, amp: bool) -> torch.Tensor:
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(loaded.device, non_blocking=True)
        with autocast(loaded.device, amp):
            logits = loaded.network(batch)
        outputs.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0, 20, *images.shape[-2:])


@torch.no_grad()
def predict_slices(
    model: LoadedSegmenter | nn.Module,
    images: torch.Tensor,
    batch_size: int = 8,
    shifts: Sequence[float] = (0.0,),
    amp: bool = True,
) -> torch.Tensor:
    """Softmax probabilities of preprocessed slices, in batches, averaged over shifted copies.

    The one forward pass over slices of the package: prediction, stage-2 validation and the
    pseudo-label benchmarks all call it.

    For each shift ``f`` the slices are moved ``round(f * H)`` pixels along their rows
    (superior to inferior; :func:`shift_rows`), segmented, and the probabilities moved
    back. Each pixel's result is the mean over the copies that kept it in view (a copy
    moved by ``f`` loses ``|f| * H`` rows at one end), so every pixel has at least the
    copy with the smallest shift.

    Args:
        model: a :class:`LoadedSegmenter` or a network mapping ``(B, C, H, W)`` to
            ``(B, 20, H, W)`` logits.
        images: float ``(S, C, H, W)`` in [0, 1] at the network's slice size.
        batch_size: slices per forward pass.
        shifts: fractions of the slice height in (-0.5, 0.5); ``(0.0,)`` is one plain pass.
        amp: bfloat16 autocast on CUDA (:func:`cps4_engine.training.autocast`).

    Returns:
        float32 ``(S, 20, H, W)`` on the CPU.

    Raises:
        CPS4Error: a batch size below 1, or shifts that are empty or out of range.
    """
    if batch_size < 1:
        raise CPS4Error(f"--batch-size must be at least 1, got {batch_size}")
    check_test_time_shifts(shifts)
    loaded = _as_loaded(model, tuple(images.shape[-2:]))
    was_training = loaded.network.training
    loaded.network.eval()
    height = int(images.shape[-2])
    total: torch.Tensor | None = None
    views = torch.zeros(1, 1, height, 1)
    try:
        for shift in shifts:
            rows = round(shift * height)
            moved_back = shift_rows(_softmax_in_batches(loaded, shift_rows(images, rows), batch_size, amp), -rows)
            in_view = shift_rows(torch.ones(1, 1, height, 1), -rows)
            total = moved_back if total is None else total + moved_back
            views = views + in_view
    finally:
        loaded.network.train(was_training)
    assert total is not None
    return total / views.clamp(min=1.0)


def predict_volume(
    model: LoadedSegmenter | nn.Module,
    volume: Volume,
    batch_size: int = 8,
    slice_size: tuple[int, int] | None = None,
    keep_probabilities: bool = True,
    level_step: bool = True,
    shifts: Sequence[float] = DEFAULT_TEST_TIME_SHIFTS,
) -> Prediction:
    """Segment one volume and return the result in its own voxel grid.

    Args:
        model: from :func:`load_segmenter`, or a bare network (then give ``slice_size``).
        volume: any size and orientation; the sagittal axis comes from its affine.
        batch_size: slices per forward pass.
        slice_size: ``(H, W)`` for a bare network.
        keep_probabilities: also restore the 20 class probabilities to the voxel grid.
        level_step: apply the 3D level step to the labels (probabilities and confidence
            stay the network's).
        shifts: test-time shifts along the spine, fractions of the slice height
            (:func:`predict_slices`); ``(0.0,)`` is one plain pass.

    Returns:
        :class:`Prediction` with arrays of ``volume.shape``.
    """
    loaded = _as_loaded(model, slice_size)
    stack = prepare_volume(volume, loaded.slice_size, keep_aspect=loaded.keep_aspect)
    images = with_context(torch.from_numpy(stack.images), loaded.context_slices)
    probabilities = predict_slices(loaded, images, batch_size, shifts)
    labels, confidence = restore_soft_labels(stack, probabilities)
    levels = None
    if level_step:
        labels, levels = make_levels_consistent(labels, volume.affine, mrspineseg_scheme())
    restored = restore_probabilities(stack, probabilities) if keep_probabilities else None
    return Prediction(labels=labels, probabilities=restored, confidence=confidence, levels=levels)


@dataclass
class PredictedFiles:
    """What :func:`predict_files` wrote for one image (paths; ``probabilities`` may be None)."""

    image: Path
    labels: Path
    confidence: Path
    probabilities: Path | None
    seconds: float


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """NIfTI images named directly or found (non-recursively) in named folders.

    Raises:
        CPS4Error: a path is missing, a folder holds no NIfTI file, or a file is not NIfTI.
    """
    images: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and is_nifti_path(p))
            if not found:
                raise CPS4Error("no NIfTI images (.nii, .nii.gz) in this folder", path=path)
            images.extend(found)
        elif not path.exists():
            raise CPS4Error("image not found", path=path)
        elif not is_nifti_path(path):
            raise CPS4Error("not a NIfTI file (expected .nii or .nii.gz)", path=path)
        else:
            images.append(path)
    if not images:
        raise CPS4Error("no images given")
    return images


def output_paths(image: Path, out_dir: Path) -> tuple[Path, Path, Path]:
    """``<name>_labels.nii.gz``, ``<name>_confidence.nii.gz``, ``<name>_probs.nii.gz``."""
    name = nifti_stem(image)
    return (
        out_dir / f"{name}_labels.nii.gz",
        out_dir / f"{name}_confidence.nii.gz",
        out_dir / f"{name}_probs.nii.gz",
    )


def levels_path(image: Path, out_dir: Path) -> Path:
    """``<name>_levels.json``: whether the 3D level step ran and what it changed."""
    return out_dir / f"{nifti_stem(image)}_levels.json"


def predict_files(
    model: LoadedSegmenter,
    images: Sequence[str | Path],
    out_dir: str | Path,
    batch_size: int = 8,
    probabilities: bool = False,
    overwrite: bool = False,
    progress: Callable[[PredictedFiles], None] | None = None,
    level_step: bool = True,
    shifts: Sequence[float] = DEFAULT_TEST_TIME_SHIFTS,
) -> list[PredictedFiles]:
    """Predict each image and write its results next to each other in ``out_dir``.

    For every image ``<name>.nii[.gz]``: ``<name>_labels.nii.gz`` (uint8 class ids),
    ``<name>_confidence.nii.gz`` (float32 winning-class probability) and, with
    ``probabilities``, ``<name>_probs.nii.gz`` (float32 ``(X, Y, Z, 20)``, class on the
    4th axis). All carry the image's affine. ``<name>_levels.json`` records the test-time
    shifts, whether the 3D level step ran and what it changed. Writes are atomic.

    Args:
        model: from :func:`load_segmenter`.
        images: image files or folders of them (see :func:`collect_images`).
        out_dir: output folder (created).
        batch_size: slices per forward pass.
        probabilities: also write the 4D probability volume.
        overwrite: replace existing outputs instead of refusing.
        progress: called after each image.
        level_step: apply the 3D level step (:func:`predict_volume`).
        shifts: test-time shifts along the spine (:func:`predict_slices`).

    Returns:
        One :class:`PredictedFiles` per image, in order.

    Raises:
        CPS4Error: bad or unreadable images, two images with the same name, outputs
            that exist already (without ``overwrite``) or bad shifts; checked before any
            prediction.
    """
    check_test_time_shifts(shifts)
    files = collect_images(images)
    out_dir = Path(out_dir)
    names: dict[str, Path] = {}
    for image in files:
        name = nifti_stem(image)
        if name in names:
            raise CPS4Error(f"two images are both called {name!r} ({names[name]} and {image}); outputs would collide", path=image)
        names[name] = image
        if not overwrite:
            for target in output_paths(image, out_dir)[: 3 if probabilities else 2]:
                if target.exists():
                    raise CPS4Error("output exists already; pass --overwrite to replace it", path=target)
    if out_dir.exists() and not out_dir.is_dir():
        raise CPS4Error("output path is a file, expected a folder", path=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image in files:
        start = time.perf_counter()
        volume = read_volume(image, kind="image")
        prediction = predict_volume(
            model, volume, batch_size, keep_probabilities=probabilities, level_step=level_step, shifts=shifts
        )
        labels_path, confidence_path, probs_path = output_paths(image, out_dir)
        write_volume(labels_path, prediction.labels, volume.affine)
        record = {"test_time_shifts": [float(shift) for shift in shifts], "level_step": level_step, **(prediction.levels.to_dict() if prediction.levels else {})}
        write_text_atomic(levels_path(image, out_dir), json.dumps(record, indent=1))
        write_volume(confidence_path, prediction.confidence, volume.affine)
        if prediction.probabilities is not None:
            class_last = np.moveaxis(prediction.probabilities, 0, -1)
            write_bytes_atomic(probs_path, nifti_bytes(class_last, volume.affine, compress=True))
        result = PredictedFiles(
            image, labels_path, confidence_path, probs_path if probabilities else None, time.perf_counter() - start
        )
        if progress is not None:
            progress(result)
        written.append(result)
    return written
