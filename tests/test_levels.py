"""The 3D level step on constructed volumes: mixed labels, missing levels, discs, orientation."""

from __future__ import annotations

import numpy as np
import pytest

from cps4_engine.labels import mrspineseg_scheme
from cps4_engine.levels import disc_neighbours, level_steps, make_levels_consistent, spine_levels

SCHEME = mrspineseg_scheme()
L1, L2, L3, L4, L5, S = 6, 5, 4, 3, 2, 1
# Voxel axis 0 runs superior -> inferior (world z = -i), as in ../shared/realdata.
INFERIOR_AXIS0 = np.array([[0.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0, 0, 0, 1]])


def _spine(levels=(L1, L2, L3, L4, L5), with_discs: bool = False) -> np.ndarray:
    """Vertebral bodies 7 voxels tall every 10 voxels from the top; discs in the gaps."""
    labels = np.zeros((70, 10, 8), dtype=np.uint8)
    for index, class_id in enumerate(levels):
        labels[5 + index * 10 : 12 + index * 10, 2:8, :] = class_id
        if with_discs and index + 1 < len(levels):
            labels[13 + index * 10 : 14 + index * 10, 2:8, :] = 10 + levels[index + 1]
    return labels


def test_scheme_anatomy_orders_levels_and_names_disc_neighbours() -> None:
    vertebrae, discs = spine_levels(SCHEME)
    assert vertebrae == list(range(1, 11)) and discs == list(range(11, 20))
    assert disc_neighbours(SCHEME)[12] == (L4, L5)
    assert disc_neighbours(SCHEME)[11] == (L5, S)


def test_a_vertebra_with_mixed_labels_gets_one_label() -> None:
    labels = _spine()
    labels[25:32, 2:8, :3] = L4  # L3's body painted L4 in three of its eight sagittal slices
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, _spine())
    assert report.changed_voxels == 7 * 6 * 3
    assert [entry[4] for entry in report.structures] == [L5, L4, L3, L2, L1]


def test_a_missing_level_is_kept_missing_not_renumbered() -> None:
    labels = _spine()
    labels[25:32] = 0  # L3 not segmented
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, labels)
    assert report.changed_voxels == 0
    assert level_steps([0.0, 10.0, 30.0, 40.0]) == [0, 1, 3, 4]


def test_a_level_named_twice_is_renamed_counting_from_the_caudal_end() -> None:
    labels = _spine()
    labels[labels == L3] = L4  # L3 and L4 both called L4; L5 at the caudal end anchors the count
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, _spine())
    assert report.anchor == "caudal"


def test_without_the_caudal_end_the_count_most_voxels_agree_with_wins() -> None:
    labels = _spine(levels=(L1, L2, L3, L4))  # no L5 or sacrum in view
    labels[15:22][labels[15:22] == L2] = L3  # L2 called L3: a duplicate
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, _spine(levels=(L1, L2, L3, L4)))
    assert report.anchor == "vote"


def test_specks_become_background() -> None:
    labels = _spine()
    labels[0, 0, 0] = 9  # one voxel of "T10" far from the spine
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    assert fixed[0, 0, 0] == 0 and report.removed_voxels == 1


def test_discs_take_the_level_between_their_vertebrae() -> None:
    labels = _spine(with_discs=True)
    truth = labels.copy()
    labels[labels == 13] = 14  # the L3/L4 disc called L2/L3
    fixed, _ = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, truth)


@pytest.mark.parametrize("axes", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_the_superior_axis_comes_from_the_affine_whatever_the_voxel_order(axes: tuple[int, int, int]) -> None:
    labels = _spine()
    labels[25:32, 2:8, :3] = L4
    moved = np.transpose(labels, axes)
    affine = np.eye(4)
    affine[:3, :3] = INFERIOR_AXIS0[:3, :3][:, list(axes)]
    fixed, _ = make_levels_consistent(moved, affine, SCHEME)
    np.testing.assert_array_equal(fixed, np.transpose(_spine(), axes))


def test_a_fragment_below_l5_does_not_shift_the_count() -> None:
    labels = _spine()
    labels[65:67, 4:6, 2:4] = L5  # a few voxels of the sacrum painted L5, below the real L5
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, _spine())
    assert report.removed_voxels == 2 * 2 * 2


def _life_size_spine() -> np.ndarray:
    """L1..L5 bodies 25 mm tall every 35 mm (1 mm voxels), as on the real vb3 volumes."""
    labels = np.zeros((185, 40, 8), dtype=np.uint8)
    for index, class_id in enumerate((L1, L2, L3, L4, L5)):
        labels[5 + index * 35 : 30 + index * 35, 5:35, :] = class_id
    return labels


def test_two_fused_bodies_with_labels_mixed_across_slices_are_cut_at_their_waist() -> None:
    """L4 and L5 fused by a bridge through their disc space, and in half the sagittal slices
    painted one level low (L5 on L4, S on L5): no label separates them, their shape does."""
    labels = _life_size_spine()
    labels[135:145, 15:22, :] = L4  # a bridge a quarter as wide as the bodies closes the L4/L5 gap
    labels[110:135, 5:35, :3] = L5  # L4's body painted L5 in three of its eight slices
    labels[145:170, 5:35, :3] = S  # L5's body painted S in the same slices
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    assert [entry[4] for entry in report.structures] == [L5, L4, L3, L2, L1]
    assert report.anchor == "caudal"
    assert set(np.unique(fixed[150:170, 5:35])) == {L5} and set(np.unique(fixed[110:130, 5:35])) == {L4}


def test_a_tall_single_body_is_not_cut() -> None:
    labels = _life_size_spine()
    labels[138:145, 5:35, :] = L5  # L5 a quarter again as tall as the others (a tilted body), no waist
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    assert [entry[4] for entry in report.structures] == [L5, L4, L3, L2, L1]
    np.testing.assert_array_equal(fixed, labels)


def test_a_body_whose_upper_part_is_painted_the_next_level_stays_one_level() -> None:
    labels = _life_size_spine()
    labels[145:152, 5:35, :] = L4  # the top 7 mm of L5 painted L4 in every slice
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, _life_size_spine())
    assert [entry[4] for entry in report.structures] == [L5, L4, L3, L2, L1]


def test_fused_pairs_are_cut_even_when_most_structures_are_fused() -> None:
    """L1+L2 and L4+L5 each fused (three components, two of them double): the median
    structure is a fused pair, yet both pairs are cut and every level is named."""
    labels = _life_size_spine()
    labels[135:145, 15:22, :] = L5  # bridge L4-L5
    labels[30:40, 15:22, :] = L2  # bridge L1-L2
    labels[5:30, 5:35, :3] = L2  # L1 painted L2 in three slices
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    assert [entry[4] for entry in report.structures] == [L5, L4, L3, L2, L1]
    assert set(np.unique(fixed[10:25, 5:35])) == {L1} and set(np.unique(fixed[115:130, 5:35])) == {L4}


T12 = 7


@pytest.mark.parametrize(
    ("rows", "columns", "kept_as"),
    [
        # 1 x 6 x 4 = 24 voxels (7 % of a body, a speck by size) in the top plane: a T12 the
        # field of view cuts, painted L1; kept and named the level above L1.
        (slice(0, 1), slice(2, 8), T12),
        # The same 24 voxels at the inferior end: a fragment, not a level.
        (slice(69, 70), slice(2, 8), None),
        # 1 x 1 x 4 = 4 voxels (1.2 %) in the top plane: a speck even at the edge.
        (slice(0, 1), slice(2, 3), None),
        # 1 x 2 x 4 = 8 voxels (2.4 %) in the top plane: the edge keeps it.
        (slice(0, 1), slice(2, 4), T12),
    ],
)
def test_a_small_body_cut_by_the_superior_end_of_the_view_is_a_level(rows: slice, columns: slice, kept_as: int | None) -> None:
    labels = _spine()
    labels[rows, columns, :4] = L1
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    expected = _spine()
    if kept_as is not None:
        expected[rows, columns, :4] = kept_as
    np.testing.assert_array_equal(fixed, expected)
    size = (rows.stop - rows.start) * (columns.stop - columns.start) * 4
    assert report.removed_voxels == (0 if kept_as is not None else size)


def test_two_bodies_fused_with_no_waist_are_cut_in_two() -> None:
    """L4 and L5 painted L4 through their disc space at full width: one structure twice as
    long as a body, no waist and no second label; it is cut in the middle, every level named."""
    labels = _life_size_spine()
    labels[110:170, 5:35, :] = L4
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    assert [entry[4] for entry in report.structures] == [L5, L4, L3, L2, L1]
    assert set(np.unique(fixed[145:170, 5:35])) == {L5} and set(np.unique(fixed[110:135, 5:35])) == {L4}


T11, T10, T9 = 8, 9, 10


def _thoracolumbar_spine(bodies: list[tuple[int, int]]) -> np.ndarray:
    """Bodies ``(label, height in mm)`` from the top, 1 mm voxels, 7 mm discs left empty."""
    labels = np.zeros((5 + sum(height + 7 for _, height in bodies), 40, 8), dtype=np.uint8)
    top = 5
    for class_id, height in bodies:
        labels[top : top + height, 5:35, :] = class_id
        top += height + 7
    return labels


def test_a_fused_thoracic_pair_is_cut_though_shorter_than_two_lumbar_bodies() -> None:
    """T12 and T11 (15 mm each) painted one label through their disc: 37 mm, under 1.6 times
    the 25 mm median of this view (lumbar bodies dominate it) but twice its neighbours."""
    labels = _thoracolumbar_spine([(T9, 15), (T10, 15), (T11, 15), (T12, 15), (L1, 25), (L2, 25), (L3, 25),
                                   (L4, 25), (L5, 25)])
    fused = labels.copy()
    fused[49:86][fused[49:86] == 0] = T12  # rows of T11, the disc below it and T12
    fused[fused == T11] = T12
    fixed, report = make_levels_consistent(fused, INFERIOR_AXIS0, SCHEME)
    assert [entry[4] for entry in report.structures] == [L5, L4, L3, L2, L1, T12, T11, T10, T9]
    assert set(np.unique(fixed[49:62, 5:35])) == {T11} and set(np.unique(fixed[73:86, 5:35])) == {T12}


def test_a_lumbar_body_with_its_disc_painted_on_is_not_cut_in_a_thoracic_view() -> None:
    """L1 with the T12/L1 disc painted L1 (32 mm) is twice this view's median body (four
    15 mm thoracic bodies) but only 1.6 times its neighbours T12 and L2: one body."""
    labels = _thoracolumbar_spine([(T9, 15), (T10, 15), (T11, 15), (T12, 15), (L1, 25), (L2, 25), (L3, 25)])
    labels[86:93, 5:35, :] = L1  # the T12/L1 disc space, just above L1
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    assert [entry[4] for entry in report.structures] == [L3, L2, L1, T12, T11, T10, T9]
    np.testing.assert_array_equal(fixed, labels)


def test_a_body_beside_one_the_view_cuts_stays_one_body() -> None:
    """T12 cut by the top of the view to 2 mm: beside it L1 (25 mm) looks twice as long as
    its neighbours, yet stays one body (its halves would lie too close to be two levels)."""
    labels = _life_size_spine()
    labels[0:2, 5:35, :] = T12
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    assert [entry[4] for entry in report.structures] == [L5, L4, L3, L2, L1, T12]
    np.testing.assert_array_equal(fixed, labels)


def test_a_long_body_with_a_thin_tail_is_not_cut() -> None:
    """L5 with a narrow strip below it (the sacrum painted L5 in a few voxels) is as long as
    two bodies, but the strip is no body: L5 stays one level and the count does not move."""
    labels = np.zeros((230, 40, 8), dtype=np.uint8)
    labels[:185] = _life_size_spine()
    labels[170:215, 17:23, :] = L5
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    assert [entry[4] for entry in report.structures] == [L5, L4, L3, L2, L1]
    assert set(np.unique(fixed[145:215, 5:35])) == {0, L5}


def test_the_sacrum_is_never_cut_however_long() -> None:
    labels = _life_size_spine()
    labels[175:185, 5:35, :] = 0
    sacrum = np.zeros((70, 40, 8), dtype=np.uint8)
    sacrum[5:65, 5:35, :] = S  # 60 mm: as long as two bodies
    labels = np.concatenate([labels[:175], sacrum])
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    assert [entry[4] for entry in report.structures] == [S, L5, L4, L3, L2, L1]
    np.testing.assert_array_equal(fixed, labels)


def _spine_with_caudal_piece(piece_rows: slice, piece_columns: slice, painted_one_up: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(prediction, expected)`` on a life-size L1..L5 spine (pitch 35 mm, bodies 6,000
    voxels) with a piece painted L5 at ``piece_rows`` below L4. ``painted_one_up``: the
    prediction leaves L5 unpainted but for the piece and names every body above it one level
    up (L4 as L5, …, L1 as L2); otherwise L5 is whole and the piece lies below it."""
    truth = np.zeros((215, 40, 8), dtype=np.uint8)
    truth[:185] = _life_size_spine()
    prediction = truth.copy()
    if painted_one_up:
        for class_id in (L5, L4, L3, L2):
            prediction[truth == class_id + 1] = class_id
        prediction[truth == L5] = 0
    prediction[piece_rows, piece_columns, :] = L5
    expected = truth.copy()
    if painted_one_up:
        expected[truth == L5] = 0
        expected[piece_rows, piece_columns, :] = L5
    return prediction, expected


def test_an_l5_left_mostly_unpainted_is_named_from_its_remnant() -> None:
    # 8 x 15 x 8 = 960 voxels (16 % of a body) of L5, centred 1.04 gaps below the next body:
    # the rest of the spine is named one up, as a 2-labeled network named real vb3 case 17.
    prediction, expected = _spine_with_caudal_piece(slice(155, 163), slice(10, 25), painted_one_up=True)
    fixed, report = make_levels_consistent(prediction, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, expected)
    assert report.removed_voxels == 0
    assert [after for *_, after in report.structures] == [L5, L4, L3, L2, L1]


@pytest.mark.parametrize(
    ("piece_rows", "kept"),
    [
        # Centred 0.84 gaps below L5 (the top of the sacrum, behind the L5/S disc): a fragment.
        (slice(183, 191), False),
        # 0.96 gaps below L5: within the range where a part of a missing level lies.
        (slice(187, 195), True),
        # 1.39 gaps below L5: further than a part of the level below would lie.
        (slice(202, 210), False),
    ],
)
def test_a_piece_below_a_whole_l5_is_a_level_only_a_gap_below_it(piece_rows: slice, kept: bool) -> None:
    prediction, expected = _spine_with_caudal_piece(piece_rows, slice(10, 25), painted_one_up=False)
    fixed, report = make_levels_consistent(prediction, INFERIOR_AXIS0, SCHEME)
    if kept:
        assert report.removed_voxels == 0
        assert [after for *_, after in report.structures] == [L5, L4, L3, L2, L1, 7]
    else:
        np.testing.assert_array_equal(fixed, expected)
        assert report.removed_voxels == 8 * 15 * 8


def test_the_top_of_the_sacrum_painted_l5_is_background_and_the_body_above_it_l5() -> None:
    # 13 x 30 x 8 voxels painted L5 behind the L5/S disc, centred 0.7 gaps below L5, and
    # every body above named one level low: a 2-labeled network on vb3 training volumes.
    truth = np.zeros((215, 40, 8), dtype=np.uint8)
    truth[:185] = _life_size_spine()
    prediction = truth.copy()
    for class_id in (L5, L4, L3, L2, L1):
        prediction[truth == class_id] = class_id + 1
    prediction[175:188, 5:35, :] = L5
    fixed, report = make_levels_consistent(prediction, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, truth)
    assert report.anchor == "sacrum"
    assert report.removed_voxels == 13 * 30 * 8


def test_an_l5_close_to_l4_stays_l5() -> None:
    # L5 centred 0.83 gaps below L4, above the closest L5-L4 gap of the vb3, vb2 and
    # phantom masks (0.84-0.90 gaps): a level, not the sacrum.
    labels = _life_size_spine()
    labels[labels == L5] = 0
    labels[139:164, 5:35, :] = L5
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, labels)
    assert report.anchor == "caudal"


def test_a_piece_of_l1_the_view_cuts_beside_l1_joins_it() -> None:
    # 21 x 3 x 8 = 504 voxels (8 %: a speck by size) painted L1 apart from the L1 body, at
    # its height and reaching the top of the view: a part of L1, not a T12 above it.
    labels = _life_size_spine()
    labels[0:21, 36:39, :] = L1
    fixed, report = make_levels_consistent(labels, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, labels)
    assert [after for *_, after in report.structures] == [L5, L4, L3, L2, L1]


@pytest.mark.parametrize(
    ("piece_rows", "sacrum"),
    [
        # 10 x 30 x 8 voxels (40 % of L5) centred 0.84 gaps below an L5 painted L5: the top
        # of the sacrum, as test-time shifts left it on real vb3 dev volumes.
        (slice(182, 192), True),
        # The same piece centred 0.96 gaps below L5: where an L5 remnant may lie, so a level.
        (slice(186, 196), False),
    ],
)
def test_a_small_piece_below_a_body_painted_l5_is_the_sacrum_only_closer_than_a_remnant(
    piece_rows: slice, sacrum: bool
) -> None:
    truth = np.zeros((215, 40, 8), dtype=np.uint8)
    truth[:185] = _life_size_spine()
    prediction = truth.copy()
    prediction[piece_rows, 5:35, :] = L5
    fixed, report = make_levels_consistent(prediction, INFERIOR_AXIS0, SCHEME)
    if sacrum:
        np.testing.assert_array_equal(fixed, truth)
        assert report.anchor == "sacrum"
        assert report.removed_voxels == 10 * 30 * 8
    else:
        assert report.anchor == "caudal"
        assert [after for *_, after in report.structures] == [L5, L4, L3, L2, L1, 7]


def test_an_l5_painted_in_part_below_an_l4_painted_l5_stays_l5() -> None:
    # L5 painted in 10 of its 25 rows (40 % of L4), centred 0.99 gaps below L4, which the
    # network painted L5 too: a 2-labeled network on a real vb3 dev volume. Counting from
    # the caudal L5 names L4 again.
    truth = _life_size_spine()
    prediction = truth.copy()
    prediction[145:170] = 0
    prediction[152:162, 5:35, :] = L5
    prediction[truth == L4] = L5
    expected = truth.copy()
    expected[145:170] = prediction[145:170]
    fixed, report = make_levels_consistent(prediction, INFERIOR_AXIS0, SCHEME)
    np.testing.assert_array_equal(fixed, expected)
    assert report.anchor == "caudal"
