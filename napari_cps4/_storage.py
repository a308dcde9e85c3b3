"""Saving masks, and keeping the version a save is about to replace.

Where a mask goes is the dataset layout's rule (:mod:`cps4_engine.layouts`), so the
engine's dataset reader finds the new labels on the next training round. Every save is
atomic (:func:`cps4_engine.io.write_volume`) and an existing mask (and its partial-mask
sidecar) is first copied to
``previous_versions/<name>.prev-<n>.nii.gz`` beside it — a subfolder, so dataset readers
never mistake an old version for another case's mask.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from cps4_engine.data import label_status_path, write_label_status
from cps4_engine.io import write_volume
from napari_cps4._layers import display_name

PREVIOUS_FOLDER = "previous_versions"


def save_mask(
    path: str | Path, labels: np.ndarray, affine: np.ndarray, painted: Iterable[int] | None
) -> Path:
    """Save a mask atomically, keeping the previous file, with its partial-mask sidecar.

    Args:
        path: the mask file (``.nii.gz`` or ``.nii``).
        labels: class ids, shape (X, Y, Z).
        affine: the image's 4x4 voxel-to-world matrix (mm).
        painted: the classes whose voxels are known (a partial mask), or None for a
            complete mask.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    keep_previous_version(path)
    labels = np.asarray(labels)
    dtype = np.uint8 if labels.size == 0 or labels.max() <= np.iinfo(np.uint8).max else np.int16
    write_volume(path, labels.astype(dtype), affine)
    write_label_status(path, None if painted is None else sorted(int(c) for c in painted))
    return path


def previous_version_path(path: Path, number: int) -> Path:
    """``previous_versions/<name>.prev-<number>.nii.gz`` beside ``path`` (``.nii`` kept)."""
    suffix = ".nii" if path.name.endswith(".nii") else ".nii.gz"
    return path.parent / PREVIOUS_FOLDER / f"{display_name(path)}.prev-{number}{suffix}"


def keep_previous_version(path: str | Path) -> Path | None:
    """Copy an existing file (and its sidecar) to the next free version before it is overwritten.

    Copies go to a temporary name first and are renamed into place, so a crash never
    leaves a half-written backup under a version name.

    Returns:
        The backup's path, or None when ``path`` did not exist.
    """
    path = Path(path)
    if not path.exists():
        return None
    number = 1
    while previous_version_path(path, number).exists():
        number += 1
    backup = previous_version_path(path, number)
    backup.parent.mkdir(parents=True, exist_ok=True)
    sidecar = label_status_path(path)
    if sidecar.exists():
        _copy_atomically(sidecar, label_status_path(backup))
    _copy_atomically(path, backup)
    return backup


def _copy_atomically(source: Path, target: Path) -> None:
    partial = target.with_name(f".{target.name}.partial")
    shutil.copy2(source, partial)
    os.replace(partial, target)
