"""NIfTI reader: spine MR volumes become image layers, masks become labels layers.

Image or labels? The first rule that applies decides:

1. the file name (without ``.nii``/``.nii.gz``) or its folder contains ``mask``,
   ``seg`` or ``label`` (any case): **labels** (``mask_case3.nii.gz``,
   ``case01_seg.nii.gz``, ``labelsTr/spine_001.nii.gz``);
2. the file name or its folder contains ``img``, ``image`` or is the MRSpineSeg ``MR``
   folder: **image**;
3. otherwise, integer-valued data whose values are all class ids of the MRSpineSeg scheme
   (0–19): **labels**; anything else: **image**.

Images are scaled by their voxel spacing and keep the affine and the source path in the
layer metadata; labels get the scheme's colours and class names (see
:mod:`napari_cps4._layers`). Reading prepares the current viewer
(:func:`napari_cps4._view.prepare_viewer`): the image opens sagittal, superior up, and
later ``.nii``/``.nii.gz`` files go to this reader without asking.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Literal

import napari
import numpy as np

from cps4_engine.io import read_volume
from cps4_engine.labels import mrspineseg_scheme
from napari_cps4._layers import LayerDataTuple, display_name, image_layer_data, labels_layer_data
from napari_cps4._view import prepare_viewer

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LABEL_NAME = re.compile(r"mask|seg|label", re.IGNORECASE)
IMAGE_NAME = re.compile(r"img|image", re.IGNORECASE)


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerDataTuple]] | None:
    """Return :func:`read_nifti` when every path is a NIfTI file name, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(str(p).lower().endswith(NIFTI_SUFFIXES) for p in paths):
        return None
    return read_nifti


def read_nifti(path: str | list[str]) -> list[LayerDataTuple]:
    """Read one or more NIfTI files into layer data tuples (images and labels).

    Raises:
        CPS4Error: a file is missing, not NIfTI, truncated, not 3D or, for a mask, not
            integer-valued (raised by :func:`cps4_engine.io.read_volume`).
    """
    paths = [path] if isinstance(path, str) else list(path)
    layers = [read_layer(Path(p)) for p in paths]
    prepare_viewer(napari.current_viewer())
    return layers


def read_layer(path: Path) -> LayerDataTuple:
    """One NIfTI file as an image or labels layer tuple, by the rules of this module."""
    kind = kind_from_name(path)
    if kind == "labels":
        volume = read_volume(path, kind="label")
    else:
        volume = read_volume(path, kind="image")
        if kind is None and looks_like_class_ids(np.asarray(volume.array)):
            kind = "labels"
    if kind == "labels":
        return labels_layer_data(
            np.asarray(volume.array), volume.affine, path, display_name(path), mrspineseg_scheme()
        )
    return image_layer_data(volume)


def kind_from_name(path: Path) -> Literal["image", "labels"] | None:
    """``labels`` or ``image`` when the file or folder name says so, else None."""
    stem = display_name(path)
    folder = path.parent.name
    if LABEL_NAME.search(stem) or LABEL_NAME.search(folder):
        return "labels"
    if IMAGE_NAME.search(stem) or IMAGE_NAME.search(folder) or folder == "MR":
        return "image"
    return None


def looks_like_class_ids(array: np.ndarray) -> bool:
    """True when every value is an integer class id of the MRSpineSeg scheme."""
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            return False
    values = np.unique(array)
    num_classes = mrspineseg_scheme().num_classes
    return bool(values.size > 0 and values.min() >= 0 and values.max() < num_classes)
