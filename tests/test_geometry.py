"""The one image-vs-mask geometry check: shape, orientation, affine within a tolerance."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cps4_engine.errors import CPS4Error
from cps4_engine.geometry import AFFINE_TOLERANCE_MM, Grid, check_same_grid, grid_difference
from cps4_engine.io import read_volume, write_volume
from cps4_engine.synthetic import generate_case

AFFINE = np.array([[0.0, 0.0, -3.5, 20.0], [0.0, -0.6, 0.0, 40.0], [-0.6, 0.0, 0.0, 60.0], [0, 0, 0, 1.0]])


def _pair(tmp_path: Path, mask_affine: np.ndarray, shape: tuple[int, int, int] = (8, 9, 5)) -> tuple[Path, Path]:
    image = write_volume(tmp_path / "image.nii.gz", np.zeros((8, 9, 5), np.float32), AFFINE)
    mask = write_volume(tmp_path / "mask.nii.gz", np.zeros(shape, np.uint8), mask_affine)
    return image, mask


def test_same_grid_passes_and_float32_rounding_is_tolerated(tmp_path: Path) -> None:
    image, mask = _pair(tmp_path, AFFINE + 1e-5)
    check_same_grid(image, mask)
    check_same_grid(read_volume(image), read_volume(mask, kind="label"))
    assert grid_difference(Grid.of(image), Grid.of(nib.load(mask))) is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a + np.pad(np.array([[0, 0, 0, 10.0]] * 3), ((0, 1), (0, 0))), "origin 17.3 mm away"),
        (lambda a: a @ np.diag([1.0, 1.0, -1.0, 1.0]), "orientation"),
        (lambda a: a @ np.diag([1.0, 1.0, 1.5, 1.0]), "spacing or direction"),
        (lambda a: a + np.pad(np.array([[0, 0, 0, 2 * AFFINE_TOLERANCE_MM]]), ((0, 3), (0, 0))), "origin"),
    ],
    ids=["shifted", "mirrored", "other-spacing", "just-beyond-tolerance"],
)
def test_mismatch_is_one_line_naming_both_files(tmp_path: Path, change, message: str) -> None:
    image, mask = _pair(tmp_path, change(AFFINE.copy()))
    with pytest.raises(CPS4Error, match=message) as error:
        check_same_grid(image, mask, what="prediction")
    text = str(error.value)
    assert "\n" not in text and str(image) in text and text.startswith(f"{mask}: prediction affine")


def test_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    image, mask = _pair(tmp_path, AFFINE, shape=(8, 9, 6))
    with pytest.raises(CPS4Error, match="mask shape 8x9x6 differs from image shape 8x9x5"):
        check_same_grid(image, mask)


def test_a_mirrored_phantom_mask_is_refused_in_memory() -> None:
    image, label, affine = generate_case(3)
    mirrored = Grid(label.shape, affine @ np.diag([-1.0, 1.0, 1.0, 1.0]))
    check_same_grid(Grid(image.shape, affine), Grid(label.shape, affine))
    with pytest.raises(CPS4Error, match="orientation .* \\(mirrored or permuted axes\\)") as error:
        check_same_grid(Grid(image.shape, affine), mirrored)
    assert str(error.value).startswith("the mask in memory: ")
