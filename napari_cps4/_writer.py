"""NIfTI writers: a labels (or image) layer back to a file in its source geometry.

The layer must carry the affine the plugin stores in its metadata (layers from the CPS4
reader, the sample data or the widgets do); otherwise the writer refuses with a
one-line :class:`CPS4Error` instead of guessing a geometry. Files are written
atomically by :func:`cps4_engine.io.write_volume`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from cps4_engine.errors import CPS4Error
from cps4_engine.io import write_volume
from napari_cps4._layers import layer_affine

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save a labels layer's class ids as a NIfTI mask.

    Args:
        path: target file; ``.nii.gz`` is appended when it has no NIfTI extension.
        data: integer class ids, shape (X, Y, Z).
        meta: the layer attributes napari passes (``name``, ``metadata``, ...).

    Returns:
        The written path, as napari's writer contract asks.

    Raises:
        CPS4Error: no source geometry, or data that are not a 3D integer volume.
    """
    target = nifti_path(path)
    array = np.asarray(data)
    affine = _affine_from_meta(meta)
    if array.ndim != 3:
        raise CPS4Error(f"labels layer has {array.ndim} dimensions; a NIfTI mask needs 3", path=target)
    if array.size and (array.min() < 0 or not np.issubdtype(array.dtype, np.integer)):
        raise CPS4Error("labels must be non-negative integer class ids", path=target)
    dtype = np.uint8 if array.size == 0 or array.max() <= np.iinfo(np.uint8).max else np.int16
    write_volume(target, array.astype(dtype), affine)
    return [str(target)]


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save an image layer as NIfTI in its source geometry (float32 intensities).

    Raises:
        CPS4Error: no source geometry, or data that are not a 3D volume.
    """
    target = nifti_path(path)
    array = np.asarray(data)
    affine = _affine_from_meta(meta)
    if array.ndim != 3:
        raise CPS4Error(f"image layer has {array.ndim} dimensions; a NIfTI volume needs 3", path=target)
    write_volume(target, array.astype(np.float32), affine)
    return [str(target)]


def nifti_path(path: str | Path) -> Path:
    """``path`` with ``.nii.gz`` appended unless it already ends in ``.nii`` or ``.nii.gz``."""
    path = Path(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return path
    return path.with_name(path.name + ".nii.gz")


def _affine_from_meta(meta: dict[str, Any]) -> np.ndarray:
    layer = SimpleNamespace(name=meta.get("name", "layer"), metadata=meta.get("metadata") or {})
    return layer_affine(layer)
