"""Evaluation of label files and folders against a hand-checked case, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cps4_engine.errors import CPS4Error
from cps4_engine.evaluate import case_key, case_name, evaluate, format_table, match_cases
from cps4_engine.io import write_volume

AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])


def _hand_checked(tmp_path):
    """Two cases on an (8, 8, 3) grid, 2 × 1 × 1 mm voxels.

    case1: class 2 GT 4×4×1 = 16 voxels, prediction the left half of it (8 voxels):
    Dice 2·8 / (8 + 16) = 2/3. class 11 GT 2×2×1 predicted exactly: Dice 1.
    Mean 5/6.
    case2: class 2 predicted exactly (Dice 1), class 3 missed (Dice 0): mean 1/2.
    """
    gt1 = np.zeros((8, 8, 3), np.uint8)
    gt1[0:4, 0:4, 1] = 2
    gt1[5:7, 5:7, 1] = 11
    pred1 = np.zeros_like(gt1)
    pred1[0:4, 0:2, 1] = 2
    pred1[5:7, 5:7, 1] = 11
    gt2 = np.zeros_like(gt1)
    gt2[1:3, 1:3, 0] = 2
    gt2[5:7, 1:3, 2] = 3
    pred2 = np.where(gt2 == 2, 2, 0).astype(np.uint8)
    for folder, first, second in (("Mask", gt1, gt2), ("pred", pred1, pred2)):
        (tmp_path / folder).mkdir()
    write_volume(tmp_path / "Mask" / "mask_case1.nii.gz", gt1, AFFINE)
    write_volume(tmp_path / "Mask" / "mask_case2.nii.gz", gt2, AFFINE)
    write_volume(tmp_path / "Mask" / "mask_case3.nii.gz", gt2, AFFINE)
    write_volume(tmp_path / "pred" / "Case1_labels.nii.gz", pred1, AFFINE)
    write_volume(tmp_path / "pred" / "Case2_labels.nii.gz", pred2, AFFINE)
    return tmp_path / "pred", tmp_path / "Mask"


def test_case_keys_match_predict_output_to_dataset_masks() -> None:
    assert case_key("Case3_labels.nii.gz") == case_key("mask_case3.nii.gz") == "case3"
    assert case_key("spine_001_0000_labels.nii.gz") == case_key("spine_001.nii") == "spine_001"
    assert case_key("sub-01_seg.nii.gz") == "sub-01"
    assert case_name("mask_Case3.nii.gz") == "Case3"
    assert case_key("case11_img_labels.nii.gz") == case_key("case11_seg.nii.gz") == "case11"


def test_folders_are_scored_against_hand_computed_dice(tmp_path) -> None:
    pred, gt = _hand_checked(tmp_path)
    write_volume(pred / "Case1_confidence.nii.gz", np.ones((8, 8, 3), np.float32), AFFINE)
    result = evaluate(pred, tmp_path)
    assert [case.case_id for case in result.cases] == ["case1", "case2"]
    assert result.unmatched_gt == ["case3"]
    first, second = result.cases
    assert first.dice == pytest.approx({2: 2 / 3, 11: 1.0})
    assert second.dice == pytest.approx({2: 1.0, 3: 0.0})
    assert second.missed == (3,)
    assert result.summary.mean_dice == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert result.summary.per_class[2].mean_dice == pytest.approx((2 / 3 + 1) / 2)
    # the diagonal fallback uses the spacing: (16 mm, 8 mm, 3 mm)
    assert second.hd95[3] == pytest.approx(np.sqrt(16**2 + 8**2 + 3**2))
    table = format_table(result, {2: "L5", 3: "L4", 11: "L5/S"})
    assert "L5/S" in table
    mean_row = next(line for line in table.splitlines() if line.startswith("mean"))
    assert mean_row.split()[2] == f"{100 * (5 / 6 + 1 / 2) / 2:.1f}"
    assert table.splitlines()[-1].startswith("levels named right:")
    json.dumps(result.to_dict())


def test_single_files_and_partial_masks(tmp_path) -> None:
    pred, gt = _hand_checked(tmp_path)
    (gt / "mask_case2.cps4.json").write_text(json.dumps({"painted": [2], "complete": False}))
    result = evaluate(pred / "Case2_labels.nii.gz", gt / "mask_case2.nii.gz")
    assert result.cases[0].classes == (2,)
    assert result.summary.mean_dice == pytest.approx(1.0)


def test_class_restriction(tmp_path) -> None:
    pred, gt = _hand_checked(tmp_path)
    result = evaluate(pred, gt, class_ids=[11])
    assert [case.classes for case in result.cases] == [(11,), ()]
    assert result.summary.n_cases == 1


def test_errors_name_the_file(tmp_path) -> None:
    pred, gt = _hand_checked(tmp_path)
    with pytest.raises(CPS4Error, match="not found"):
        match_cases(tmp_path / "nothing", gt)
    with pytest.raises(CPS4Error, match="not a file and a folder"):
        match_cases(pred / "Case1_labels.nii.gz", gt)
    write_volume(pred / "Case9_labels.nii.gz", np.zeros((8, 8, 3), np.uint8), AFFINE)
    with pytest.raises(CPS4Error, match="Case9_labels.nii.gz"):
        match_cases(pred, gt)
    (pred / "Case9_labels.nii.gz").unlink()
    write_volume(pred / "Case1_labels.nii.gz", np.zeros((8, 8, 4), np.uint8), AFFINE)
    with pytest.raises(CPS4Error, match="shape"):
        evaluate(pred, gt)
    write_volume(pred / "Case1_labels.nii.gz", np.zeros((8, 8, 3), np.uint8), np.eye(4))
    with pytest.raises(CPS4Error, match="spacing"):
        evaluate(pred, gt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CPS4Error, match="no predicted"):
        match_cases(empty, gt)
    with pytest.raises(CPS4Error, match="no ground-truth"):
        match_cases(pred, empty)


def test_real_disc_masks_in_a_mixed_folder(realdata, tmp_path) -> None:
    from cps4_engine.io import read_volume

    truth = read_volume(realdata / "ivd_t2" / "case11_seg.nii.gz", kind="label")
    shifted = np.zeros_like(truth.array)
    shifted[1:] = truth.array[:-1]
    write_volume(tmp_path / "case11_img_labels.nii.gz", shifted, truth.affine)
    result = evaluate(tmp_path, realdata / "ivd_t2")
    assert result.unmatched_gt == ["case20"]
    (case,) = result.cases
    assert case.classes == (11, 12, 13, 14, 15)
    assert all(0.5 < case.dice[c] < 1.0 for c in case.classes)
    # a 1-voxel shift along a 1 mm axis moves every boundary by at most 1 mm
    assert all(0.9 <= case.hd95[c] <= 1.0 + 1e-6 for c in case.classes)


def test_the_table_reports_level_naming_beside_dice(tmp_path) -> None:
    from cps4_engine.evaluate import evaluate, format_table

    gt = np.zeros((12, 4, 3), dtype=np.uint8)
    for index, class_id in enumerate((4, 3, 2)):
        gt[index * 4 : index * 4 + 3] = class_id
    affine = np.eye(4)
    write_volume(tmp_path / "gt" / "mask_case1.nii.gz", gt, affine)
    write_volume(tmp_path / "pred" / "Case1_labels.nii.gz", np.where(gt > 0, gt + 1, 0).astype(np.uint8), affine)
    result = evaluate(tmp_path / "pred", tmp_path / "gt")
    assert result.summary.level_accuracy == 0.0
    assert result.summary.mean_spine_dice == pytest.approx(1.0)
    table = format_table(result)
    assert "levels named right: 0.0 % of structures; every level right in 0 of 1 cases" in table
    assert "spine Dice (all foreground as one) 100.0 ± 0.0 %" in table
