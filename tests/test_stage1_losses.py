"""Stage-1 losses: values pinned on small hand-made cases, absent classes, partial masks."""

from __future__ import annotations

import math

import torch
from monai.losses import DiceLoss

from cps4_engine.losses import (
    alignment_loss,
    contrastive_loss,
    one_hot_targets,
    pixel_attention_loss,
    token_attention_loss,
)
from cps4_engine.preprocess import class_validity

P = 4


def _labels() -> torch.Tensor:
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 2
    return labels


def test_token_loss_is_zero_inside_and_grows_as_attention_leaks() -> None:
    targets = one_hot_targets(_labels(), P)
    validity = torch.ones_like(targets, dtype=torch.bool)
    values = []
    for leaked in (0.0, 0.25, 0.5, 1.0):
        attention = torch.zeros(1, P, 4, 4)
        attention[0, 2, :2, :2] = (1.0 - leaked) / 4
        attention[0, 2, 3, 3] = leaked
        values.append(float(token_attention_loss(attention[:, 2:3], targets[:, 2:3], validity[:, 2:3])))
    assert values[0] == 0.0
    assert values == sorted(values) and math.isclose(values[1], 0.25**2) and math.isclose(values[3], 1.0)


def test_token_loss_averages_present_classes_only() -> None:
    labels = _labels()
    targets = one_hot_targets(labels, P)
    validity = torch.ones_like(targets, dtype=torch.bool)
    attention = torch.full((1, P, 4, 4), 0.25)
    # background covers 12 of 16 pixels, class 2 covers 4; classes 1 and 3 are absent
    expected = ((1 - 12 / 16) ** 2 + (1 - 4 / 16) ** 2) / 2
    assert math.isclose(float(token_attention_loss(attention, targets, validity)), expected, rel_tol=1e-6)
    absent = torch.zeros(1, P, 4, 4)
    attention.requires_grad_(True)
    zero = token_attention_loss(attention, absent, validity)
    zero.backward()
    assert float(zero) == 0.0 and torch.count_nonzero(attention.grad) == 0


def test_pixel_loss_equals_a_hand_computed_bce() -> None:
    attention = torch.tensor([[[[0.9, 0.2], [0.6, 0.1]]]])
    targets = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    validity = torch.tensor([[[[True, True], [True, False]]]])
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6)) / 3
    assert math.isclose(float(pixel_attention_loss(attention, targets, validity)), expected, rel_tol=1e-5)


def test_alignment_prefers_correct_logits_and_contrastive_knows_presence() -> None:
    targets = one_hot_targets(_labels(), P)
    validity = torch.ones_like(targets, dtype=torch.bool)
    dice = DiceLoss(include_background=True, sigmoid=False, batch=True, reduction="none")
    right = alignment_loss(targets * 12 - 6, targets, validity, dice)
    wrong = alignment_loss(6 - targets * 12, targets, validity, dice)
    assert float(right) < 0.01 < 1.0 < float(wrong)
    image_logits = torch.tensor([[5.0, -5.0, 5.0, -5.0]])
    assert float(contrastive_loss(image_logits, targets, validity)) < 0.01
    assert float(contrastive_loss(-image_logits, targets, validity)) > 4.0


def test_partial_mask_does_not_teach_that_unpainted_vertebrae_are_background() -> None:
    labels = torch.zeros(1, 6, 6, dtype=torch.long)
    labels[0, :2, :2] = 2
    unpainted = torch.zeros(6, 6, dtype=torch.bool)
    unpainted[3:5, 3:5] = True  # class 3 lies here but the annotator painted only class 2
    validity = class_validity(labels, painted=(2,), num_classes=P)
    targets = one_hot_targets(labels, P)
    logits = torch.randn(1, P, 6, 6, requires_grad=True)
    attention = torch.rand(1, P, 6, 6)
    attention = (attention / attention.sum(1, keepdim=True)).requires_grad_(True)
    dice = DiceLoss(include_background=True, sigmoid=False, batch=True, reduction="none")
    total = (
        alignment_loss(logits, targets, validity, dice)
        + pixel_attention_loss(attention, targets, validity)
        + token_attention_loss(attention, targets, validity)
        + contrastive_loss(logits.mean(dim=(2, 3)), targets, validity)
    )
    total.backward()
    for channel in (0, 3):  # background and the unpainted class learn nothing there
        assert torch.count_nonzero(logits.grad[0, channel][unpainted]) == 0
        assert torch.count_nonzero(attention.grad[0, channel][unpainted]) == 0
    assert torch.count_nonzero(logits.grad[0, 2][unpainted]) > 0  # known: not class 2
