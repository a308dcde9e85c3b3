"""NIfTI reading/writing with geometry, sagittal slicing, atomic saves and bad files."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from _bad_nifti import flip_bytes, nifti_with
from cps4_engine.errors import CPS4Error
from cps4_engine.io import (
    Volume,
    atomic_write,
    from_sagittal,
    header_notes,
    nifti_stem,
    read_volume,
    sagittal_spacing,
    to_sagittal,
    write_volume,
)
from cps4_engine.labels import mrspineseg_scheme


def _marker_volume(shape=(6, 7, 5)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int32).reshape(shape)


def _affine(permutation, signs, spacing=(1.0, 2.0, 3.0)) -> np.ndarray:
    """Voxel axis i points along world axis permutation[i] with sign signs[i]."""
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, (world, sign) in enumerate(zip(permutation, signs)):
        affine[world, axis] = sign * spacing[axis]
    affine[:3, 3] = (10.0, -20.0, 30.0)
    return affine


def _world(affine, index):
    return affine[:3, :3] @ np.asarray(index, dtype=float) + affine[:3, 3]


PERMUTATIONS = [(0, 1, 2), (2, 1, 0), (1, 2, 0), (2, 0, 1)]
SIGNS = [(1, 1, 1), (-1, 1, -1), (1, -1, 1), (-1, -1, -1)]


@pytest.mark.parametrize("permutation", PERMUTATIONS)
@pytest.mark.parametrize("signs", SIGNS)
def test_sagittal_display_orientation_and_exact_inverse(permutation, signs):
    affine = _affine(permutation, signs)
    volume = Volume(_marker_volume(), affine)
    slices = to_sagittal(volume.array, affine)
    assert volume.sagittal_axis == permutation.index(0)
    assert slices.shape[0] == volume.shape[volume.sagittal_axis]
    value_index = {int(v): idx for idx, v in np.ndenumerate(volume.array)}

    def world_of(s, row, col):
        return _world(affine, value_index[int(slices[s, row, col])])

    # rows go superior -> inferior (world z decreases), columns anterior -> posterior (y decreases)
    assert world_of(0, 0, 0)[2] > world_of(0, 1, 0)[2]
    assert world_of(0, 0, 0)[1] > world_of(0, 0, 1)[1]
    # one slice lies in one sagittal plane (constant world x)
    xs = {round(world_of(1, r, c)[0], 6) for r in range(slices.shape[1]) for c in range(slices.shape[2])}
    assert len(xs) == 1
    restored = from_sagittal(np.array(slices), affine, volume.shape)
    np.testing.assert_array_equal(restored, volume.array)
    assert sagittal_spacing(affine)[0] == pytest.approx(volume.spacing[volume.sagittal_axis])


def test_oblique_affine_uses_the_nearest_axis():
    angle = np.deg2rad(15)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ _affine((2, 1, 0), (1, -1, 1))[:3, :3]
    volume = Volume(_marker_volume(), affine)
    assert volume.sagittal_axis == 2
    np.testing.assert_array_equal(from_sagittal(volume.sagittal(), affine, volume.shape), volume.array)


def test_from_sagittal_rejects_wrong_shape():
    affine = _affine((0, 1, 2), (1, 1, 1))
    with pytest.raises(ValueError, match="expected"):
        from_sagittal(np.zeros((2, 2, 2)), affine, (6, 7, 5))


def test_write_read_keeps_array_affine_and_is_deterministic(tmp_path):
    affine = _affine((2, 0, 1), (-1, 1, -1), spacing=(0.75, 1.25, 4.0))
    array = (np.arange(6 * 7 * 5).reshape(6, 7, 5) % 19).astype(np.int64)
    first = write_volume(tmp_path / "a.nii.gz", array, affine)
    second = write_volume(tmp_path / "b.nii.gz", array, affine)
    assert first.read_bytes() == second.read_bytes()
    volume = read_volume(first, kind="label")
    np.testing.assert_array_equal(volume.array, array)
    assert volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.affine, affine)
    assert volume.spacing == pytest.approx((0.75, 1.25, 4.0))
    assert volume.orientation == ("I", "R", "P")
    assert not list(tmp_path.glob(".tmp-*"))


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "config.json"
    with atomic_write(target) as tmp:
        tmp.write_text(json.dumps({"v": 1}))
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert json.loads(target.read_text()) == {"v": 1}
    assert list(target.parent.iterdir()) == [target]


def test_nifti_stem():
    assert nifti_stem("/x/mask_case3.nii.gz") == "mask_case3"
    assert nifti_stem("img.NII") == "img"


def test_four_d_with_trailing_singleton_is_squeezed(tmp_path):
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 3, 1), np.float32), np.eye(4)), path)
    assert read_volume(path).shape == (4, 5, 3)


def _one_line(error: pytest.ExceptionInfo, path) -> str:
    text = str(error.value)
    assert "\n" not in text
    assert str(path) in text
    return text


def test_missing_file(tmp_path):
    path = tmp_path / "absent.nii.gz"
    with pytest.raises(CPS4Error, match="not found") as error:
        read_volume(path)
    _one_line(error, path)


def test_non_nifti_extension(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(CPS4Error, match="not a NIfTI") as error:
        read_volume(path)
    _one_line(error, path)


def test_garbage_with_nifti_name(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(CPS4Error, match="not a readable NIfTI") as error:
        read_volume(path)
    _one_line(error, path)


def test_truncated_gzip(tmp_path):
    whole = tmp_path / "whole.nii.gz"
    write_volume(whole, np.random.default_rng(0).random((20, 20, 10)).astype(np.float32), np.eye(4))
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    with pytest.raises(CPS4Error, match="truncated|not a readable") as error:
        read_volume(path)
    _one_line(error, path)


@pytest.mark.parametrize("shape", [(8, 9), (4, 5, 3, 2)])
def test_wrong_dimensions(tmp_path, shape):
    path = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    with pytest.raises(CPS4Error, match="expected a 3D volume") as error:
        read_volume(path)
    _one_line(error, path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_intensities(tmp_path, bad):
    array = np.ones((4, 4, 3), np.float32)
    array[1, 2, 0] = bad
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    with pytest.raises(CPS4Error, match="1 voxels are NaN or infinite") as error:
        read_volume(path)
    _one_line(error, path)


def test_non_integer_labels(tmp_path):
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), 1.5, np.float32), np.eye(4)), path)
    with pytest.raises(CPS4Error, match="non-integer") as error:
        read_volume(path, kind="label")
    _one_line(error, path)
    float_ids = tmp_path / "ids.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), 3.0, np.float32), np.eye(4)), float_ids)
    labels = read_volume(float_ids, kind="label").array
    assert labels.dtype == np.uint8 and int(labels.max()) == 3


def test_singular_affine():
    affine = np.eye(4)
    affine[2, 2] = 0
    with pytest.raises(CPS4Error, match="singular"):
        Volume(np.zeros((3, 3, 3)), affine, path="flat.nii").sagittal_axis


def test_write_rejects_bad_name_and_shape(tmp_path):
    with pytest.raises(CPS4Error, match=r"\.nii"):
        write_volume(tmp_path / "out.png", np.zeros((2, 2, 2)), np.eye(4))
    with pytest.raises(CPS4Error, match="3D"):
        write_volume(tmp_path / "out.nii", np.zeros((2, 2)), np.eye(4))


def test_every_real_case_round_trips(realdata, tmp_path):
    index = json.loads((realdata / "index.json").read_text())
    count = 0
    for subset in index.values():
        for case in subset["cases"]:
            for kind in ("image", "label"):
                source = read_volume(realdata / case[kind], kind=kind)
                assert list(source.shape) == case["shape"]
                assert source.orientation == ("I", "P", "L")
                assert source.sagittal_axis == 2
                copy = write_volume(tmp_path / "copy.nii", source.array, source.affine)
                back = read_volume(copy, kind=kind)
                assert back.array.dtype == source.array.dtype
                np.testing.assert_array_equal(back.array, source.array)
                np.testing.assert_array_equal(back.affine, source.affine)
                if kind == "label":
                    assert set(np.unique(source.array)) - {0} == set(case["labels"])
            count += 1
    assert count == sum(len(subset["cases"]) for subset in index.values())


# ----- header validation at read time (issue 13) -------------------------------------

SAGITTAL_LAST = np.array([[0.0, 0, -4.0, 0], [0, -1.0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 1]])  # I, P, L


def _volume(dtype=np.int16) -> np.ndarray:
    return (np.arange(6 * 7 * 5) % 19).reshape(6, 7, 5).astype(dtype)


@pytest.mark.parametrize(
    "fields, shape, message",
    [
        ({"sform_code": 0, "qform_code": 0}, None, "no usable sform or qform"),
        ({"vox_offset": 0}, None, "vox_offset 0 points inside the header"),
        ({"vox_offset": 100}, None, "vox_offset 100 points inside the header"),
        ({"srow_z": [0.0, 0.0, 0.0, 0.0]}, None, "sform is singular"),
        ({"srow_x": [np.nan, 0.0, 0.0, 0.0]}, None, "sform holds NaN"),
        ({"sform_code": 0, "pixdim": [1, 1, 0, 4, 1, 1, 1, 1]}, None, "qform voxel spacing .* 1, 0, 4"),
        ({"sform_code": 0, "pixdim": [1, -1, 1, 4, 1, 1, 1, 1]}, None, "must be positive"),
        ({"sform_code": 0, "quatern_b": np.inf}, None, "qform holds NaN"),
        ({}, (6, 0, 5), "dimension of 0"),
        ({}, (30000, 30000, 30000), "more than this machine's"),
        ({"scl_slope": 1e38}, None, "beyond 32-bit floats"),
    ],
    ids=["no-sform-qform", "vox-offset-0", "vox-offset-100", "singular-sform", "nan-sform",
         "qform-pixdim-0", "qform-pixdim-negative", "inf-quaternion", "dimension-0", "huge", "scl-slope-1e38"],
)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_bad_headers_are_refused_in_one_line(tmp_path, fields, shape, message, suffix):
    path = nifti_with(tmp_path / f"bad{suffix}", _volume(), SAGITTAL_LAST, shape=shape, **fields)
    with pytest.raises(CPS4Error, match=message) as error:
        read_volume(path)
    _one_line(error, path)


def test_qform_only_header_reads_its_geometry_and_is_noted(tmp_path):
    path = nifti_with(tmp_path / "qform.nii.gz", _volume(), SAGITTAL_LAST, sform_code=0)
    volume = read_volume(path)
    assert volume.orientation == ("I", "P", "L") and volume.sagittal_axis == 2
    np.testing.assert_allclose(volume.affine, SAGITTAL_LAST, atol=1e-6)
    assert header_notes(path) == ["geometry from the qform (code 1); the sform is unset"]
    assert header_notes(write_volume(tmp_path / "plain.nii.gz", _volume(), SAGITTAL_LAST)) == []


def test_flipped_bytes_fail_the_gzip_crc(tmp_path):
    path = write_volume(tmp_path / "scan.nii.gz", np.random.default_rng(0).integers(0, 2928, (40, 40, 12)).astype(np.int16), SAGITTAL_LAST)
    size = path.stat().st_size
    flip_bytes(path, size // 2, 16)
    with pytest.raises(CPS4Error, match="corrupt|truncated") as error:
        read_volume(path)
    _one_line(error, path)


@pytest.mark.parametrize("dtype, value", [(np.int64, 2**33 + 3), (np.uint32, 2**32 - 5), (np.int32, -1)])
def test_label_values_are_never_wrapped_into_class_ids(tmp_path, dtype, value):
    labels = np.zeros((6, 7, 5), dtype=dtype)
    labels[1, 1, 1] = value
    path = nifti_with(tmp_path / "seg.nii.gz", labels, SAGITTAL_LAST)
    with pytest.raises(CPS4Error, match=f"{value}") as error:
        read_volume(path, kind="label")
    _one_line(error, path)


def test_wide_integer_labels_are_narrowed_and_checked_against_the_scheme(tmp_path):
    labels = np.zeros((6, 7, 5), dtype=np.int64)
    labels[1, 1, 1] = 4
    path = nifti_with(tmp_path / "seg.nii.gz", labels, SAGITTAL_LAST)
    read = read_volume(path, kind="label", scheme=mrspineseg_scheme())
    assert read.array.dtype == np.uint8 and int(read.array.max()) == 4
    labels[1, 1, 1] = 25
    nifti_with(path, labels, SAGITTAL_LAST)
    with pytest.raises(CPS4Error, match="25 are outside"):
        read_volume(path, kind="label", scheme=mrspineseg_scheme())
