"""The one geometry check wherever an image meets a mask or a prediction.

A mask (or a prediction, or a heat map) belongs to an image only when both sit on the
same voxel grid in the same place of the scanner: the same voxel shape, the same
orientation (the anatomical direction each voxel axis runs towards) and the same affine
to within :data:`AFFINE_TOLERANCE_MM`. A mask shifted by 10 mm or mirrored left-right
has the right shape and would train, import or score silently wrong, so every caller
that pairs two volumes calls :func:`check_same_grid` first::

    from cps4_engine.geometry import check_same_grid
    check_same_grid(image, mask, what="mask")            # Volume, nibabel image, path or Grid

A mismatch is one :class:`~cps4_engine.errors.CPS4Error` line naming both files and what
differs, e.g. ``Mask/mask_case3.nii.gz: mask affine differs from the image's: origin
10 mm away (image MR/Case3.nii.gz)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cps4_engine.errors import CPS4Error
from cps4_engine.io import axis_codes, read_header

#: Largest difference (mm) allowed between two affines' entries. NIfTI stores affines as
#: float32, so a grid rewritten by another tool moves by ~1e-5 mm; a real misregistration
#: is a voxel or more.
AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape, voxel-to-world affine and the file it came from."""

    shape: tuple[int, ...]
    affine: np.ndarray
    path: Path | None = None

    @classmethod
    def of(cls, source: Any) -> "Grid":
        """The grid of a :class:`Grid`, a :class:`~cps4_engine.io.Volume`, a nibabel image
        (anything with ``shape`` and ``affine``) or a NIfTI path (only the header is read)."""
        if isinstance(source, Grid):
            return source
        if isinstance(source, (str, Path)):
            header = read_header(source)
            return cls(tuple(header.shape), header.affine, Path(source))
        path = getattr(source, "path", None) or getattr(source, "file_path", None)
        shape = tuple(int(n) for n in source.shape[:3])
        return cls(shape, np.asarray(source.affine, dtype=np.float64), Path(path) if path else None)


def _name(grid: Grid, fallback: str) -> str:
    return str(grid.path) if grid.path is not None else f"the {fallback} in memory"


def grid_difference(
    reference: Grid, other: Grid, what: str = "mask", reference_what: str = "image",
    tolerance_mm: float = AFFINE_TOLERANCE_MM,
) -> str | None:
    """What differs between two grids, in a few words, or None when they match."""
    if tuple(reference.shape[:3]) != tuple(other.shape[:3]):
        return (f"{what} shape {'x'.join(map(str, other.shape[:3]))} differs from {reference_what} shape "
                f"{'x'.join(map(str, reference.shape[:3]))}")
    affine = f"{what} affine differs from the {reference_what}'s"
    codes = axis_codes(other.affine, other.path), axis_codes(reference.affine, reference.path)
    if codes[0] != codes[1]:
        return f"{affine}: orientation {','.join(codes[0])} vs {','.join(codes[1])} (mirrored or permuted axes)"
    difference = np.abs(np.asarray(other.affine, np.float64) - np.asarray(reference.affine, np.float64))
    if difference[:3, 3].max() > tolerance_mm:
        return f"{affine}: origin {np.linalg.norm(other.affine[:3, 3] - reference.affine[:3, 3]):.3g} mm away"
    if difference[:3, :3].max() > tolerance_mm:
        return f"{affine}: voxel axes (spacing or direction) differ by up to {difference[:3, :3].max():.3g} mm"
    return None


def check_same_grid(
    reference: Any, other: Any, *, what: str = "mask", reference_what: str = "image",
    tolerance_mm: float = AFFINE_TOLERANCE_MM,
) -> None:
    """Refuse ``other`` (a mask, prediction ...) unless it lies on ``reference``'s grid.

    Args:
        reference: the image (a Volume, nibabel image, Grid, or a NIfTI path).
        other: the volume that must match it (same kinds).
        what: what ``other`` is, for the message (``"mask"``, ``"prediction"``).
        reference_what: what ``reference`` is (``"image"``, ``"ground truth"``).
        tolerance_mm: largest allowed difference of affine entries.

    Raises:
        CPS4Error: one line naming both files and what differs (shape, orientation,
            origin, spacing/direction).
    """
    reference_grid, other_grid = Grid.of(reference), Grid.of(other)
    difference = grid_difference(reference_grid, other_grid, what, reference_what, tolerance_mm)
    if difference is not None:
        raise CPS4Error(
            f"{difference} ({reference_what} {_name(reference_grid, reference_what)})",
            path=_name(other_grid, what),
        )
