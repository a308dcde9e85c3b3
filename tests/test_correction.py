"""Spine-aware correction tools and the vertebra/disc order check on constructed volumes."""

from __future__ import annotations

import numpy as np
import pytest

from cps4_engine.active.correction import (
    check_order,
    relabel_component,
    shift_levels,
    spine_levels,
    swap_classes,
)
from cps4_engine.errors import CPS4Error
from cps4_engine.labels import mrspineseg_scheme

SCHEME = mrspineseg_scheme()
S, L5, L4, L3, L2, L1, T12, T11, T10, T9 = range(1, 11)
D_L5S, D_L4L5, D_L3L4, D_L2L3, D_L1L2 = range(11, 16)


def stacked_spine(levels: list[int], depth: int = 4) -> np.ndarray:
    """A (6, 6, Z) volume with one slab per class along axis 2, first entry lowest.

    With the identity affine, voxel axis 2 is world z, i.e. superior; each slab is
    ``depth`` voxels thick and separated from the next by one background voxel.
    """
    volume = np.zeros((6, 6, len(levels) * (depth + 1) + 1), dtype=np.uint8)
    for index, class_id in enumerate(levels):
        start = 1 + index * (depth + 1)
        volume[1:5, 1:5, start : start + depth] = class_id
    return volume


def test_spine_levels_follow_mrspineseg_order() -> None:
    vertebrae, discs = spine_levels(SCHEME)
    assert vertebrae == list(range(1, 11))
    assert discs == list(range(11, 20))


def test_shift_up_renames_every_level_and_keeps_background() -> None:
    labels = stacked_spine([S, D_L5S, L5, D_L4L5, L4])
    shifted = shift_levels(labels, +1, SCHEME)
    assert shifted.dtype == labels.dtype
    np.testing.assert_array_equal(shifted == 0, labels == 0)
    for before, after in [(S, L5), (D_L5S, D_L4L5), (L5, L4), (D_L4L5, D_L3L4), (L4, L3)]:
        np.testing.assert_array_equal(shifted == after, labels == before)


def test_shift_down_then_up_is_identity() -> None:
    labels = stacked_spine([L5, D_L4L5, L4, D_L3L4, L3])
    down = shift_levels(labels, -1, SCHEME)
    assert set(np.unique(down)) == {0, S, D_L5S, L5, D_L4L5, L4}
    np.testing.assert_array_equal(shift_levels(down, +1, SCHEME), labels)


def test_shift_refuses_to_push_a_present_class_off_either_end() -> None:
    with pytest.raises(CPS4Error, match="S vertebra|sacrum|no level below"):
        shift_levels(stacked_spine([S, L5]), -1, SCHEME)
    with pytest.raises(CPS4Error, match="no level above"):
        shift_levels(stacked_spine([T10, T9]), +1, SCHEME)
    with pytest.raises(CPS4Error, match="no level above"):
        shift_levels(stacked_spine([L2, 19]), +1, SCHEME)
    shifted = shift_levels(stacked_spine([L2, L1]), +2, SCHEME)
    assert set(np.unique(shifted)) == {0, T12, T11}


def test_shift_rejects_values_outside_the_scheme() -> None:
    labels = stacked_spine([L4])
    labels[0, 0, 0] = 42
    with pytest.raises(CPS4Error, match="42"):
        shift_levels(labels, 1, SCHEME)


def test_swap_classes_exchanges_exactly_two_classes() -> None:
    labels = stacked_spine([L5, L4, L3])
    swapped = swap_classes(labels, L5, L3, SCHEME)
    np.testing.assert_array_equal(swapped == L3, labels == L5)
    np.testing.assert_array_equal(swapped == L5, labels == L3)
    np.testing.assert_array_equal(swapped == L4, labels == L4)
    assert labels[2, 2, 2] == L5, "the input must not be modified"
    with pytest.raises(CPS4Error, match="two different"):
        swap_classes(labels, L4, L4, SCHEME)
    with pytest.raises(CPS4Error, match="99"):
        swap_classes(labels, L4, 99, SCHEME)


def test_relabel_component_changes_only_the_seeded_piece() -> None:
    labels = stacked_spine([L3, L3, L2])
    relabelled = relabel_component(labels, (2, 2, 7), L4, SCHEME)
    assert (relabelled[:, :, 6:10] == L4).sum() == 16 * 4
    assert (relabelled == L3).sum() == 16 * 4, "the other L3 piece stays"
    assert (relabelled == L2).sum() == (labels == L2).sum()
    erased = relabel_component(labels, (2, 2, 12), 0, SCHEME)
    assert not (erased == L2).any()


def test_relabel_component_refuses_background_and_outside_seeds() -> None:
    labels = stacked_spine([L3])
    with pytest.raises(CPS4Error, match="background"):
        relabel_component(labels, (0, 0, 0), L4, SCHEME)
    with pytest.raises(CPS4Error, match="outside"):
        relabel_component(labels, (0, 0, 99), L4, SCHEME)
    with pytest.raises(CPS4Error, match="new class"):
        relabel_component(labels, (2, 2, 2), 77, SCHEME)


def test_check_order_passes_a_correct_spine() -> None:
    labels = stacked_spine([S, D_L5S, L5, D_L4L5, L4, D_L3L4, L3])
    report = check_order(labels, np.eye(4), SCHEME)
    assert report.ok, str(report)
    assert report.heights_mm[L3] > report.heights_mm[L4] > report.heights_mm[S]
    assert "no problem" in str(report)


def test_check_order_reports_a_gap() -> None:
    report = check_order(stacked_spine([L5, L4, L2]), np.eye(4), SCHEME)
    gaps = report.of_kind("gap")
    assert [issue.classes for issue in gaps] == [(L3,)]
    assert "L3 vertebra" in gaps[0].message


def test_check_order_reports_duplicates_but_not_specks() -> None:
    labels = stacked_spine([L4, L3, L4])
    labels[0, 0, 0] = L3  # a one-voxel speck, below the size threshold
    report = check_order(labels, np.eye(4), SCHEME)
    duplicates = report.of_kind("duplicate")
    assert [issue.classes for issue in duplicates] == [(L4,)]
    assert "2 separate pieces" in duplicates[0].message


def test_check_order_reports_swapped_vertebrae() -> None:
    report = check_order(stacked_spine([L5, L3, L4]), np.eye(4), SCHEME)
    assert [issue.classes for issue in report.of_kind("misordered")] == [(L4, L3)]
    assert "L3 vertebra lies below L4 vertebra" in report.of_kind("misordered")[0].message


def test_check_order_reports_a_disc_outside_its_vertebrae() -> None:
    report = check_order(stacked_spine([L5, L4, D_L4L5, L3]), np.eye(4), SCHEME)
    problems = report.of_kind("disc_position")
    assert [issue.classes for issue in problems] == [(D_L4L5, L4)]
    assert "not below L4 vertebra" in problems[0].message


def test_check_order_uses_the_affine_not_the_voxel_axes() -> None:
    """The same spine stored upside down along voxel axis 0 gives the same verdicts."""
    upright = stacked_spine([L5, D_L4L5, L4, D_L3L4, L3])
    # voxel axis 0 runs superior -> inferior (orientation code I), spacing 4 mm
    stored = np.transpose(upright, (2, 1, 0))[::-1].copy()
    affine = np.array(
        [[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [-4.0, 0.0, 0.0, 80.0], [0, 0, 0, 1]]
    )
    assert check_order(stored, affine, SCHEME).ok
    swapped = swap_classes(stored, L5, L3, SCHEME)
    report = check_order(swapped, affine, SCHEME)
    assert report.of_kind("misordered") and report.of_kind("disc_position")
    with pytest.raises(CPS4Error, match="4x4"):
        check_order(stored, np.eye(3), SCHEME)


def test_real_vertebral_body_masks_are_in_order(realdata) -> None:
    """A manual L1–L5 mask passes the check; swapping two levels is caught."""
    from cps4_engine.io import read_volume

    volume = read_volume(realdata / "vb3_l1l5_t1" / "case01_seg.nii.gz", kind="label")
    report = check_order(volume.array, volume.affine, SCHEME)
    assert not report.of_kind("gap") and not report.of_kind("misordered"), str(report)
    assert report.heights_mm[L1] > report.heights_mm[L3] > report.heights_mm[L5]
    swapped = check_order(swap_classes(volume.array, L2, L4, SCHEME), volume.affine, SCHEME)
    assert {issue.classes for issue in swapped.of_kind("misordered")} == {(L4, L3), (L3, L2)}
    shifted = check_order(shift_levels(volume.array, -1, SCHEME), volume.affine, SCHEME)
    assert not shifted.of_kind("misordered") and shifted.heights_mm[S] == report.heights_mm[L5]
