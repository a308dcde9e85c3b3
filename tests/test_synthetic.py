"""Synthetic spine phantoms: determinism, label set, anatomical order, geometry, speed."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from cps4_engine.errors import CPS4Error
from cps4_engine.io import axis_codes, read_volume, to_sagittal, voxel_spacing
from cps4_engine.synthetic import case_seed, generate_case, sample_volume, write_synthetic_dataset

SEEDS = range(6)


@pytest.fixture(scope="module")
def phantoms():
    return {seed: generate_case(seed) for seed in SEEDS}


def test_same_seed_same_case_different_seed_different(phantoms):
    image, label, affine = generate_case(3)
    np.testing.assert_array_equal(image, phantoms[3][0])
    np.testing.assert_array_equal(label, phantoms[3][1])
    np.testing.assert_array_equal(affine, phantoms[3][2])
    assert phantoms[0][0].shape != phantoms[1][0].shape or not np.array_equal(phantoms[0][0], phantoms[1][0])
    sample = sample_volume(seed=0)
    np.testing.assert_array_equal(sample[1], phantoms[0][1])


def test_shapes_spacing_and_dtypes(phantoms):
    for image, label, affine in phantoms.values():
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert image.shape == label.shape and image.ndim == 3
        codes = axis_codes(affine)
        sagittal = next(i for i, code in enumerate(codes) if code in "LR")
        spacing = voxel_spacing(affine)
        assert 12 <= image.shape[sagittal] <= 18
        assert 3.5 <= spacing[sagittal] <= 5.0
        in_plane = [axis for axis in range(3) if axis != sagittal]
        assert all(1.0 <= spacing[axis] <= 1.6 for axis in in_plane)
        slices = to_sagittal(image, affine)
        assert slices.shape[1] <= 160 and slices.shape[2] <= 128
        assert np.array_equal(affine, affine.astype(np.float32).astype(np.float64))
        assert image.min() >= 0 and image.max() > 500


def test_layouts_vary(phantoms):
    layouts = {axis_codes(affine) for _, _, affine in phantoms.values()}
    assert len(layouts) >= 3
    assert any(axis_codes(affine)[2] not in "LR" for _, _, affine in phantoms.values())


def test_label_set_and_visible_levels_vary(phantoms):
    top_levels = set()
    for _, label, _ in phantoms.values():
        present = set(np.unique(label).tolist())
        assert present <= set(range(20))
        assert {0, 1, 2, 3, 4, 5, 11, 12, 13, 14} <= present
        top_levels.add(max(c for c in present if c <= 10))
    assert len(top_levels) >= 3
    assert min(top_levels) <= 7 and max(top_levels) >= 9


def _world_centroids(label, affine):
    centroids = {}
    for class_id in np.unique(label):
        if class_id == 0:
            continue
        index = np.argwhere(label == class_id).mean(axis=0)
        centroids[int(class_id)] = affine[:3, :3] @ index + affine[:3, 3]
    return centroids


def test_anatomical_order_in_world_coordinates(phantoms):
    for _, label, affine in phantoms.values():
        height = {c: xyz[2] for c, xyz in _world_centroids(label, affine).items()}
        vertebrae = [c for c in range(1, 11) if c in height]
        assert min(height, key=height.get) == 1
        assert [height[c] for c in vertebrae] == sorted(height[c] for c in vertebrae)
        for disc in range(11, 20):
            below, above = disc - 10, disc - 9
            if disc in height and below in height and above in height:
                assert height[below] < height[disc] < height[above]
        highest_vertebra = max(vertebrae, key=height.get)
        assert highest_vertebra == max(vertebrae)


def test_foreground_spans_several_slices_and_csf_is_bright(phantoms):
    for image, label, affine in phantoms.values():
        slices, masks = to_sagittal(image, affine), to_sagittal(label, affine)
        assert (masks.reshape(masks.shape[0], -1) > 0).any(axis=1).sum() >= 5
        # T2 contrast: CSF in the canal (background in the mask) outshines vertebral marrow
        vertebrae = slices[(masks >= 1) & (masks <= 10)].mean()
        assert np.percentile(slices[masks == 0], 99.5) > 1.2 * vertebrae


def test_generation_is_fast():
    start = time.perf_counter()
    for seed in (10, 11):
        generate_case(seed)
    assert (time.perf_counter() - start) / 2 < 0.5


def test_dataset_files_byte_identical_and_readable(tmp_path):
    first = write_synthetic_dataset(tmp_path / "a", cases=2, seed=7)
    second = write_synthetic_dataset(tmp_path / "b", cases=2, seed=7)
    for (image_a, mask_a), (image_b, mask_b) in zip(first, second):
        assert image_a.read_bytes() == image_b.read_bytes()
        assert mask_a.read_bytes() == mask_b.read_bytes()
    assert [p.name for p, _ in first] == ["Case1.nii.gz", "Case2.nii.gz"]
    assert [p.name for _, p in first] == ["mask_case1.nii.gz", "mask_case2.nii.gz"]
    image, label, affine = generate_case(case_seed(7, 1))
    volume = read_volume(first[1][0])
    np.testing.assert_array_equal(volume.array, image)
    np.testing.assert_array_equal(volume.affine, affine)
    np.testing.assert_array_equal(read_volume(first[1][1], kind="label").array, label)
    manifest = json.loads((tmp_path / "a" / "synthetic.json").read_text())
    assert manifest["seed"] == 7 and manifest["cases"] == 2
    write_synthetic_dataset(tmp_path / "a", cases=1, seed=7)
    assert first[0][0].read_bytes() == second[0][0].read_bytes()


def test_refuses_foreign_folder_and_bad_counts(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(CPS4Error, match="not empty"):
        write_synthetic_dataset(tmp_path, cases=1, seed=0)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(CPS4Error, match="--cases"):
        write_synthetic_dataset(tmp_path / "new", cases=0, seed=0)
    with pytest.raises(CPS4Error, match="--seed"):
        write_synthetic_dataset(tmp_path / "new", cases=1, seed=-1)
