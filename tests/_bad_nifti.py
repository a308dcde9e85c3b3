"""Broken NIfTI files, written byte by byte so that no library "fixes" the header first.

:func:`nifti_with` writes a single-file NIfTI-1 whose header fields are set after
nibabel built a correct header, then serialised as raw bytes (header, extension flag,
voxels at byte 352 whatever ``vox_offset`` says), so every field reaches the reader as
written. Shared by ``test_io.py`` and the bad-input catalogue.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

VOXELS_AT = 352


def nifti_with(
    path: Path, array: np.ndarray, affine: np.ndarray, shape: tuple[int, ...] | None = None, **fields: Any
) -> Path:
    """Write ``array`` with header ``fields`` overridden (e.g. ``vox_offset=0``).

    ``shape`` overrides the declared dimensions without changing the voxels written.
    The file is gzip-compressed when ``path`` ends in ``.gz``.
    """
    array = np.asarray(array)
    image = nib.Nifti1Image(array, affine, dtype=array.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    header = image.header.copy()
    header.set_data_dtype(array.dtype)
    if shape is not None:
        header["dim"][0] = len(shape)
        header["dim"][1 : 1 + len(shape)] = shape
    header["vox_offset"] = VOXELS_AT
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    for name, value in fields.items():
        header[name] = value
    raw = header.binaryblock + bytes(4) + array.tobytes(order="F")
    path.write_bytes(gzip.compress(raw, mtime=0) if path.name.endswith(".gz") else raw)
    return path


def flip_bytes(path: Path, start: int, count: int) -> Path:
    """Invert ``count`` bytes of the file from ``start`` (a damaged download)."""
    data = bytearray(path.read_bytes())
    for offset in range(start, min(start + count, len(data))):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return path
