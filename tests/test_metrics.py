"""Dice and HD95 against hand-computed values, partial ground truth, and summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cps4_engine.metrics import case_metrics, summarize

SPACING = (1.5, 1.0, 2.0)


def _hand_checked_pair() -> tuple[np.ndarray, np.ndarray]:
    """Ground truth and prediction on a (10, 10, 4) grid with known Dice and HD95.

    - class 2: a 4×4×2 box, predicted one voxel (1 mm) further along axis 1;
      overlap 4×3×2 = 24 of 32 + 32 voxels → Dice 0.75, HD95 1 mm.
    - class 3: a one-voxel slab at axis-0 index 2, predicted at index 5: Dice 0,
      every surface point 3 voxels × 1.5 mm = 4.5 mm away.
    - class 4: in the ground truth only (missed): Dice 0, HD95 the diagonal.
    - class 9: in the prediction only (extra): not scored.
    """
    gt = np.zeros((10, 10, 4), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[2:6, 2:6, 0:2] = 2
    pred[2:6, 3:7, 0:2] = 2
    gt[2, 7:10, :] = 3
    pred[5, 7:10, :] = 3
    gt[0, 0:3, :] = 4
    pred[9, 7:10, 2:] = 9
    return pred, gt


def test_case_metrics_match_hand_computed_values() -> None:
    pred, gt = _hand_checked_pair()
    result = case_metrics(pred, gt, SPACING, case_id="hand")
    diagonal = math.sqrt(15.0**2 + 10.0**2 + 8.0**2)
    assert result.case_id == "hand"
    assert result.classes == (2, 3, 4)
    assert result.dice[2] == pytest.approx(0.75)
    assert result.dice[3] == pytest.approx(0.0)
    assert result.dice[4] == pytest.approx(0.0)
    assert result.hd95[2] == pytest.approx(1.0)
    assert result.hd95[3] == pytest.approx(4.5)
    assert result.hd95[4] == pytest.approx(diagonal)
    assert result.missed == (4,)
    assert result.extra == (9,)
    assert result.mean_dice == pytest.approx(0.25)
    assert result.mean_hd95 == pytest.approx((1.0 + 4.5 + diagonal) / 3)


def test_perfect_prediction_scores_one_and_zero() -> None:
    _, gt = _hand_checked_pair()
    result = case_metrics(torch.from_numpy(gt), gt, SPACING)
    assert result.mean_dice == pytest.approx(1.0)
    assert result.mean_hd95 == pytest.approx(0.0)
    assert result.missed == () and result.extra == ()


def test_partial_ground_truth_scores_only_painted_classes() -> None:
    pred, gt = _hand_checked_pair()
    result = case_metrics(pred, gt, SPACING, painted=[2, 7])
    assert result.classes == (2,)
    assert result.mean_dice == pytest.approx(0.75)


def test_class_ids_restrict_scoring() -> None:
    pred, gt = _hand_checked_pair()
    result = case_metrics(pred, gt, SPACING, class_ids=[3, 4])
    assert result.classes == (3, 4)
    assert result.mean_dice == pytest.approx(0.0)


def test_empty_ground_truth_gives_nan_means() -> None:
    empty = np.zeros((4, 4, 2), dtype=np.int64)
    result = case_metrics(empty, empty, (1, 1, 1))
    assert result.classes == ()
    assert math.isnan(result.mean_dice) and math.isnan(result.mean_hd95)
    assert result.to_dict()["mean_dice"] is None


def test_bad_inputs_are_rejected() -> None:
    pred, gt = _hand_checked_pair()
    with pytest.raises(ValueError, match="differs"):
        case_metrics(pred[:5], gt, SPACING)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(pred, gt, (1.0, 1.0))
    with pytest.raises(ValueError, match="integer"):
        case_metrics(pred + 0.5, gt, SPACING)


def test_summarize_gives_mean_and_sample_sd_per_class() -> None:
    pred, gt = _hand_checked_pair()
    first = case_metrics(pred, gt, SPACING, case_id="a")
    second = case_metrics(gt, gt, SPACING, case_id="b")
    empty = case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), (1, 1, 1), case_id="c")
    summary = summarize([first, second, empty])
    assert summary.n_cases == 2
    assert summary.mean_dice == pytest.approx((0.25 + 1.0) / 2)
    assert summary.sd_dice == pytest.approx(np.std([0.25, 1.0], ddof=1))
    assert summary.per_class[2].n == 2
    assert summary.per_class[2].mean_dice == pytest.approx(0.875)
    assert summary.per_class[4].mean_hd95 == pytest.approx(
        (math.sqrt(15.0**2 + 10.0**2 + 8.0**2) + 0.0) / 2
    )
    data = summary.to_dict()
    assert set(data["per_class"]) == {"2", "3", "4"}
    assert summarize([second]).sd_dice == 0.0


def _stacked_vertebrae() -> np.ndarray:
    """Five 'vertebrae' L1..L5 (ids 6..2) stacked along axis 0, 3 voxels each, gaps of 1."""
    gt = np.zeros((20, 6, 4), dtype=np.int64)
    for index, class_id in enumerate((6, 5, 4, 3, 2)):
        gt[index * 4 : index * 4 + 3, 1:5, :] = class_id
    return gt


def test_mask_shifted_by_one_level_finds_the_spine_but_names_no_level() -> None:
    gt = _stacked_vertebrae()
    shifted = np.where(gt > 0, gt + 1, 0)  # every level named one higher: L1 -> T12 ...
    result = case_metrics(shifted, gt, SPACING)
    assert result.spine_dice == pytest.approx(1.0)
    assert result.level_accuracy == pytest.approx(0.0)
    assert not result.all_levels_right
    assert result.mean_dice == pytest.approx(0.0)


def test_level_accuracy_counts_structures_named_by_majority() -> None:
    gt = _stacked_vertebrae()
    pred = gt.copy()
    pred[0:1, 1:5, :] = 5  # a third of L1 painted L2: L1 still named right by majority
    pred[12:15, 1:3, :] = 0  # half of L4 missed: the rest is still L4
    pred[16:19, 1:5, :] = 3  # L5 painted entirely as L4
    result = case_metrics(pred, gt, SPACING)
    assert result.level_named == {2: False, 3: True, 4: True, 5: True, 6: True}
    assert result.level_accuracy == pytest.approx(0.8)
    missed_everywhere = case_metrics(np.zeros_like(gt), gt, SPACING)
    assert missed_everywhere.level_accuracy == pytest.approx(0.0)
    assert math.isnan(missed_everywhere.spine_dice) is False and missed_everywhere.spine_dice == 0.0


def test_level_ties_count_against_the_structure() -> None:
    gt = np.zeros((4, 4, 1), dtype=np.int64)
    gt[:, :2] = 3
    pred = gt.copy()
    pred[:2, :2] = 4  # half L4, half L3: not named right
    assert case_metrics(pred, gt, (1.0, 1.0, 1.0)).level_named == {3: False}


def test_summary_pools_structures_and_counts_cases_with_every_level_right() -> None:
    gt = _stacked_vertebrae()
    perfect = case_metrics(gt, gt, SPACING, case_id="perfect")
    shifted = case_metrics(np.where(gt > 0, gt + 1, 0), gt, SPACING, case_id="shifted")
    one_wrong = gt.copy()
    one_wrong[gt == 2] = 3
    partly = case_metrics(one_wrong, gt, SPACING, case_id="partly")
    summary = summarize([perfect, shifted, partly])
    assert summary.level_accuracy == pytest.approx((5 + 0 + 4) / 15)
    assert summary.cases_all_levels_right == 1
    assert summary.mean_spine_dice == pytest.approx(1.0)
    assert summary.to_dict()["cases_all_levels_right"] == 1


def test_spine_dice_is_unknown_for_a_partial_ground_truth() -> None:
    gt = _stacked_vertebrae()
    result = case_metrics(gt, gt, SPACING, painted=[4])
    assert math.isnan(result.spine_dice)
    assert result.level_named == {4: True}
