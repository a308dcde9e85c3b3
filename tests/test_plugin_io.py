"""The plugin's NIfTI reader and writer: layer kinds, geometry, round trips, refusals."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cps4_engine.errors import CPS4Error
from cps4_engine.io import read_volume, write_volume
from napari_cps4._layers import AFFINE_KEY, SOURCE_KEY
from napari_cps4._reader import get_reader, kind_from_name, read_nifti
from napari_cps4._writer import write_labels

# A scanner-like affine: voxel axes (I, P, L), anisotropic spacing, an offset origin.
AFFINE = np.array(
    [
        [0.0, 0.0, -4.0, 30.0],
        [0.0, -1.25, 0.0, 20.0],
        [-1.5, 0.0, 0.0, 80.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _image() -> np.ndarray:
    return np.random.default_rng(0).normal(100, 20, size=(24, 16, 5)).astype(np.float32)


def _labels() -> np.ndarray:
    labels = np.zeros((24, 16, 5), dtype=np.uint8)
    labels[2:8, 3:10, 1:4] = 4
    labels[10:13, 3:10, 1:4] = 13
    return labels


def test_reader_claims_only_nifti(tmp_path: Path) -> None:
    assert get_reader(str(tmp_path / "a.nii.gz")) is read_nifti
    assert get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.NII.GZ")]) is read_nifti
    assert get_reader(str(tmp_path / "a.tif")) is None
    assert get_reader([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.png")]) is None


def test_kind_follows_file_and_folder_names() -> None:
    assert kind_from_name(Path("Mask/mask_case3.nii.gz")) == "labels"
    assert kind_from_name(Path("x/case01_seg.nii.gz")) == "labels"
    assert kind_from_name(Path("labelsTr/spine_001.nii.gz")) == "labels"
    assert kind_from_name(Path("MR/Case3.nii.gz")) == "image"
    assert kind_from_name(Path("x/case01_img.nii.gz")) == "image"
    assert kind_from_name(Path("x/volume.nii.gz")) is None


def test_image_layer_is_scaled_and_keeps_geometry(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "MR" / "Case1.nii.gz", _image(), AFFINE)
    [(data, attributes, kind)] = read_nifti(str(path))
    assert kind == "image"
    assert data.shape == (24, 16, 5)
    np.testing.assert_allclose(attributes["scale"], (1.5, 1.25, 4.0))
    np.testing.assert_allclose(attributes["metadata"][AFFINE_KEY], AFFINE)
    assert attributes["metadata"][SOURCE_KEY] == str(path)


def test_unnamed_integer_volume_with_class_ids_becomes_labels(tmp_path: Path) -> None:
    labels_path = write_volume(tmp_path / "volume.nii.gz", _labels(), AFFINE)
    image_path = write_volume(tmp_path / "other.nii.gz", (_image() * 3).astype(np.int16), AFFINE)
    [(labels, attributes, kind), (_, _, image_kind)] = read_nifti([str(labels_path), str(image_path)])
    assert kind == "labels"
    assert image_kind == "image"
    assert attributes["features"].set_index("index").loc[4, "class"] == "L3 vertebra"
    colormap = attributes["colormap"]
    assert colormap.color_dict[0][3] == 0.0
    assert colormap.color_dict[4][3] == 1.0
    assert not np.allclose(colormap.color_dict[4], colormap.color_dict[13])


def test_labels_round_trip_keeps_affine_and_values(tmp_path: Path) -> None:
    source = write_volume(tmp_path / "case_seg.nii.gz", _labels(), AFFINE)
    [(data, attributes, kind)] = read_nifti(str(source))
    assert kind == "labels"
    data = data.copy()
    data[15:18, 3:10, 1:4] = 3
    [written] = write_labels(str(tmp_path / "out" / "edited"), data, attributes)
    assert written.endswith("edited.nii.gz")
    volume = read_volume(written, kind="label")
    np.testing.assert_array_equal(volume.array, data)
    np.testing.assert_allclose(volume.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(nib.load(written).affine, AFFINE, atol=1e-5)


def test_writer_refuses_layers_without_geometry(tmp_path: Path) -> None:
    with pytest.raises(CPS4Error, match="no source geometry"):
        write_labels(str(tmp_path / "x.nii.gz"), _labels(), {"name": "painted", "metadata": {}})
    assert not (tmp_path / "x.nii.gz").exists()


def test_writer_refuses_negative_or_2d_labels(tmp_path: Path) -> None:
    meta = {"name": "m", "metadata": {AFFINE_KEY: AFFINE}}
    with pytest.raises(CPS4Error, match="3"):
        write_labels(str(tmp_path / "x.nii.gz"), np.zeros((4, 4), dtype=np.int32), meta)
    with pytest.raises(CPS4Error, match="non-negative"):
        write_labels(str(tmp_path / "x.nii.gz"), -np.ones((4, 4, 4), dtype=np.int32), meta)


def test_reader_reports_broken_files_in_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken_seg.nii.gz"
    broken.write_bytes(b"not a nifti at all")
    with pytest.raises(CPS4Error) as info:
        read_nifti(str(broken))
    assert str(broken) in str(info.value)
    assert "\n" not in str(info.value)


def test_real_case_opens_as_image_and_labels_with_its_geometry(realdata: Path, tmp_path: Path) -> None:
    image_path = realdata / "vb3_l1l5_t1" / "case01_img.nii.gz"
    label_path = realdata / "vb3_l1l5_t1" / "case01_seg.nii.gz"
    (image, image_attributes, image_kind), (labels, label_attributes, label_kind) = read_nifti(
        [str(image_path), str(label_path)]
    )
    assert (image_kind, label_kind) == ("image", "labels")
    assert image.shape == labels.shape == (224, 224, 77)
    np.testing.assert_allclose(image_attributes["scale"], (1.0, 1.0, 1.0))
    np.testing.assert_allclose(image_attributes["metadata"][AFFINE_KEY], nib.load(image_path).affine)
    assert set(np.unique(labels)) == {0, 2, 3, 4, 5, 6}
    [written] = write_labels(str(tmp_path / "copy.nii.gz"), labels, label_attributes)
    copy = read_volume(written, kind="label")
    np.testing.assert_array_equal(copy.array, labels)
    assert copy.orientation == ("I", "P", "L")
