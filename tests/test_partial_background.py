"""Partial masks teach background away from the spine, and nothing along it.

The rule (:func:`cps4_engine.preprocess.mark_known_background`): unpainted voxels inside
the spine column (painted footprint, projected along superior-inferior, widened by the
margin) are unknown; every other unpainted voxel is background. Both stages read it
through :func:`~cps4_engine.preprocess.known_pixels` and
:func:`~cps4_engine.preprocess.ce_targets`; :func:`cps4_engine.data.load_case` marks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cps4_engine.data import Case, load_case
from cps4_engine.io import write_volume
from cps4_engine.preprocess import (
    IGNORE_INDEX,
    UNKNOWN_LABEL,
    ce_targets,
    class_validity,
    known_pixels,
    mark_known_background,
)
from cps4_engine.stage1 import batch_validity
from cps4_engine.stage2 import supervised_loss

# Voxel axes (I, P, L) at 1 mm, as the real vb3 files: axis 0 superior->inferior, axis 1
# anterior->posterior, axis 2 across the body.
AFFINE_IPL = np.array([[0, 0, 1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def spine_mask() -> np.ndarray:
    """(I, P, L) = (100, 140, 40) mask at 1 mm: L1, L2, L3, L4 stacked, each 1 mm more posterior."""
    mask = np.zeros((100, 140, 40), dtype=np.uint8)
    for number, (top, class_id) in enumerate([(10, 6), (30, 5), (50, 4), (70, 3)]):
        mask[top : top + 15, 60 + number : 80 + number, 15:25] = class_id
    return mask


def test_unpainted_vertebra_below_the_painted_ones_stays_unknown() -> None:
    mask = spine_mask()
    painted_only = np.where(mask == 3, 0, mask)  # L4 not painted
    marked = mark_known_background(painted_only, AFFINE_IPL, margin_mm=30.0)
    assert marked.dtype == np.int16 and marked.shape == mask.shape
    assert np.array_equal(marked[painted_only > 0], mask[painted_only > 0])  # painted ids kept
    assert np.all(marked[mask == 3] == UNKNOWN_LABEL)  # L4: nobody painted it, not background
    assert marked[99, 70, 20] == UNKNOWN_LABEL  # the column runs to the volume's inferior end
    # The painted footprint spans anterior-posterior rows 60..81; 30 mm beyond is unknown.
    assert marked[50, 30, 20] == UNKNOWN_LABEL and marked[50, 29, 20] == 0
    assert marked[5, 111, 20] == UNKNOWN_LABEL and marked[5, 112, 20] == 0
    assert np.all(marked[:, 60:82, 0] == UNKNOWN_LABEL)  # 15 mm across: inside


def test_margin_is_in_millimetres_and_exact_at_the_edge() -> None:
    mask = np.zeros((20, 80, 40), dtype=np.uint8)
    mask[5:10, 40, 20] = 4  # one line of L3 at anterior-posterior row 40, across 20
    affine = AFFINE_IPL.copy()
    affine[:3, 1] *= 2.0  # 2 mm anterior-posterior voxels
    marked = mark_known_background(mask, affine, margin_mm=30.0)
    assert marked[0, 40 + 15, 20] == UNKNOWN_LABEL and marked[0, 40 + 16, 20] == 0  # 30 vs 32 mm
    assert marked[0, 40 - 15, 20] == UNKNOWN_LABEL and marked[0, 40 - 16, 20] == 0
    assert marked[0, 40 + 12, 20 + 18] == UNKNOWN_LABEL  # sqrt(24^2 + 18^2) = 30 mm
    assert marked[0, 40 + 12, 20 + 19] == 0  # 30.6 mm
    with pytest.raises(ValueError, match="margin_mm"):
        mark_known_background(mask, affine, margin_mm=-1.0)


def test_the_column_follows_the_affine_not_the_voxel_axes() -> None:
    mask = spine_mask()
    painted_only = np.where(mask == 3, 0, mask)
    marked = mark_known_background(painted_only, AFFINE_IPL)
    # The same anatomy stored with voxel axes (L, P, I) must mark the same voxels.
    transposed = np.transpose(painted_only, (2, 1, 0))
    affine_lpi = AFFINE_IPL[:, [2, 1, 0, 3]]
    assert np.array_equal(np.transpose(mark_known_background(transposed, affine_lpi), (2, 1, 0)), marked)


def test_nothing_painted_knows_nothing_and_far_voxels_are_background() -> None:
    empty = np.zeros((10, 10, 10), dtype=np.uint8)
    assert np.all(mark_known_background(empty, AFFINE_IPL) == UNKNOWN_LABEL)
    mask = spine_mask()
    marked = mark_known_background(np.where(mask == 3, 0, mask), AFFINE_IPL, margin_mm=5.0)
    known_background = marked == 0
    assert 0.3 < known_background.mean() < 0.95
    assert not np.any(known_background & (mask > 0))


def test_load_case_marks_partial_masks_only(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((100, 140, 40)).astype(np.float32)
    write_volume(tmp_path / "img.nii.gz", image, AFFINE_IPL)
    mask = spine_mask()
    write_volume(tmp_path / "seg.nii.gz", mask, AFFINE_IPL)
    _, complete = load_case(Case("c", tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz"))
    assert np.array_equal(complete.array, mask)
    write_volume(tmp_path / "part.nii.gz", np.where(mask == 3, 0, mask).astype(np.uint8), AFFINE_IPL)
    (tmp_path / "part.cps4.json").write_text(json.dumps({"painted": [4, 5, 6], "complete": False}))
    _, partial = load_case(Case("c", tmp_path / "img.nii.gz", tmp_path / "part.nii.gz", painted=(4, 5, 6)))
    assert partial.array.dtype == np.int16
    assert np.all(partial.array[mask == 3] == UNKNOWN_LABEL)
    assert (partial.array == 0).sum() > 0


def test_known_pixels_and_targets_of_a_marked_row() -> None:
    labels = torch.tensor([[[4, 0, UNKNOWN_LABEL]]])  # painted L3, known background, unknown
    partial = torch.tensor([True])
    painted = torch.zeros(1, 20, dtype=torch.bool)
    painted[0, 4] = True
    validity = known_pixels(labels, partial, painted, unknown=UNKNOWN_LABEL)
    assert validity.shape == (1, 20, 1, 3)
    assert validity[0, :, 0, 0].all() and validity[0, :, 0, 1].all()
    assert validity[0, :, 0, 2].tolist() == [c == 4 for c in range(20)]
    assert ce_targets(labels, partial, unknown=UNKNOWN_LABEL).tolist() == [[[4, 0, IGNORE_INDEX]]]
    # A complete row knows everything; a raw partial mask (unknown=0) knows no background.
    assert known_pixels(labels.clamp(min=0), torch.tensor([False]), painted).all()
    raw = class_validity(np.array([[[4, 0]]]), (4,), 20)
    assert raw[0, :, 0, 1].tolist() == [c == 4 for c in range(20)]


def test_stage1_reads_the_marked_rule() -> None:
    labels = torch.tensor([[[4, 0, UNKNOWN_LABEL]], [[0, 0, 0]]])
    validity = batch_validity(labels, [(4,), None], 20)
    assert validity[0, 0].tolist() == [[True, True, False]]  # background: known where marked
    assert validity[0, 4].all() and validity[1].all()


def test_supervised_loss_teaches_background_only_where_it_is_known() -> None:
    labels = torch.full((1, 8, 8), UNKNOWN_LABEL, dtype=torch.int64)
    labels[0, 2:5, 2:5] = 4  # painted L3
    labels[0, :, 7] = 0  # known background, far from the spine
    partial = torch.tensor([True])
    painted = torch.zeros(1, 20, dtype=torch.bool)
    painted[0, 4] = True
    big = 20.0

    def logits_with(unknown_class: int, background_class: int) -> torch.Tensor:
        logits = torch.zeros(1, 20, 8, 8)
        logits[0, 4][labels[0] == 4] = big
        logits[0, unknown_class][labels[0] == UNKNOWN_LABEL] = big
        logits[0, background_class][labels[0] == 0] = big
        return logits

    right = float(sum(supervised_loss(logits_with(2, 0), labels, partial, painted)))
    unknown_as_background = float(sum(supervised_loss(logits_with(0, 0), labels, partial, painted)))
    background_as_l5 = float(sum(supervised_loss(logits_with(2, 2), labels, partial, painted)))
    assert right < 1e-3 and unknown_as_background < 1e-3  # unknown pixels: any unpainted class
    assert background_as_l5 > 1.0  # spine where background is known costs loss
