"""Refinement rounds: reviewed cases join the labeled set and stage 2 is fine-tuned.

One round (:func:`iter_retrain_round`):

1. **Dataset view.** ``rounds/round_NNNN/data/`` gets one entry per training case of the
   workspace, in workspace order, in the plain-folder layout: ``<case>.nii.gz`` (a link
   to the source image, a copy where links are not allowed) and, for cases a human
   labeled, ``<case>_seg.nii.gz`` holding only the human classes. A mask that is not
   complete carries a partial-label sidecar listing those classes, so that everything
   else counts as unknown rather than background. Held-out cases are left out.
2. **Training.** :func:`cps4_engine.stage2.iter_train` on that view with every labeled
   case labeled, initialised from the previous round's weights (``init_weights``; the
   first round starts from scratch or from ``RoundConfig.init_weights``). The run is
   ``rounds/round_NNNN/model/``.
3. **New pseudo-labels** for every training case whose mask is not complete, merged into
   the workspace without touching human classes, with their uncertainty for the queue.
4. **Held-out metrics**: Dice (MONAI, via :func:`cps4_engine.metrics.case_metrics`) of
   the new model on the held-out cases, recorded in the manifest's round list.

A cancelled training records nothing: the workspace stays as it was.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import nibabel as nib
import numpy as np

from cps4_engine.active.queue import case_uncertainty
from cps4_engine.active.workspace import Workspace
from cps4_engine.errors import CPS4Error
from cps4_engine.events import CancelToken, TrainEvent, run_with_callback
from cps4_engine.layouts import folder_case_paths, image_extension


@dataclass
class RoundConfig:
    """Settings of a refinement round.

    Attributes:
        method: stage-2 method (:data:`cps4_engine.options.METHODS`): ``supervised``,
            ``mean-teacher``, ``unimatch`` or ``cps4`` (on its default base).
        vlm: stage-1 run folder (needed by ``cps4``; its class maps also add the
            teacher/prompt disagreement to the uncertainty).
        preset: size preset (``tiny``, ``cpu``, ``paper``).
        max_steps: stage-2 optimiser steps of this round; None uses the preset's.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        seed: seeds the training.
        init_weights: weights (``.safetensors``) for the first round; later rounds start
            from the previous round's ``model.safetensors``.
        confidence_threshold: winning probability below which a voxel counts as low
            confidence in the uncertainty.
        batch_size: slices per forward pass when predicting.
    """

    method: str = "mean-teacher"
    vlm: str | Path | None = None
    preset: str = "cpu"
    max_steps: int | None = None
    device: str = "auto"
    seed: int = 0
    init_weights: str | Path | None = None
    confidence_threshold: float = 0.8
    batch_size: int = 8


def round_dir(workspace: Workspace, number: int) -> Path:
    """The folder of round ``number`` inside the workspace."""
    return workspace.root / "rounds" / f"round_{number:04d}"


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.symlink(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_dataset_view(workspace: Workspace, folder: str | Path) -> dict[str, str]:
    """Write the training cases as a plain-folder dataset (module doc, step 1).

    Args:
        workspace: the workspace.
        folder: where to write; must not exist yet.

    Returns:
        Map from the view's file stem to the workspace case id.

    Raises:
        CPS4Error: ``folder`` exists already.
    """
    from cps4_engine.data import write_label_status
    from cps4_engine.io import write_volume

    folder = Path(folder)
    if folder.exists():
        raise CPS4Error("dataset view exists already; remove it or start a new round", path=folder)
    folder.mkdir(parents=True)
    labeled = dict(workspace.labeled_for_training())
    stems: dict[str, str] = {}
    for index, case_id in enumerate(workspace.case_ids("train")):
        stem = f"case{index:04d}"
        stems[stem] = case_id
        image = workspace.image_path(case_id)
        image_copy, mask_path = folder_case_paths(folder, stem, image_extension(image))
        _link_or_copy(image.resolve(), image_copy)
        if case_id not in labeled:
            continue
        painted = labeled[case_id]
        labels = workspace.current_labels(case_id)
        human = workspace.human_classes(case_id)
        if painted is not None:
            labels = np.where(np.isin(labels, human), labels, 0).astype(labels.dtype)
        affine = nib.load(str(image)).affine
        mask = write_volume(mask_path, labels, affine)
        if painted is not None:
            write_label_status(mask, painted=list(painted), complete=False)
    return stems


def heldout_metrics(
    workspace: Workspace, model: Any, batch_size: int = 8
) -> dict[str, Any]:
    """Dice of a segmenter on the workspace's held-out cases.

    Args:
        workspace: the workspace (held-out cases' latest labels are the reference).
        model: a loaded segmenter (:func:`cps4_engine.inference.load_segmenter`).
        batch_size: slices per forward pass.

    Returns:
        ``{"mean_dice", "sd_dice", "level_accuracy", "cases_all_levels_right",
        "spine_dice", "cases": {case: dice}, "per_class": {id: dice}}`` (Dice in [0, 1],
        mean over the classes present in each reference, then over cases; level accuracy
        and spine Dice as :mod:`cps4_engine.metrics` defines them), or ``{}`` without
        held-out cases.
    """
    from cps4_engine.inference import predict_volume
    from cps4_engine.io import read_volume
    from cps4_engine.metrics import case_metrics, summarize

    scored = []
    for case_id in workspace.case_ids("heldout"):
        volume = read_volume(workspace.image_path(case_id), kind="image")
        reference = workspace.current_labels(case_id)
        prediction = predict_volume(model, volume, batch_size=batch_size, keep_probabilities=False)
        scored.append(case_metrics(prediction.labels, reference, volume.spacing, case_id=case_id))
    if not scored:
        return {}
    summary = summarize(scored)
    return {
        "mean_dice": float(summary.mean_dice),
        "sd_dice": float(summary.sd_dice),
        "level_accuracy": float(summary.level_accuracy),
        "cases_all_levels_right": int(summary.cases_all_levels_right),
        "spine_dice": float(summary.mean_spine_dice),
        "cases": {metrics.case_id: float(metrics.mean_dice) for metrics in scored},
        "per_class": {str(c): float(s.mean_dice) for c, s in summary.per_class.items()},
    }


def iter_retrain_round(
    workspace: Workspace, config: RoundConfig, cancel: CancelToken | None = None
) -> Iterator[TrainEvent]:
    """Run one refinement round (module doc), yielding the trainer's events and then
    one ``step`` event per predicted case and a final ``end`` event.

    Args:
        workspace: the workspace; updated in place and saved.
        config: the round's settings.
        cancel: polled by the trainer and between predicted cases.

    Yields:
        :class:`TrainEvent`; the last is ``end`` (``metrics`` holds the held-out Dice
        as ``dice`` when there are held-out cases; ``path`` the round folder) or
        ``cancelled``.

    Raises:
        CPS4Error: no training case has a human label yet, or the previous round's
            weights are missing.
    """
    from cps4_engine import stage2
    from cps4_engine.inference import load_segmenter, predict_volume
    from cps4_engine.io import read_volume

    cancel = cancel or CancelToken()
    labeled = workspace.labeled_for_training()
    if not labeled:
        raise CPS4Error(
            "no training case has a human label yet; accept or correct some classes first",
            path=workspace.root,
        )
    number = workspace.current_round + 1
    folder = round_dir(workspace, number)
    if folder.exists():
        shutil.rmtree(folder)
    init_weights = config.init_weights
    if workspace.rounds:
        init_weights = workspace.root / workspace.rounds[-1]["run"] / "model.safetensors"
        if not Path(init_weights).is_file():
            raise CPS4Error("previous round's weights are missing", path=init_weights)
    write_dataset_view(workspace, folder / "data")
    train_config = stage2.Stage2Config(
        data=folder / "data",
        out=folder / "model",
        labeled=len(labeled),
        method=config.method,
        vlm=config.vlm,
        preset=config.preset,
        max_steps=config.max_steps,
        device=config.device,
        seed=config.seed,
        validation=0,
        init_weights=init_weights,
    )
    last = None
    for event in stage2.iter_train(train_config, cancel):
        last = event
        yield event
    if last is None or last.kind == "cancelled" or cancel.cancelled:
        return

    model = load_segmenter(folder / "model", config.device)
    vlm = None
    if config.vlm is not None:
        from cps4_engine.classmaps import load_vlm

        vlm = load_vlm(config.vlm, model.device)
    pending = workspace.unreviewed()
    for index, case_id in enumerate(pending, start=1):
        if cancel.cancelled:
            yield TrainEvent("cancelled", message=f"round {number}: cancelled while predicting")
            return
        volume = read_volume(workspace.image_path(case_id), kind="image")
        prediction = predict_volume(model, volume, batch_size=config.batch_size)
        prompt_maps = None
        if vlm is not None:
            from cps4_engine.classmaps import volume_class_maps

            prompt_maps = volume_class_maps(vlm, volume).probabilities
        uncertainty = case_uncertainty(
            prediction.probabilities, prompt_maps, confidence_threshold=config.confidence_threshold
        )
        workspace.add_prediction(case_id, prediction.labels, number, uncertainty)
        yield TrainEvent(
            "step", step=index, max_steps=len(pending),
            message=f"round {number}: pseudo-labelled {case_id} ({index}/{len(pending)})",
        )
    metrics = heldout_metrics(workspace, model, config.batch_size)
    run = (folder / "model").relative_to(workspace.root).as_posix()
    workspace.add_round(
        {
            "round": number,
            "run": run,
            "trained_on": [case_id for case_id, _ in labeled],
            "predicted": pending,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "metrics": metrics,
        }
    )
    dice = metrics.get("mean_dice")
    yield TrainEvent(
        "end", step=len(pending), max_steps=len(pending),
        metrics={"dice": dice} if dice is not None else {},
        path=str(folder),
        message=f"round {number} done" + (f": held-out Dice {dice:.3f}" if dice is not None else ""),
    )


def retrain_round(
    workspace: Workspace,
    config: RoundConfig,
    callback: Callable[[TrainEvent], None] | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, Any] | None:
    """Run one refinement round; returns its manifest record, or None if cancelled."""
    before = workspace.current_round
    run_with_callback(iter_retrain_round(workspace, config, cancel), callback)
    return workspace.rounds[-1] if workspace.current_round > before else None
