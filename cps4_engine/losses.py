"""Stage-1 losses: token- and pixel-level attention losses, dense prompt-pixel alignment and
an optional image-text contrastive term.

Notation: B slices, P prompts (one per class, background first), ``(H, W)`` the slice
size. The attention losses read the class attention (the softmax over prompts of the
prompt-pixel logits, :class:`cps4_engine.models.vlm.VLMOutput`), which is also the class
map stage 2 uses; the alignment reads the sigmoid of the same logits. Every loss takes ``targets`` (float one-hot
masks ``(B, P, ., .)``, possibly fractional after pooling) and ``validity`` (bool, where
each class's truth is known, :func:`cps4_engine.preprocess.class_validity`). Pixels whose
truth is unknown for a class contribute neither loss nor gradient to that class: a
partial mask never teaches that an unpainted vertebra is background.

- **token-level attention loss**: for each class present in a slice and known everywhere
  on it, ``share`` = the fraction of the class's attention (summed over the slice) that
  falls inside its mask; loss = mean over those classes of
  ``(1 - share) ** 2``.
- **pixel-level attention loss**: binary cross-entropy between each class's attention map
  (in [0, 1]) and its binary mask, averaged over known pixels.
- **dense alignment** (our choice: per-class, not softmax, because the class maps used
  downstream are per-class sigmoids): binary cross-entropy of the prompt-pixel logits
  against each class's mask plus MONAI's soft Dice loss (batch-wise, so rare classes
  count, averaged over the classes present in the batch: an absent class's Dice is
  degenerate and its false positives are the BCE's job), both over known pixels only.
- **image-text contrastive** (optional, weight 0 by default): a sigmoid (SigLIP-style)
  loss matching each slice's mean embedding with the prompts of the classes it contains,
  over classes whose presence is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from cps4_engine.models.vlm import VLMOutput

_EPSILON = 1e-6


def _zero(reference: torch.Tensor) -> torch.Tensor:
    """A zero that keeps the graph (so ``backward`` works when nothing is counted)."""
    return reference.sum() * 0.0


def _known_mean(values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the pixels where ``known`` (float 0/1, same shape) is 1.

    A masked sum rather than boolean indexing: indexing a ``(B, P, H, W)`` map costs a
    ``nonzero`` and a scatter in backward, about a quarter of a `cpu`-preset stage-1 step.
    """
    return (values * known).sum() / known.sum()


def token_attention_loss(class_attention: torch.Tensor, targets: torch.Tensor, validity: torch.Tensor) -> torch.Tensor:
    """Mean over counted classes of ``(1 - share inside the mask) ** 2``.

    Args:
        class_attention: float ``(B, P, H, W)``: each class's share of every pixel's attention.
        targets: float ``(B, P, H, W)`` in [0, 1]: the class's mask.
        validity: bool ``(B, P, H, W)``: where the class's truth is known. A class counts
            on a slice only if it is present there and known on every pixel.

    Returns:
        Scalar loss in [0, 1]; 0 (with a graph) when no class counts.
    """
    attention = class_attention.float()
    inside = (attention * targets).sum(dim=(2, 3))
    total = attention.sum(dim=(2, 3)).clamp_min(_EPSILON)
    counted = (targets > 0).any(dim=3).any(dim=2) & validity.all(dim=3).all(dim=2)
    if not counted.any():
        return _zero(attention)
    return ((1.0 - inside / total) ** 2)[counted].mean()


def pixel_attention_loss(class_attention: torch.Tensor, targets: torch.Tensor, validity: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of class attention maps against masks, over known pixels.

    Args:
        class_attention: float ``(B, P, H, W)`` in [0, 1].
        targets: float ``(B, P, H, W)`` in [0, 1].
        validity: bool ``(B, P, H, W)``.

    Returns:
        Scalar: the mean BCE over known (slice, class, pixel) triples; 0 if none is known.
    """
    if not validity.any():
        return _zero(class_attention)
    probabilities = class_attention.float().clamp(_EPSILON, 1.0 - _EPSILON)
    bce = F.binary_cross_entropy(probabilities, targets.float(), reduction="none")
    return _known_mean(bce, validity.float())


def alignment_loss(logits: torch.Tensor, targets: torch.Tensor, validity: torch.Tensor, dice: DiceLoss) -> torch.Tensor:
    """Per-class BCE plus soft Dice of prompt-pixel logits, over known pixels.

    Args:
        logits: float ``(B, P, H, W)``.
        targets: float ``(B, P, H, W)`` in {0, 1}.
        validity: bool ``(B, P, H, W)``.
        dice: a MONAI ``DiceLoss`` on probabilities (``sigmoid=False``, ``batch=True``,
            ``reduction="none"``); unknown pixels are zeroed in both its inputs, so they
            add nothing to it. Only classes present on known pixels are averaged.

    Returns:
        Scalar loss.
    """
    if not validity.any():
        return _zero(logits)
    logits = logits.float()
    known = validity.float()
    known_targets = targets.float() * known
    bce = _known_mean(F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none"), known)
    present = known_targets.sum(dim=(0, 2, 3)) > 0
    if not present.any():
        return bce
    per_class = dice(logits.sigmoid() * known, known_targets).reshape(-1)
    return bce + per_class[present].mean()


def contrastive_loss(image_logits: torch.Tensor, targets: torch.Tensor, validity: torch.Tensor) -> torch.Tensor:
    """Sigmoid image-text loss: does the slice contain each prompt's class?

    Args:
        image_logits: float ``(B, P)``.
        targets: float ``(B, P, H, W)``.
        validity: bool ``(B, P, H, W)``. A class's presence is known if it is present on
            a known pixel, or known absent on every pixel.

    Returns:
        Scalar BCE over slices and classes whose presence is known.
    """
    present = ((targets > 0) & validity).flatten(2).any(dim=2)
    known = present | validity.flatten(2).all(dim=2)
    if not known.any():
        return _zero(image_logits)
    bce = F.binary_cross_entropy_with_logits(image_logits.float(), present.float(), reduction="none")
    return bce[known].mean()


@dataclass
class Stage1LossWeights:
    """Weights of the stage-1 loss terms; a weight of 0 switches its term off.

    Attributes:
        alignment: dense prompt-pixel alignment.
        token: token-level attention loss.
        pixel: pixel-level attention loss.
        contrastive: image-text contrastive term.
    """

    alignment: float = 1.0
    token: float = 1.0
    pixel: float = 1.0
    contrastive: float = 0.0


class Stage1Loss(nn.Module):
    """The weighted sum of the stage-1 terms.

    Args:
        weights: the weight of each term.
    """

    def __init__(self, weights: Stage1LossWeights) -> None:
        super().__init__()
        self.weights = weights
        self.dice = DiceLoss(include_background=True, sigmoid=False, batch=True, reduction="none")

    def forward(self, output: VLMOutput, targets: torch.Tensor, validity: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms and their weighted ``total``.

        Args:
            output: the model's output on a batch.
            targets: float ``(B, P, H, W)`` one-hot masks.
            validity: bool ``(B, P, H, W)``.

        Returns:
            Scalars by name: ``alignment``, ``token``, ``pixel``, ``contrastive`` (only
            the terms with a nonzero weight) and ``total``.
        """
        terms: dict[str, torch.Tensor] = {}
        attention = output.class_attention if self.weights.token or self.weights.pixel else None
        if self.weights.alignment:
            terms["alignment"] = alignment_loss(output.logits, targets, validity, self.dice)
        if self.weights.token:
            terms["token"] = token_attention_loss(attention, targets, validity)
        if self.weights.pixel:
            terms["pixel"] = pixel_attention_loss(attention, targets, validity)
        if self.weights.contrastive:
            terms["contrastive"] = contrastive_loss(output.image_logits, targets, validity)
        total = sum(getattr(self.weights, name) * value for name, value in terms.items())
        terms["total"] = total if isinstance(total, torch.Tensor) else _zero(output.logits)
        return terms


def one_hot_targets(labels: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Float one-hot masks ``(B, P, H, W)`` of class ids ``(B, H, W)`` (ids outside 0..P-1 give all-zero)."""
    classes = torch.arange(num_prompts, device=labels.device).view(1, -1, 1, 1)
    return (labels.unsqueeze(1) == classes).float()
