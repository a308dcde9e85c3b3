"""Slicing volumes for the models and putting results back; partial-label targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cps4_engine.io import Volume, read_volume
from cps4_engine.preprocess import (
    IGNORE_INDEX,
    class_validity,
    labels_for_ce,
    prepare_volume,
    restore_labels,
    restore_probabilities,
    restore_soft_labels,
)


def _scanner_affine() -> np.ndarray:
    """Voxel axes (I, P, L) like the real cases, with 1.5 x 1.0 x 4 mm voxels."""
    return np.array([[0, 0, -4.0, 0], [0, -1.0, 0, 0], [-1.5, 0, 0, 0], [0, 0, 0, 1]])


def _blocky_case(shape=(24, 20, 5)):
    """Image with a bright block over its mask (class 3), and class 12 further down."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[4:10, 6:14, :] = 3
    label[14:20, 4:12, 1:4] = 12
    image[label > 0] += 300
    return Volume(image, _scanner_affine()), label


def test_prepare_shapes_ranges_and_orientation():
    volume, label = _blocky_case()
    stack = prepare_volume(volume, (32, 16), label=label)
    assert stack.images.shape == (5, 1, 32, 16) and stack.images.dtype == np.float32
    assert stack.labels.shape == (5, 32, 16) and stack.labels.dtype == np.int64
    assert 0.0 <= stack.images.min() and stack.images.max() <= 1.0
    assert stack.images.max() > 0.95
    assert stack.sagittal_shape == (5, 24, 20)
    assert set(np.unique(stack.labels)) == {0, 3, 12}
    # voxel axis 0 runs inferior, so class 3 (low voxel index 0) is superior: upper rows
    rows_3 = np.nonzero(stack.labels == 3)[1]
    rows_12 = np.nonzero(stack.labels == 12)[1]
    assert rows_3.max() < rows_12.min()
    # the bright block sits on the mask
    assert stack.images[:, 0][stack.labels == 3].mean() > 0.8
    assert stack.images[:, 0][stack.labels == 0].mean() < 0.2


def test_restore_labels_is_exact_at_native_size_and_close_after_resize():
    volume, label = _blocky_case()
    native = prepare_volume(volume, (24, 20), label=label)
    np.testing.assert_array_equal(restore_labels(native, native.labels), label)
    resized = prepare_volume(volume, (48, 40), label=label)
    np.testing.assert_array_equal(restore_labels(resized, torch.as_tensor(resized.labels)), label)
    small = prepare_volume(volume, (16, 16), label=label)
    back = restore_labels(small, small.labels)
    assert back.shape == label.shape
    assert np.mean(back == label) > 0.9


def test_soft_labels_are_exact_at_native_size_and_follow_probabilities_between_pixels():
    volume, label = _blocky_case()
    native = prepare_volume(volume, (24, 20), label=label)
    one_hot = np.stack([(native.labels == c) for c in range(20)], axis=1).astype(np.float32)
    labels, confidence = restore_soft_labels(native, one_hot * 0.9 + 0.005)
    np.testing.assert_array_equal(labels, label)
    assert labels.dtype == np.uint8 and confidence.shape == label.shape
    np.testing.assert_allclose(confidence, 0.905, atol=1e-6)
    # A two-pixel-wide model grid: the boundary between two half-sure classes lands where
    # their resized probabilities cross, between the coarse pixels, not on their staircase.
    ramp = prepare_volume(Volume(np.zeros((1, 4, 1), np.float32), np.eye(4)), (1, 2))
    probabilities = np.zeros((1, 20, 1, 2), np.float32)
    probabilities[0, 3] = [0.9, 0.1]
    probabilities[0, 5] = [0.1, 0.9]
    soft, _ = restore_soft_labels(ramp, probabilities)
    assert soft.shape == (1, 4, 1) and sorted(np.unique(soft).tolist()) == [3, 5]


def test_restore_probabilities_shape_and_values():
    volume, label = _blocky_case()
    stack = prepare_volume(volume, (32, 32), label=label)
    one_hot = np.stack([(stack.labels == c) for c in range(20)], axis=1).astype(np.float32)
    restored = restore_probabilities(stack, one_hot)
    assert restored.shape == (20, 24, 20, 5) and restored.dtype == np.float32
    assert restored.min() >= 0 and restored.max() <= 1
    np.testing.assert_allclose(restored.sum(axis=0), 1.0, atol=1e-5)
    assert np.mean(restored.argmax(axis=0) == label) > 0.95
    with pytest.raises(ValueError, match="expected"):
        restore_probabilities(stack, one_hot[:, :, :16])


def test_mask_shape_mismatch():
    volume, label = _blocky_case()
    with pytest.raises(ValueError, match="differs"):
        prepare_volume(volume, (16, 16), label=label[:-1])


def test_real_case_slices_along_axis_two(realdata):
    image = read_volume(realdata / "ivd_t2" / "case11_img.nii.gz")
    label = read_volume(realdata / "ivd_t2" / "case11_seg.nii.gz", kind="label")
    stack = prepare_volume(image, (128, 128), label=label)
    assert stack.images.shape == (67, 1, 128, 128)
    assert stack.sagittal_shape == (67, 221, 221)
    present = sorted(set(np.unique(stack.labels)) - {0})
    assert present == [11, 12, 13, 14, 15]
    # L1/L2 (15) lies above L5/S (11): smaller row index
    assert np.nonzero(stack.labels == 15)[1].mean() < np.nonzero(stack.labels == 11)[1].mean()
    back = restore_labels(stack, stack.labels)
    assert back.shape == label.shape
    foreground = label.array > 0
    assert np.mean(back[foreground] == label.array[foreground]) > 0.8


LABELS = np.array([[[0, 3, 3], [0, 4, 0], [5, 0, 0]]])


def test_class_validity_complete_is_everywhere():
    validity = class_validity(LABELS, None, 6)
    assert validity.shape == (1, 6, 3, 3) and validity.dtype == bool
    assert validity.all()


def test_class_validity_partial():
    validity = class_validity(LABELS, painted=(3, 5), num_classes=6)
    painted_pixels = LABELS[0] != 0
    for class_id in (3, 5):
        assert validity[0, class_id].all()
    for class_id in (0, 1, 2, 4):
        np.testing.assert_array_equal(validity[0, class_id], painted_pixels)
    as_tensor = class_validity(torch.as_tensor(LABELS), painted=[3, 5], num_classes=6)
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_array_equal(as_tensor.numpy(), validity)


def test_labels_for_ce():
    complete = labels_for_ce(LABELS, None)
    np.testing.assert_array_equal(complete, LABELS)
    partial = labels_for_ce(torch.as_tensor(LABELS), (3, 4, 5))
    assert partial.dtype == torch.int64
    expected = np.where(LABELS == 0, IGNORE_INDEX, LABELS)
    np.testing.assert_array_equal(partial.numpy(), expected)
    assert IGNORE_INDEX == -100


def test_fit_box_keeps_the_aspect_in_millimetres() -> None:
    from cps4_engine.preprocess import fit_box

    assert fit_box((224, 224), (1.0, 1.0), (112, 112)) == (0, 0, 112, 112)
    assert fit_box((200, 100), (1.0, 1.0), (112, 112)) == (0, 28, 112, 56)
    assert fit_box((100, 100), (2.0, 1.0), (112, 112)) == (0, 28, 112, 56)  # rows are 2 mm


def test_letterboxed_labels_come_back_exactly() -> None:
    from cps4_engine.io import Volume
    from cps4_engine.preprocess import prepare_volume, restore_labels

    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    labels = np.zeros((6, 40, 20), dtype=np.int64)
    labels[:, 10:30, 5:15] = 3
    volume = Volume(np.random.default_rng(0).random((6, 40, 20)).astype(np.float32), affine)
    stack = prepare_volume(volume, (80, 80), label=labels, keep_aspect=True)
    top, left, height, width = stack.box()
    # RAS identity: rows run along z (20 mm), columns along y (40 mm), one scale for both
    assert (top, left, height, width) == (20, 0, 40, 80)
    assert (stack.images[:, :, :top] == 0).all() and (stack.images[:, :, top + height :] == 0).all()
    np.testing.assert_array_equal(restore_labels(stack, stack.labels), labels.astype(np.uint8))


def test_context_stacks_neighbours_and_repeats_the_edges() -> None:
    from cps4_engine.preprocess import with_context

    images = np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1) * np.ones((4, 1, 2, 2), np.float32)
    stacked = with_context(images, 1)
    assert stacked.shape == (4, 3, 2, 2)
    assert stacked[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert with_context(images, 0) is images
