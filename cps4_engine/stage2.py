"""Stage 2: class-prompt driven semi-supervised segmentation (CPS4), and its ablations.

A MONAI 2D U-Net (the *student*, :mod:`cps4_engine.models.segmenter`) learns from

* **labeled slices** (those showing a structure drawn four times as often as empty
  ones), weakly augmented: Dice (MONAI ``DiceLoss``) + cross-entropy. Partial
  masks teach only what is known: cross-entropy ignores their unknown pixels
  (:func:`~cps4_engine.preprocess.labels_for_ce`) and the Dice of each class is computed
  only where that class's truth is known (:func:`~cps4_engine.preprocess.class_validity`),
  over the classes present in the batch's known pixels.
* **unlabeled slices** (methods ``mean-teacher``, ``unimatch`` and ``cps4``), through one
  of two semi-supervised *bases*:

  - ``mean-teacher``: the *teacher*, an exponential moving average (EMA) of the student,
    sees the weak view and gives its softmax; the student sees a strong
    (intensity-corrupted) version of the same weak view and learns cross-entropy towards
    the pseudo-labels (:func:`consistency_loss`).
  - ``unimatch`` (weak-to-strong consistency with feature perturbation, after UniMatch,
    Yang et al., CVPR 2023): the *student itself*, without gradient, gives the softmax of
    the weak view; that pseudo-label supervises three views in one forward pass: two
    independently drawn strong views and the weak view with feature dropout on every
    decoder input (:class:`~cps4_engine.models.segmenter.Segmenter`), weighted 1/4, 1/4
    and 1/2 (:func:`unimatch_loss`). The student rather than an EMA teacher labels, as in
    UniMatch: the pseudo-labels follow the current network without the EMA's lag (which
    matters at a budget of a few thousand steps on a cosine schedule), and the
    feature-perturbed view, not a slower copy, is what keeps the student from simply
    confirming itself. The EMA is still kept, as a validation candidate only.

  ``cps4`` runs on either base (``base``, default ``mean-teacher``) and combines the base's
  weak-view softmax with the frozen stage-1 class-prompt maps
  (:func:`~cps4_engine.fusion.combine_with_teacher`, mode ``teacher``, ``prompt`` or
  ``fused``) into pseudo-labels; in ``fused`` pseudo-labels each class map weighs by its
  stage-1 validation Dice (``prompt_weighting``, :func:`~cps4_engine.fusion.class_weights`).
  Only pixels whose pseudo-label confidence reaches ``confidence_threshold`` teach, and the
  unlabeled loss is weighted by a sigmoid ramp-up ``w(t) = w_max * exp(-5 (1 - t / T)^2)``
  over the first ``rampup_fraction`` of training. The stage-1 maps are computed once per
  unlabeled slice before training and cached (float16); the weak augmentation moves them
  with their image.

A partially labeled volume is also part of the unlabeled stream: its painted pixels keep
their given class (confidence 1) in the pseudo-label, and a pixel outside the painting is
never pseudo-labeled as a painted class (the annotator painted all of that class).

Methods (the ablation switches): ``supervised`` (labeled slices only), ``mean-teacher``
(teacher pseudo-labels, no prompts), ``unimatch`` (the student's own weak-view
pseudo-labels, no prompts), ``cps4`` (prompts + the base's pseudo-labels; default fused).

Intensities: every volume is scaled on its own (0.5th-99.5th percentile to [0, 1],
:func:`~cps4_engine.preprocess.prepare_volume`), so volumes with different intensity
ranges (e.g. uint16 scanner values beside float images in [0, 1]) train together.

Validation: a split of the *training* volumes (never test volumes) is scored every
``validation_every`` steps by 3D Dice over the slices (MONAI ``DiceMetric``); the best of
student and teacher (the EMA) so far is kept as ``model.safetensors``. The run folder holds
``config.json`` (``"stage": 2``, the segmenter description, preprocessing, ``method``,
``base``, ``prompt_weighting`` and the per-class ``prompt_weights`` used), ``model.safetensors``,
``last.safetensors`` (student), ``teacher.safetensors``, ``train_state.safetensors``
(optimiser, step, generators; for ``resume``), ``history.json`` and ``split.json``.

Multi-process training under ``torchrun`` is handled by :mod:`cps4_engine.distributed`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from cps4_engine import distributed
from cps4_engine.augment import SliceAugmenter
from cps4_engine.checkpoint import load_weights, read_run_config, write_run_config
from cps4_engine.errors import CPS4Error
from cps4_engine.events import CancelToken, TrainEvent, run_with_callback
from cps4_engine.fusion import class_weights, combine_with_teacher, read_class_reliability
from cps4_engine.inference import predict_slices
from cps4_engine.options import (
    BASES,
    DEFAULT_BASE,
    DEFAULT_FEATURE_DROPOUT,
    METHODS,
    PROMPT_WEIGHTINGS,
    PSEUDO_LABELS,
    WEIGHTED_PSEUDO_LABEL,
)
from cps4_engine.models.segmenter import NUM_CLASSES, build_segmenter, segmenter_config
from cps4_engine.preprocess import (
    IGNORE_INDEX,
    UNKNOWN_LABEL,
    SliceStack,
    ce_targets,
    known_pixels,
    prepare_volume,
    with_context,
)
from cps4_engine.presets import DEFAULT_PROMPT_WEIGHT, Preset, get_preset
from cps4_engine.training import (
    BEST_FILE,
    SPLIT_FILE,
    LoopSettings,
    StageTask,
    TrainingLoop,
    autocast,
    batches,
    check_run_folder,
)

WARMUP_FRACTION = 0.05
SCHEME_NAME = "mrspineseg"

MODEL_FILE = BEST_FILE
TEACHER_FILE = "teacher.safetensors"
PROMPT_BATCH = 16
# Labeled slices that show a structure are drawn this many times as often as empty ones
# (the outer sagittal slices), so few steps are not spent on background alone.
FOREGROUND_SLICE_WEIGHT = 4.0
# UniMatch's split of the unlabeled loss: half over the two strong image views, half on
# the feature-perturbed weak view.
IMAGE_VIEWS_SHARE = 0.5


@dataclass
class Stage2Config:
    """Settings of one stage-2 run.

    Attributes:
        data: a dataset folder (any layout :func:`cps4_engine.data.open_dataset` reads).
        out: the run folder to write.
        labeled: labeled training volumes: a count (int >= 1) or a fraction in (0, 1].
        method: ``supervised``, ``mean-teacher``, ``unimatch`` or ``cps4``.
        base: the semi-supervised base of ``cps4``, ``mean-teacher`` or ``unimatch``; None
            is ``mean-teacher``. Other methods are their own base (None, or their name).
        vlm: the stage-1 run folder (required by ``cps4``).
        pseudo_label: ``teacher``, ``prompt`` or ``fused``; None picks ``fused`` for
            ``cps4`` and ``teacher`` (the base's own softmax) otherwise.
        confidence_threshold: pseudo-labeled pixels below this confidence are ignored.
        prompt_threshold: a stage-1 class map claims a pixel above this probability.
        prompt_weight: weight of the prompt maps in the ``fused`` pseudo-label (the
            largest per-class weight in mode ``reliability``).
        prompt_weighting: ``global`` or ``reliability``
            (:func:`~cps4_engine.fusion.class_weights`); None picks ``reliability`` when the
            stage-1 run holds ``class_reliability.json``, else ``global``. Fused
            pseudo-labels only.
        feature_dropout: channel-dropout probability of the feature-perturbed view
            (``unimatch`` base).
        ema_decay: teacher EMA decay per step.
        unsupervised_weight: maximum weight of the unlabeled loss.
        rampup_fraction: share of ``max_steps`` over which that weight ramps up.
        preset: size preset (``tiny``, ``cpu``, ``paper``).
        max_steps: optimiser steps; None uses the preset's ``stage2_max_steps``.
        batch_size: labeled slices per step (as many unlabeled); None uses the preset's.
        learning_rate: AdamW learning rate; None uses the preset's.
        validation: validation volumes carved from the training volumes (count or fraction).
        validation_every: steps between validations; None: about ten per run.
        train_cases: the first this many cases (file-name order) are training volumes and
            the rest test volumes, never seen; None: all cases are training volumes.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        seed: picks the labeled volumes and initialises the network and sampling.
        resume: continue the run in ``out`` from its last checkpoint.
        amp: mixed precision (bfloat16 autocast) on CUDA.
        cpu_bf16: bfloat16 autocast of the training steps on the CPU (fast only on CPUs
            with native bfloat16, e.g. AVX512-BF16 or AMX); validation stays float32.
        init_weights: a segmenter ``.safetensors`` file (e.g. a previous refinement
            round's ``model.safetensors``) the student and teacher start from instead of
            a random initialisation; ignored when resuming.
        slice_size, keep_aspect, context_slices, fov_shift, labeled_strong, weak_zoom,
        weak_rotation: override the preset's
            recipe (:class:`~cps4_engine.presets.Preset`) for ablations; None keeps it.
        schedule: learning-rate schedule, ``cosine`` (linear warm-up over the first 5 %
            of the steps, then cosine decay to 0) or ``constant``.
        gradient_clip: the gradients' global norm is clipped to this (None: no clipping).
    """

    data: str | Path
    out: str | Path
    labeled: int | float = 2
    method: str = "cps4"
    base: str | None = None
    vlm: str | Path | None = None
    pseudo_label: str | None = None
    confidence_threshold: float = 0.8
    prompt_threshold: float = 0.5
    prompt_weight: float = DEFAULT_PROMPT_WEIGHT
    prompt_weighting: str | None = None
    feature_dropout: float = DEFAULT_FEATURE_DROPOUT
    ema_decay: float = 0.99
    unsupervised_weight: float = 1.0
    rampup_fraction: float = 0.4
    preset: str = "cpu"
    max_steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    validation: int | float = 0.1
    validation_every: int | None = None
    train_cases: int | None = None
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    amp: bool = True
    cpu_bf16: bool = False
    init_weights: str | Path | None = None
    slice_size: tuple[int, int] | None = None
    keep_aspect: bool | None = None
    context_slices: int | None = None
    fov_shift: float | None = None
    labeled_strong: bool | None = None
    weak_zoom: float | None = None
    weak_rotation: float | None = None
    schedule: str = "cosine"
    gradient_clip: float | None = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings)."""
        values = asdict(self)
        for key in ("data", "out", "vlm", "init_weights"):
            if values[key] is not None:
                values[key] = str(values[key])
        return values


@dataclass
class SliceSet(Dataset):
    """Preprocessed slices of several volumes, concatenated; a torch ``Dataset`` of slices.

    Item ``i`` is a dict of ``index`` (``i``), ``image`` ``(C, H, W)``, ``label``
    ``(H, W)``, ``partial`` and ``painted`` ``(20,)``.

    Attributes:
        images: float32 ``(N, C, H, W)`` in [0, 1]: each slice and its neighbours (2.5D).
        labels: int64 ``(N, H, W)`` class ids (0 where unknown or unlabeled).
        partial: bool ``(N,)``: the slice's mask is partial.
        painted: bool ``(N, 20)``: classes painted in the slice's partial mask (all
            False for complete or absent masks).
        stacks: the per-volume stacks, in order.
        case_ids: the volumes' case ids, in order.
    """

    images: torch.Tensor
    labels: torch.Tensor
    partial: torch.Tensor
    painted: torch.Tensor
    stacks: list[SliceStack] = field(default_factory=list)
    case_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "image": self.images[index], "label": self.labels[index],
                "partial": self.partial[index], "painted": self.painted[index]}


def resolve_pseudo_label(method: str, pseudo_label: str | None) -> str | None:
    """The pseudo-label source a method uses (None for ``supervised``).

    Raises:
        CPS4Error: unknown method or source, or a source ``mean-teacher`` cannot use.
    """
    if method not in METHODS:
        raise CPS4Error(f"--method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    if pseudo_label is not None and pseudo_label not in PSEUDO_LABELS:
        raise CPS4Error(
            f"--pseudo-label {pseudo_label!r} is unknown; choose one of {', '.join(PSEUDO_LABELS)}"
        )
    if method == "supervised":
        return None
    if method != "cps4":
        if pseudo_label not in (None, "teacher"):
            raise CPS4Error(
                f"--pseudo-label {pseudo_label} needs class-prompt maps; use --method cps4 with --vlm"
            )
        return "teacher"
    return pseudo_label or "fused"


def resolve_base(method: str, base: str | None) -> str | None:
    """The semi-supervised base a method trains its unlabeled slices with (None for ``supervised``).

    ``cps4`` runs on ``base`` (None: ``mean-teacher``, the meaning of runs saved before
    bases existed); ``mean-teacher`` and ``unimatch`` are their own base.

    Raises:
        CPS4Error: unknown base, or a base the method cannot take.
    """
    if base is not None and base not in BASES:
        raise CPS4Error(f"--base {base!r} is unknown; choose one of {', '.join(BASES)}")
    if method == "cps4":
        return base or DEFAULT_BASE
    own = None if method == "supervised" else method
    if base is not None and base != own:
        raise CPS4Error(f"--base {base} applies to --method cps4 only; --method {method} is its own base")
    return own


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = step / rampup_steps`` clipped to [0, 1]."""
    if rampup_steps <= 0:
        return 1.0
    progress = min(max(step / rampup_steps, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - progress) ** 2))


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> None:
    """Move the teacher towards the student: ``t = a t + (1 - a) s``.

    ``a = min(decay, 1 - 1 / (step + 1))``, so early on the teacher follows the student
    closely instead of averaging in its random start. Buffers are copied.

    Args:
        teacher: the EMA model, updated in place.
        student: the trained model (not a DDP wrapper).
        decay: the EMA decay in [0, 1).
        step: optimiser steps done (1 after the first step).
    """
    alpha = min(decay, 1.0 - 1.0 / (step + 1))
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters()):
        teacher_param.mul_(alpha).add_(student_param.detach(), alpha=1.0 - alpha)
    for teacher_buffer, student_buffer in zip(teacher.buffers(), student.buffers()):
        teacher_buffer.copy_(student_buffer)


def supervised_loss(
    logits: torch.Tensor, labels: torch.Tensor, partial: torch.Tensor, painted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice + cross-entropy on labeled slices, restricted to known truth.

    Args:
        logits: ``(B, 20, H, W)`` student output.
        labels: int64 ``(B, H, W)`` class ids (0: background, or unknown in partial masks).
        partial: bool ``(B,)``: the slice's mask is partial.
        painted: bool ``(B, 20)``: the classes painted in each partial mask.

    Returns:
        ``(dice_loss, ce_loss)`` scalars. Dice (MONAI ``DiceLoss``, foreground classes,
        batch-wise) counts each class only where its truth is known and only classes
        present among known pixels; CE ignores unknown pixels. Either is 0 if nothing
        is known.
    """
    from monai.losses import DiceLoss

    # The one rule of partial masks, for every row at once; load_case marked them.
    validity = known_pixels(labels, partial, painted, unknown=UNKNOWN_LABEL).to(logits.dtype)
    targets = ce_targets(labels, partial, unknown=UNKNOWN_LABEL)

    known = targets != IGNORE_INDEX
    if known.any():
        ce = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    else:
        ce = logits.sum() * 0.0

    probabilities = torch.softmax(logits.float(), dim=1) * validity
    onehot = F.one_hot(labels.clamp(min=0), NUM_CLASSES).permute(0, 3, 1, 2).to(probabilities.dtype)
    onehot = onehot * validity
    per_class = DiceLoss(include_background=False, batch=True, reduction="none")(probabilities, onehot)
    present = onehot[:, 1:].sum(dim=(0, 2, 3)) > 0
    dice = per_class.flatten()[present].mean() if present.any() else logits.sum() * 0.0
    return dice, ce


def pseudo_labels(
    teacher_probs: torch.Tensor,
    prompt_probs: torch.Tensor | None,
    given: torch.Tensor,
    painted: torch.Tensor,
    mode: str,
    confidence_threshold: float,
    prompt_threshold: float = 0.5,
    prompt_weight: float | torch.Tensor = DEFAULT_PROMPT_WEIGHT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels and the mask of pixels confident enough to learn from.

    Args:
        teacher_probs: ``(B, 20, H, W)`` softmax of the base's labelling network on the
            weak view (the EMA teacher for ``mean-teacher``, the student for ``unimatch``).
        prompt_probs: ``(B, 19, H, W)`` stage-1 class maps on the weak view (modes
            ``prompt`` and ``fused``), or None for ``teacher``.
        given: int64 ``(B, H, W)`` painted classes of partial masks (0 where unknown).
        painted: bool ``(B, 20)`` classes painted in each slice's partial mask.
        mode: ``teacher``, ``prompt`` or ``fused``
            (:func:`cps4_engine.fusion.combine_with_teacher`).
        confidence_threshold: pixels whose pseudo-label confidence is below it are masked.
        prompt_threshold: claim threshold of the class maps (mode ``prompt``).
        prompt_weight: weight of the class maps (mode ``fused``): one number or a ``(19,)``
            tensor of per-class weights (:func:`~cps4_engine.fusion.class_weights`).

    Returns:
        ``(labels, mask)``: int64 ``(B, H, W)`` class ids and bool ``(B, H, W)``. Given
        pixels keep their class and are always in the mask; an unknown pixel whose
        pseudo-label is a painted class is masked out.
    """
    if prompt_probs is None:
        prompt_probs = torch.zeros(
            teacher_probs.shape[0], NUM_CLASSES - 1, *teacher_probs.shape[2:],
            device=teacher_probs.device, dtype=teacher_probs.dtype,
        )
    combined = combine_with_teacher(
        teacher_probs, prompt_probs.to(teacher_probs.dtype), mode=mode,  # type: ignore[arg-type]
        threshold=prompt_threshold, prompt_weight=prompt_weight, class_dim=1,
    )
    labels = combined.labels
    mask = combined.confidence >= confidence_threshold
    is_given = given > 0
    painted_label = torch.gather(painted, 1, labels.flatten(1)).view_as(labels)
    mask = (mask & ~painted_label) | is_given
    labels = torch.where(is_given, given, labels)
    return labels, mask


def consistency_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy towards pseudo-labels on the confident pixels, averaged over all pixels.

    Args:
        logits: ``(B, 20, H, W)`` student logits on a view of the unlabeled slices.
        targets: int64 ``(B, H, W)`` pseudo-labels.
        mask: bool ``(B, H, W)``: pixels confident enough to learn from.

    Returns:
        A scalar: ``sum(CE * mask) / (B H W)`` (masked pixels count as 0, so the loss
        shrinks as fewer pixels are confident, as in mean teacher and UniMatch).
    """
    pixel_ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (pixel_ce * mask).mean()


def unimatch_loss(
    strong_logits: Sequence[torch.Tensor], perturbed_logits: torch.Tensor, targets: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """UniMatch's unlabeled loss: one weak-view pseudo-label supervising image and feature views.

    Args:
        strong_logits: ``(B, 20, H, W)`` logits of each strong image view (two in UniMatch).
        perturbed_logits: ``(B, 20, H, W)`` logits of the weak view with feature dropout.
        targets: int64 ``(B, H, W)`` pseudo-labels from the weak view.
        mask: bool ``(B, H, W)`` confident pixels.

    Returns:
        A scalar: ``IMAGE_VIEWS_SHARE * mean_v consistency(strong_v) + (1 - IMAGE_VIEWS_SHARE)
        * consistency(perturbed)`` (:func:`consistency_loss`), i.e. 1/4, 1/4 and 1/2 with
        two strong views.
    """
    image = torch.stack([consistency_loss(logits, targets, mask) for logits in strong_logits]).mean()
    feature = consistency_loss(perturbed_logits, targets, mask)
    return IMAGE_VIEWS_SHARE * image + (1.0 - IMAGE_VIEWS_SHARE) * feature


def _load_stacks(
    cases: Sequence[Any], size: tuple[int, int], with_labels: bool, keep_aspect: bool = False, context: int = 0
) -> SliceSet:
    """Read and preprocess volumes into one :class:`SliceSet` (labels only if asked).

    Images carry ``1 + 2 * context`` channels (:func:`~cps4_engine.preprocess.with_context`).
    """
    from cps4_engine.data import load_case
    from cps4_engine.io import read_volume

    images, labels, partial, painted, stacks, case_ids = [], [], [], [], [], []
    for case in cases:
        label = None
        case_painted = getattr(case, "painted", None)
        if with_labels and case.label_path is not None:
            volume, label = load_case(case)  # the image-vs-mask grid and label-value checks
        else:
            volume = read_volume(case.image_path, kind="image")
        stack = prepare_volume(volume, size, label=label, painted=case_painted if label is not None else None,
                               keep_aspect=keep_aspect)
        count = stack.num_slices
        images.append(torch.from_numpy(with_context(stack.images, context)))
        if stack.labels is not None:
            labels.append(torch.from_numpy(stack.labels))
        else:
            labels.append(torch.zeros(count, *size, dtype=torch.int64))
        is_partial = stack.labels is not None and stack.painted is not None
        partial.append(torch.full((count,), is_partial, dtype=torch.bool))
        row = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        if is_partial:
            row[[c for c in stack.painted if 0 <= c < NUM_CLASSES]] = True  # type: ignore[union-attr]
        painted.append(row.expand(count, NUM_CLASSES).clone())
        stacks.append(stack)
        case_ids.append(str(case.case_id))
    if not images:
        empty = torch.zeros(0, 1 + 2 * context, *size)
        return SliceSet(empty, torch.zeros(0, *size, dtype=torch.int64),
                        torch.zeros(0, dtype=torch.bool), torch.zeros(0, NUM_CLASSES, dtype=torch.bool))
    return SliceSet(torch.cat(images), torch.cat(labels), torch.cat(partial), torch.cat(painted),
                    stacks, case_ids)


def _concat_sets(first: SliceSet, second: SliceSet) -> SliceSet:
    return SliceSet(
        torch.cat([first.images, second.images]),
        torch.cat([first.labels, second.labels]),
        torch.cat([first.partial, second.partial]),
        torch.cat([first.painted, second.painted]),
        first.stacks + second.stacks,
        first.case_ids + second.case_ids,
    )


def _check_labeled(labeled: int | float, method: str) -> None:
    if isinstance(labeled, bool) or not isinstance(labeled, (int, float)):
        raise CPS4Error(f"--labeled {labeled!r} must be a count or a fraction")
    if labeled <= 0:
        raise CPS4Error(f"--labeled {labeled} leaves no labeled volume; method {method} needs at least one")
    if isinstance(labeled, float) and labeled > 1:
        raise CPS4Error(f"--labeled {labeled} is neither a count (integer) nor a fraction in (0, 1]")


def _load_vlm(run_dir: str | Path, device: torch.device) -> Any:
    from cps4_engine import classmaps

    read_run_config(run_dir, stage=1, scheme=SCHEME_NAME)
    return classmaps.load_vlm(run_dir, device)


@torch.no_grad()
def compute_prompt_cache(vlm: Any, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Stage-1 class maps of every slice, computed once (the cache stage 2 trains from).

    Args:
        vlm: a loaded stage-1 model (:func:`cps4_engine.classmaps.load_vlm`).
        images: ``(N, 1, H, W)`` slices in [0, 1] at the segmenter's slice size.
        device: where the model runs.

    Returns:
        float16 ``(N, 19, H, W)`` probabilities on ``device``, resized to ``(H, W)`` if
        the stage-1 model works at another slice size.
    """
    size = tuple(images.shape[-2:])
    vlm_size = getattr(vlm, "slice_size", None)
    maps = []
    for start in range(0, images.shape[0], PROMPT_BATCH):
        batch = images[start : start + PROMPT_BATCH].to(device)
        if vlm_size is not None and tuple(vlm_size) != size:
            batch = F.interpolate(batch, size=tuple(vlm_size), mode="bilinear", align_corners=False)
        probabilities = vlm.class_probabilities(batch).float()
        if tuple(probabilities.shape[-2:]) != size:
            probabilities = F.interpolate(probabilities, size=size, mode="bilinear", align_corners=False)
        maps.append(probabilities.clamp(0.0, 1.0).to(torch.float16))
    return torch.cat(maps) if maps else torch.zeros(0, NUM_CLASSES - 1, *size, dtype=torch.float16, device=device)


@torch.no_grad()
def validation_dice(model: nn.Module, slices: SliceSet, device: torch.device, batch_size: int, amp: bool) -> float:
    """Mean over volumes of the 3D Dice over foreground classes present (MONAI DiceMetric).

    Args:
        model: the network to score (switched to eval mode, then back).
        slices: validation volumes with labels.
        device: where to run.
        batch_size: slices per forward pass.
        amp: bfloat16 autocast on CUDA.

    Returns:
        Dice in [0, 1] on the model's slice grid; NaN if no volume has a foreground class.
    """
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    scores = []
    start = 0
    for stack in slices.stacks:
        count = stack.num_slices
        images = slices.images[start : start + count]
        truth = slices.labels[start : start + count].to(device)
        start += count
        predicted = predict_slices(model, images, batch_size, amp=amp).argmax(dim=1).to(device)
        pred_onehot = F.one_hot(predicted, NUM_CLASSES).permute(3, 0, 1, 2)[None]
        true_onehot = F.one_hot(truth, NUM_CLASSES).permute(3, 0, 1, 2)[None]
        per_class = metric(pred_onehot, true_onehot)[0]
        if torch.isfinite(per_class).any():
            scores.append(float(torch.nanmean(per_class)))
    return float(np.mean(scores)) if scores else math.nan


class Stage2Trainer(StageTask):
    """One stage-2 run: its data, networks and step, run by the shared training loop.

    ``Stage2Trainer(config).run(cancel)`` yields :class:`~cps4_engine.events.TrainEvent`
    objects (:class:`~cps4_engine.training.TrainingLoop` owns checkpoints, resume, the
    schedule, clipping, validation and events); after it finishes, :attr:`student` and
    :attr:`teacher` hold the final networks (useful to tests and benchmarks).
    Construction validates the configuration and raises
    :class:`~cps4_engine.errors.CPS4Error` on bad input before any work.

    Args:
        config: the run's settings.
        vlm_loader: loads a stage-1 model from a run folder onto a device; defaults to
            :func:`cps4_engine.classmaps.load_vlm` after checking the folder.
    """

    def __init__(
        self, config: Stage2Config, vlm_loader: Callable[[str | Path, torch.device], Any] | None = None
    ) -> None:
        self.config = config
        self.pseudo_label_source = resolve_pseudo_label(config.method, config.pseudo_label)
        self.base = resolve_base(config.method, config.base)
        self.semi_supervised = config.method != "supervised"
        _check_labeled(config.labeled, config.method)
        if config.method == "cps4" and config.vlm is None:
            raise CPS4Error("--method cps4 needs --vlm RUN, a stage-1 run folder (cps4 pretrain)")
        for option, value, low, high in (
            ("--prompt-weight", config.prompt_weight, 0.0, 1.0),
            ("--prompt-threshold", config.prompt_threshold, 0.0, 1.0),
            ("--confidence-threshold", config.confidence_threshold, 0.0, 1.0),
            ("--ema-decay", config.ema_decay, 0.0, 1.0),
            ("--feature-dropout", config.feature_dropout, 0.0, 0.95),
        ):
            if not low <= value <= high:
                raise CPS4Error(f"{option} {value} must be between {low:g} and {high:g}")
        recipe = {
            "slice_size": None if config.slice_size is None else tuple(int(n) for n in config.slice_size),
            "keep_aspect": config.keep_aspect, "context_slices": config.context_slices,
            "fov_shift": config.fov_shift, "labeled_strong": config.labeled_strong,
            "weak_zoom": config.weak_zoom, "weak_rotation": config.weak_rotation,
        }
        self.preset: Preset = replace(
            get_preset(config.preset), **{key: value for key, value in recipe.items() if value is not None}
        )
        if config.vlm is not None:
            vlm_preset = read_run_config(config.vlm, stage=1, scheme=SCHEME_NAME).get("preset", {})
            if bool(vlm_preset.get("keep_aspect", False)) != self.preset.keep_aspect:
                fitted = "letterboxes" if vlm_preset.get("keep_aspect") else "stretches"
                raise CPS4Error(
                    f"the stage-1 run {fitted} its slices and this stage-2 run does not; its class maps "
                    f"would not lie on the segmenter's grid (pretrain with the same --preset)", path=config.vlm,
                )
        self.max_steps = int(config.max_steps or self.preset.stage2_max_steps)
        if self.max_steps < 1:
            raise CPS4Error(f"--max-steps {self.max_steps} must be at least 1")
        self.batch_size = int(config.batch_size or self.preset.stage2_batch_size)
        self.learning_rate = float(config.learning_rate or self.preset.stage2_learning_rate)
        self.validation_every = int(config.validation_every or max(1, self.max_steps // 10))
        self.out = Path(config.out)
        check_run_folder(self.out, config.resume, stage=2,
                         same_settings={"method": config.method, "data": config.data, "preset": config.preset})
        recorded = read_run_config(self.out, stage=2, scheme=SCHEME_NAME) if config.resume else None
        if recorded is not None:
            self._check_resumed_base(recorded)
        self.prompt_weighting, self.prompt_weights = self._prompt_weights(recorded)
        if config.init_weights is not None and not Path(config.init_weights).is_file():
            raise CPS4Error("initial weights file not found", path=config.init_weights)
        self._vlm_loader = vlm_loader or _load_vlm
        self.split = self._split()
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.loop = TrainingLoop(self, LoopSettings(
            out=self.out, stage="stage 2", max_steps=self.max_steps, validation_every=self.validation_every,
            resume=config.resume, amp=config.amp, cpu_bf16=config.cpu_bf16, schedule=config.schedule,
            warmup_fraction=WARMUP_FRACTION, floor=0.0, gradient_clip=config.gradient_clip,
        ))

    def _check_resumed_base(self, recorded: dict[str, Any]) -> None:
        # Runs saved before bases existed trained cps4 on mean teacher.
        started = recorded.get("base", resolve_base(self.config.method, None))
        if started != self.base:
            raise CPS4Error(
                f"was started with base {started!r}, not {self.base!r}; resume with the same settings "
                "or choose another --out", path=self.out,
            )

    def _prompt_weights(self, recorded: dict[str, Any] | None) -> tuple[str | None, list[float] | None]:
        """The weighting mode and the 19 per-class weights of fused pseudo-labels (None, None
        when the pseudo-labels are not fused); a resumed run keeps those its ``config.json``
        recorded (``recorded``), even if the stage-1 run was retrained since."""
        mode = self.config.prompt_weighting
        if mode is not None and mode not in PROMPT_WEIGHTINGS:
            raise CPS4Error(f"--prompt-weighting {mode!r} is unknown; choose one of {', '.join(PROMPT_WEIGHTINGS)}")
        if self.pseudo_label_source != WEIGHTED_PSEUDO_LABEL:
            if mode is not None:
                raise CPS4Error(f"--prompt-weighting {mode} weighs fused pseudo-labels; this run's are "
                                f"{self.pseudo_label_source or 'not used'} (use --method cps4 --pseudo-label fused)")
            return None, None
        kept = (recorded or {}).get("prompt_weights")
        if kept is not None:
            started = (recorded or {}).get("prompt_weighting")
            if mode not in (None, started):
                raise CPS4Error(f"was started with prompt weighting {started!r}, not {mode!r}; resume with the "
                                "same settings or choose another --out", path=self.out)
            valid = isinstance(kept, list) and len(kept) == NUM_CLASSES - 1 and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and 0.0 <= w <= 1.0 for w in kept)
            if not valid:
                raise CPS4Error(f"'prompt_weights' must list {NUM_CLASSES - 1} weights in [0, 1]",
                                path=self.out / "config.json")
            return started, [float(weight) for weight in kept]
        reliability = read_class_reliability(self.config.vlm)  # type: ignore[arg-type]
        if mode == "reliability" and reliability is None:
            raise CPS4Error("--prompt-weighting reliability needs the stage-1 run's class_reliability.json "
                            "(pretrain it again with this version, or use --prompt-weighting global)",
                            path=self.config.vlm)
        mode = mode or ("reliability" if reliability is not None else "global")
        return mode, class_weights(mode, self.config.prompt_weight, reliability)

    def _split(self) -> Any:
        from cps4_engine.data import open_dataset, split_cases

        dataset = open_dataset(self.config.data)
        cases = list(dataset.cases)
        if self.config.train_cases is not None:
            if not 1 <= self.config.train_cases <= len(cases):
                raise CPS4Error(
                    f"--train-cases {self.config.train_cases} must be between 1 and the {len(cases)} cases",
                    path=self.config.data,
                )
        labeled_available = sum(1 for case in cases[: self.config.train_cases] if case.is_labeled)
        if isinstance(self.config.labeled, int) and self.config.labeled > labeled_available:
            raise CPS4Error(
                f"--labeled {self.config.labeled} is more than the {labeled_available} labeled "
                f"training volumes", path=self.config.data,
            )
        split = split_cases(
            cases, labeled=self.config.labeled, seed=self.config.seed,
            train=self.config.train_cases, validation=self.config.validation,
        )
        if not split.labeled:
            raise CPS4Error(f"--labeled {self.config.labeled} selects no labeled volume", path=self.config.data)
        partial_labeled = [case for case in split.labeled if case.is_partial]
        if self.semi_supervised and not split.unlabeled and not partial_labeled:
            raise CPS4Error(
                f"no unlabeled training volume is left for method {self.config.method} "
                f"(all {len(split.labeled)} are labeled); use --method supervised or label fewer",
                path=self.config.data,
            )
        return split

    def run_config(self) -> dict[str, Any]:
        """What ``config.json`` records: enough for inference to rebuild the network."""
        from cps4_engine.labels import mrspineseg_scheme

        return {
            "stage": 2,
            "scheme": mrspineseg_scheme().to_dict(),
            "preset": self.preset.to_dict(),
            "segmenter": segmenter_config(self.preset),
            "preprocessing": {
                "slice_size": list(self.preset.slice_size),
                "keep_aspect": self.preset.keep_aspect,
                "context_slices": self.preset.context_slices,
                "intensity": "per-volume percentile scaling 0.5-99.5 to [0, 1]",
            },
            "schedule": self.config.schedule,
            "gradient_clip": self.config.gradient_clip,
            "method": self.config.method,
            "base": self.base,
            "pseudo_label": self.pseudo_label_source,
            "prompt_weighting": self.prompt_weighting,
            "prompt_weights": self.prompt_weights,
            "vlm": str(Path(self.config.vlm).resolve()) if self.config.vlm is not None else None,
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "validation_every": self.validation_every,
            "settings": self.config.to_dict(),
        }

    def run(self, cancel: CancelToken | None = None) -> Iterator[TrainEvent]:
        """Train, yielding events; see the module doc for what is written."""
        with distributed.joined(self.config.device) as context:
            yield from self.loop.run(context, cancel or CancelToken())

    def setup(self, context: distributed.DistContext) -> None:
        config, device = self.config, context.device
        self.context = context
        size = tuple(self.preset.slice_size)
        recipe = {"keep_aspect": self.preset.keep_aspect, "context": self.preset.context_slices}
        self.labeled = _load_stacks(self.split.labeled, size, with_labels=True, **recipe)
        partial_cases = [case for case in self.split.labeled if case.is_partial]
        unlabeled = _load_stacks(self.split.unlabeled, size, with_labels=False, **recipe)
        if partial_cases:
            unlabeled = _concat_sets(unlabeled, _load_stacks(partial_cases, size, with_labels=True, **recipe))
        self.unlabeled = unlabeled
        self.validation = _load_stacks(self.split.validation, size, with_labels=True, **recipe)

        self.prompt_cache = None
        if self.semi_supervised and self.pseudo_label_source in ("prompt", "fused"):
            vlm = self._vlm_loader(config.vlm, device)  # type: ignore[arg-type]
            centre = self.preset.context_slices
            self.prompt_cache = compute_prompt_cache(vlm, unlabeled.images[:, centre : centre + 1], device)
            del vlm

        torch.manual_seed(config.seed)
        student = build_segmenter(self.preset).to(device)
        if config.init_weights is not None and not config.resume:
            try:
                student.load_state_dict(load_weights(config.init_weights, device))
            except RuntimeError:
                raise CPS4Error(
                    f"weights do not fit the {self.preset.name} preset's segmenter", path=config.init_weights
                ) from None
        self.model = self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=self.learning_rate, weight_decay=1e-4)
        self.trained = distributed.wrap_model(student, context)
        self.augmenter = SliceAugmenter(
            seed=config.seed * 7919 + context.rank,
            rotate_degrees=self.preset.weak_rotation,
            scale=self.preset.weak_zoom,
            translate_fraction=(self.preset.fov_shift, SliceAugmenter.DEFAULT_TRANSLATE),
        )
        sampler = torch.Generator().manual_seed(config.seed * 1000 + context.rank)
        self.generators = {"sampler": sampler, "augmentation": self.augmenter.generator}
        labeled_pool = distributed.rank_shard(len(self.labeled), context)
        shows_structure = (self.labeled.labels[labeled_pool].flatten(1) > 0).any(dim=1)
        weights = 1.0 + (FOREGROUND_SLICE_WEIGHT - 1.0) * shows_structure.float()
        self.labeled_batches = batches(Subset(self.labeled, labeled_pool.tolist()), self.batch_size, sampler, weights)
        self.unlabeled_batches = None
        if self.semi_supervised and len(unlabeled):
            pool = distributed.rank_shard(len(unlabeled), context)
            self.unlabeled_batches = batches(Subset(unlabeled, pool.tolist()), self.batch_size, sampler)
        self.rampup_steps = int(config.rampup_fraction * self.max_steps)

    def write_new_run(self) -> None:
        self.split.save(self.out / SPLIT_FILE)
        write_run_config(self.out, self.run_config())

    def start_message(self) -> str:
        context = self.context
        method = self.config.method + (f" on {self.base}" if self.config.method == "cps4" else "")
        return (
            f"stage 2 {method}: {len(self.split.labeled)} labeled, "
            f"{len(self.split.unlabeled)} unlabeled, {len(self.split.validation)} validation "
            f"volumes; {len(self.labeled)} labeled / {len(self.unlabeled)} unlabeled slices on {context.device}"
            + (f" x{context.world_size} processes" if context.distributed else "")
        )

    def extra_weights(self) -> dict[str, nn.Module]:
        return {TEACHER_FILE: self.teacher}  # type: ignore[dict-item]

    def after_step(self, step: int) -> None:
        update_ema(self.teacher, self.student, self.config.ema_decay, step)  # type: ignore[arg-type]

    def validate(self) -> dict[str, tuple[float, nn.Module]]:
        if not len(self.validation):
            return {}
        device, amp = self.context.device, self.config.amp
        scores = {"student": (validation_dice(self.student, self.validation, device, self.batch_size, amp),
                              self.student)}
        if self.semi_supervised:
            scores["teacher"] = (validation_dice(self.teacher, self.validation, device, self.batch_size, amp),
                                 self.teacher)
        return scores  # type: ignore[return-value]

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        config, device = self.config, self.context.device
        labeled = next(self.labeled_batches)
        weak_labeled = self.augmenter.weak({"image": labeled["image"].to(device), "label": labeled["label"].to(device)})
        if self.preset.labeled_strong:
            weak_labeled["image"] = self.augmenter.strong(weak_labeled["image"])
        count = weak_labeled["image"].shape[0]
        if self.unlabeled_batches is None:
            logits = self.trained(weak_labeled["image"]).float()
            dice, ce = supervised_loss(logits, weak_labeled["label"], labeled["partial"].to(device),
                                       labeled["painted"].to(device))
            total = dice + ce
            return total, {"dice_loss": float(dice.detach()), "ce": float(ce.detach()), "total": float(total.detach())}

        unlabeled = next(self.unlabeled_batches)
        views = {"image": unlabeled["image"].to(device), "label": unlabeled["label"].to(device)}
        if self.prompt_cache is not None:
            views["prompt"] = self.prompt_cache[unlabeled["index"].to(self.prompt_cache.device)].to(device).float()
        weak_unlabeled = self.augmenter.weak(views)
        weak_images = weak_unlabeled["image"]
        # Mean teacher labels with its EMA teacher; UniMatch with the student itself.
        labeller = self.teacher if self.base == "mean-teacher" else self.student
        if labeller is self.teacher:
            self.teacher.eval()  # type: ignore[union-attr]
        with torch.no_grad():
            weak_probs = torch.softmax(labeller(weak_images).float(), dim=1)  # type: ignore[misc]
        targets, mask = pseudo_labels(
            weak_probs, weak_unlabeled.get("prompt"), weak_unlabeled["label"],
            unlabeled["painted"].to(device), self.pseudo_label_source or "teacher",
            config.confidence_threshold, config.prompt_threshold, self._fused_weights(device),
        )
        if self.base == "unimatch":
            # One pass: labeled, two strong views, and the weak view with feature dropout (last rows).
            views_in = [weak_labeled["image"], self.augmenter.strong(weak_images),
                        self.augmenter.strong(weak_images), weak_images]
            logits = self.trained(torch.cat(views_in), perturbed_rows=weak_images.shape[0],
                                  feature_dropout=config.feature_dropout).float()
            first, second, perturbed = logits[count:].chunk(3)
            unsupervised = unimatch_loss([first, second], perturbed, targets, mask)
        else:
            logits = self.trained(torch.cat([weak_labeled["image"], self.augmenter.strong(weak_images)])).float()
            unsupervised = consistency_loss(logits[count:], targets, mask)
        dice, ce = supervised_loss(logits[:count], weak_labeled["label"], labeled["partial"].to(device),
                                   labeled["painted"].to(device))
        weight = config.unsupervised_weight * sigmoid_rampup(step, self.rampup_steps)
        total = dice + ce + weight * unsupervised
        return total, {"dice_loss": float(dice.detach()), "ce": float(ce.detach()),
                       "unsupervised": float(unsupervised.detach()), "weight": weight,
                       "confident": float(mask.float().mean()), "total": float(total.detach())}

    def _fused_weights(self, device: torch.device) -> float | torch.Tensor:
        """The class maps' weights for :func:`pseudo_labels` (the global weight unless fused)."""
        if self.prompt_weights is None:
            return self.config.prompt_weight
        return torch.tensor(self.prompt_weights, device=device)


def iter_train(config: Stage2Config, cancel: CancelToken | None = None) -> Iterator[TrainEvent]:
    """Run stage 2, yielding :class:`~cps4_engine.events.TrainEvent` objects.

    Raises:
        CPS4Error: bad input (see :class:`Stage2Trainer`), before training starts.
    """
    trainer = Stage2Trainer(config)
    return trainer.run(cancel)


def train(
    config: Stage2Config,
    callback: Callable[[TrainEvent], None] | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Run stage 2 to the end (or until cancelled) and return the run folder."""
    run_with_callback(iter_train(config, cancel), callback)
    return Path(config.out)
