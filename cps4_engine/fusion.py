"""Fusion of class-specific prompt maps into one multi-class map and into pseudo-labels.

Stage 1 gives, for every foreground class prompt, a probability map saying "this pixel
belongs to the class". Stage 2 needs one label per pixel. The rules here turn the 19
per-class maps into one multi-class map and combine it with the mean teacher's softmax.

Channel conventions (see ``docs/architecture.md``): per-class prompt maps have 19
channels, foreground class ``c`` (1..19) at channel ``c - 1``; multi-class maps have 20
channels, class ``c`` at channel ``c`` and background at channel 0.

Every function takes a ``class_dim`` argument saying which tensor dimension holds the
classes: ``0`` for one volume or slice (``(19, *spatial)``), ``1`` for a batch
(``(B, 19, H, W)``). The other dimensions are free.

Rules of :func:`fuse_class_maps`:

1. **Unclaimed pixels**: a pixel whose probability is not strictly above ``threshold``
   for any class is background (0).
2. **Overlaps**: where several classes claim a pixel, the most confident class wins.
3. **Ties**: between classes of exactly equal probability, the lower class id wins
   (deterministic, the order of ``torch.argmax``).

Weights of the class maps in fused pseudo-labels (:func:`class_weights`, ``--prompt-weighting``);
``w`` is ``--prompt-weight``, ``d_c`` the stage-1 class map's 3D Dice for foreground class
``c`` on the validation volumes at the best checkpoint (``class_reliability.json``, read by
:func:`read_class_reliability`):

- ``global``: every class map weighs ``w`` (one weight, as before reliability was recorded).
- ``reliability``: ``w_c = w * clip((d_c - RELIABILITY_FLOOR) / (RELIABILITY_CEILING -
  RELIABILITY_FLOOR), 0, 1)``: a map at or below the floor Dice is not used, one at or above
  the ceiling weighs the full ``w``, linear in between. A class without a Dice (absent from
  the validation volumes: ``null``) gets the mean weight of the classes that have one; if
  no class has one, every class weighs ``w``.

The default (``None``) is ``reliability`` when the stage-1 run holds ``class_reliability.json``
and ``global`` for runs saved before it existed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from cps4_engine.errors import CPS4Error
from cps4_engine.options import PROMPT_WEIGHTINGS, PSEUDO_LABELS
from cps4_engine.presets import DEFAULT_PROMPT_WEIGHT

NUM_FOREGROUND = 19
NUM_CLASSES = NUM_FOREGROUND + 1
# A class map with validation Dice at or below the floor gets weight 0 in mode
# ``reliability``: at that Dice it is wrong on most of its pixels and can only teach errors;
# at or above the ceiling (about the stage-1 maps' best overall Dice on vb3 at the real
# budget) it gets the full prompt weight.
RELIABILITY_FLOOR = 0.3
RELIABILITY_CEILING = 0.8

CombineMode = Literal["teacher", "prompt", "fused"]


@dataclass
class PseudoLabels:
    """Pseudo-labels for the student, with the evidence behind them.

    Attributes:
        probabilities: float ``(..., 20, ...)`` with classes at ``class_dim``; sums to 1
            over the class dimension.
        labels: int64, the input shape without the class dimension; class ids 0..19.
        confidence: float in [0, 1], same shape as ``labels``; how sure the chosen label
            is (used to mask out unreliable pixels).
    """

    probabilities: torch.Tensor
    labels: torch.Tensor
    confidence: torch.Tensor


def _check_channels(tensor: torch.Tensor, class_dim: int, expected: int, name: str) -> None:
    if tensor.dim() <= class_dim or tensor.shape[class_dim] != expected:
        raise ValueError(
            f"{name} must have {expected} classes at dimension {class_dim}; "
            f"got shape {tuple(tensor.shape)}"
        )
    if not torch.is_floating_point(tensor):
        raise ValueError(f"{name} must be a floating point tensor; got {tensor.dtype}")


def fuse_class_maps(
    probabilities: torch.Tensor, threshold: float = 0.5, class_dim: int = 0
) -> torch.Tensor:
    """Fuse per-class prompt probabilities into one label map (rules in the module doc).

    Args:
        probabilities: float in [0, 1], ``(19, *spatial)`` (``class_dim=0``) or
            ``(B, 19, H, W)`` (``class_dim=1``); foreground class ``c`` at channel
            ``c - 1``.
        threshold: a class claims a pixel only where its probability is strictly above it.
        class_dim: the dimension holding the 19 classes.

    Returns:
        int64 labels 0..19, the input shape without ``class_dim``.
    """
    _check_channels(probabilities, class_dim, NUM_FOREGROUND, "probabilities")
    best_probability, best_channel = probabilities.max(dim=class_dim)
    claimed = best_probability > threshold
    return torch.where(claimed, best_channel + 1, torch.zeros_like(best_channel))


def fused_confidence(
    probabilities: torch.Tensor, threshold: float = 0.5, class_dim: int = 0
) -> torch.Tensor:
    """How sure the fused label of each pixel is.

    Where a class claims the pixel, its probability; where none does, ``1 - max``
    (the belief that no class is there).

    Args:
        probabilities: as in :func:`fuse_class_maps`.
        threshold: as in :func:`fuse_class_maps`.
        class_dim: the dimension holding the 19 classes.

    Returns:
        float in [0, 1], the input shape without ``class_dim``.
    """
    _check_channels(probabilities, class_dim, NUM_FOREGROUND, "probabilities")
    best_probability = probabilities.amax(dim=class_dim)
    return torch.where(best_probability > threshold, best_probability, 1.0 - best_probability)


def prompt_distribution(probabilities: torch.Tensor, class_dim: int = 0) -> torch.Tensor:
    """A 20-class distribution built from the 19 per-class prompt maps.

    The most confident class (ties to the lower id) gets its own probability ``p``,
    background gets ``1 - p`` and every other class 0, so the channels sum to 1 and the
    argmax is the fused label at threshold 0.5.

    Args:
        probabilities: as in :func:`fuse_class_maps`.
        class_dim: the dimension holding the 19 classes.

    Returns:
        float ``(20, *spatial)`` or ``(B, 20, H, W)``: classes at ``class_dim``,
        background at channel 0.
    """
    _check_channels(probabilities, class_dim, NUM_FOREGROUND, "probabilities")
    best_probability, best_channel = probabilities.max(dim=class_dim, keepdim=True)
    foreground = torch.zeros_like(probabilities).scatter(class_dim, best_channel, best_probability)
    return torch.cat([1.0 - best_probability, foreground], dim=class_dim)


def read_class_reliability(run_dir: str | Path) -> list[float | None] | None:
    """The stage-1 class maps' validation Dice per foreground class, from ``class_reliability.json``.

    Args:
        run_dir: a stage-1 run folder.

    Returns:
        19 values, index ``i`` for foreground class ``i + 1``: a Dice in [0, 1], or None
        where the class never appears in the validation volumes; None if the run has no
        ``class_reliability.json`` (runs saved before it existed).

    Raises:
        CPS4Error: the file is unreadable or malformed (one line naming it and the field).
    """
    from cps4_engine.stage1 import RELIABILITY_FILE

    path = Path(run_dir) / RELIABILITY_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CPS4Error(f"unreadable class reliability ({error.__class__.__name__})", path=path) from None
    if not isinstance(record, dict):
        raise CPS4Error(f"must be an object with 'dice', 'step' and 'volumes', not {type(record).__name__}",
                        path=path)
    dice = record.get("dice")
    if not isinstance(dice, list) or len(dice) != NUM_FOREGROUND:
        raise CPS4Error(f"'dice' must list {NUM_FOREGROUND} values (one per foreground class)", path=path)
    for index, value in enumerate(dice):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise CPS4Error(f"'dice[{index}]' is {json.dumps(value)[:20]}; it must be a Dice in [0, 1] or null",
                            path=path)
    for key in ("step", "volumes"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CPS4Error(f"'{key}' is {json.dumps(value)[:20]}; it must be a whole number >= 0", path=path)
    return [None if value is None else float(value) for value in dice]


def class_weights(
    mode: str, prompt_weight: float, reliability: Sequence[float | None] | None
) -> list[float]:
    """Each class map's weight in fused pseudo-labels (rules in the module doc).

    Args:
        mode: ``global`` or ``reliability``.
        prompt_weight: the global weight ``w`` in [0, 1].
        reliability: the class maps' validation Dice (:func:`read_class_reliability`);
            needed by ``reliability``, ignored by ``global``.

    Returns:
        19 weights in [0, 1], index ``i`` for foreground class ``i + 1``.

    Raises:
        ValueError: unknown mode, or ``reliability`` without values.
    """
    if mode not in PROMPT_WEIGHTINGS:
        raise ValueError(f"unknown prompt weighting {mode!r}; choose one of {', '.join(PROMPT_WEIGHTINGS)}")
    if mode == "global":
        return [float(prompt_weight)] * NUM_FOREGROUND
    if reliability is None or len(reliability) != NUM_FOREGROUND:
        raise ValueError(f"prompt weighting 'reliability' needs {NUM_FOREGROUND} class Dice values")
    span = RELIABILITY_CEILING - RELIABILITY_FLOOR
    measured = {
        index: prompt_weight * min(max((dice - RELIABILITY_FLOOR) / span, 0.0), 1.0)
        for index, dice in enumerate(reliability) if dice is not None
    }
    unmeasured = sum(measured.values()) / len(measured) if measured else prompt_weight
    return [float(measured.get(index, unmeasured)) for index in range(NUM_FOREGROUND)]


def combine_with_teacher(
    teacher_probs: torch.Tensor,
    prompt_probs: torch.Tensor,
    mode: CombineMode = "fused",
    threshold: float = 0.5,
    prompt_weight: float | torch.Tensor = DEFAULT_PROMPT_WEIGHT,
    class_dim: int = 0,
) -> PseudoLabels:
    """Form pseudo-labels from the teacher's softmax, the prompt maps, or both.

    Modes:

    - ``"teacher"``: the teacher's softmax as it is; labels its argmax, confidence its max.
    - ``"prompt"``: the prompt maps alone; labels by :func:`fuse_class_maps` at
      ``threshold``, probabilities by :func:`prompt_distribution`, confidence by
      :func:`fused_confidence`.
    - ``"fused"``: the average ``(1 - w) * teacher + w * prompt_distribution`` with
      ``w = prompt_weight``; labels its argmax (ties to the lower id), confidence its max.
      Averaging lets a confident prompt overrule an unsure teacher and vice versa, and
      unlike a product it never vetoes a class one expert gives zero. With one weight per
      class (:func:`class_weights`), each pixel uses the weight of the class map that
      speaks there (the most confident one, ties to the lower id, as in
      :func:`prompt_distribution`), so the average still sums to 1.

    Args:
        teacher_probs: float softmax, ``(20, *spatial)`` or ``(B, 20, H, W)``.
        prompt_probs: float in [0, 1], ``(19, *spatial)`` or ``(B, 19, H, W)``, the same
            spatial shape; ignored in mode ``"teacher"``.
        mode: ``"teacher"``, ``"prompt"`` or ``"fused"``.
        threshold: the claim threshold of the prompt maps (mode ``"prompt"``).
        prompt_weight: weight of the prompt distribution in mode ``"fused"``, in [0, 1]:
            one number, or a ``(19,)`` tensor with one weight per foreground class
            (index ``c - 1`` for class ``c``).
        class_dim: the dimension holding the classes in both inputs.

    Returns:
        :class:`PseudoLabels` with 20-class probabilities, labels and confidence.

    Raises:
        ValueError: unknown mode, weight outside [0, 1], or mismatched shapes.
    """
    if mode not in PSEUDO_LABELS:
        raise ValueError(f"unknown fusion mode {mode!r}; choose one of {', '.join(PSEUDO_LABELS)}")
    if isinstance(prompt_weight, torch.Tensor):
        if tuple(prompt_weight.shape) != (NUM_FOREGROUND,):
            raise ValueError(f"per-class prompt_weight must have shape ({NUM_FOREGROUND},); got "
                             f"{tuple(prompt_weight.shape)}")
        outside = bool(((prompt_weight < 0) | (prompt_weight > 1)).any())
    else:
        outside = not 0.0 <= prompt_weight <= 1.0
    if outside:
        raise ValueError(f"prompt_weight must be in [0, 1]; got {prompt_weight}")
    _check_channels(teacher_probs, class_dim, NUM_CLASSES, "teacher_probs")
    if mode == "teacher":
        confidence, labels = teacher_probs.max(dim=class_dim)
        return PseudoLabels(teacher_probs, labels, confidence)
    _check_channels(prompt_probs, class_dim, NUM_FOREGROUND, "prompt_probs")
    spatial_teacher = teacher_probs.shape[:class_dim] + teacher_probs.shape[class_dim + 1 :]
    spatial_prompt = prompt_probs.shape[:class_dim] + prompt_probs.shape[class_dim + 1 :]
    if spatial_teacher != spatial_prompt:
        raise ValueError(
            f"teacher_probs {tuple(teacher_probs.shape)} and prompt_probs "
            f"{tuple(prompt_probs.shape)} differ outside the class dimension"
        )
    prompt_probs = prompt_probs.to(teacher_probs.dtype)
    distribution = prompt_distribution(prompt_probs, class_dim)
    if mode == "prompt":
        labels = fuse_class_maps(prompt_probs, threshold, class_dim)
        confidence = fused_confidence(prompt_probs, threshold, class_dim)
        return PseudoLabels(distribution, labels, confidence)
    weight: float | torch.Tensor = prompt_weight
    if isinstance(prompt_weight, torch.Tensor):
        _, speaking = prompt_probs.max(dim=class_dim, keepdim=True)
        weight = prompt_weight.to(device=teacher_probs.device, dtype=teacher_probs.dtype)[speaking]
    mixture = (1.0 - weight) * teacher_probs + weight * distribution
    confidence, labels = mixture.max(dim=class_dim)
    return PseudoLabels(mixture, labels, confidence)
