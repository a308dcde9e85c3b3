"""How engine volumes become napari layers and back.

Every layer the plugin creates carries its geometry in ``layer.metadata``:

- ``"affine"``: the 4x4 voxel-to-world matrix of the source NIfTI (float64 array, mm);
- ``"source_path"``: the file it came from (``str``), or ``None`` for generated data;
- ``"scheme"``: for labels layers, the label scheme as :meth:`LabelScheme.to_dict`;
- ``"image_path"``: for labels layers made over an image, that image's file (or None);
- ``"spine_volume"``: True on image layers that are spine volumes (not derived maps such
  as heat maps), which the view turns sagittal for when they are added.

napari shows the voxel axes scaled by the spacing (``scale`` = mm per voxel axis) and
without translation; labels layers made from an image copy its ``scale``, ``translate``
and ``affine`` so they overlay it exactly and save in its geometry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from napari.utils.colormaps import DirectLabelColormap

from cps4_engine.errors import CPS4Error
from cps4_engine.io import Volume
from cps4_engine.labels import LabelScheme, mrspineseg_scheme

LayerDataTuple = tuple[np.ndarray, dict[str, Any], str]

AFFINE_KEY = "affine"
SOURCE_KEY = "source_path"
SCHEME_KEY = "scheme"
IMAGE_KEY = "image_path"
VOLUME_KEY = "spine_volume"


def class_colormap(scheme: LabelScheme) -> DirectLabelColormap:
    """The scheme's class colours as a napari colormap; unknown ids and 0 are transparent."""
    colors: dict[int | None, np.ndarray] = {None: np.zeros(4), 0: np.zeros(4)}
    for class_id, rgba in scheme.napari_colors().items():
        if class_id not in (None, 0):
            colors[int(class_id)] = np.asarray(rgba, dtype=float)
    return DirectLabelColormap(color_dict=colors)


def class_features(scheme: LabelScheme) -> pd.DataFrame:
    """One row per class id (``index`` column), with its name and prompt.

    napari shows these columns in the status bar for the label under the cursor, so the
    annotator sees "L3" rather than "4".
    """
    names = scheme.names()
    prompts = scheme.prompts()
    ids = sorted(names)
    return pd.DataFrame(
        {
            "index": ids,
            "class": [names[i] for i in ids],
            "prompt": [prompts.get(i, "") for i in ids],
        }
    )


def scheme_of(layer: Any | None) -> LabelScheme:
    """The label scheme stored on a layer, or the MRSpineSeg scheme when none is (or no layer)."""
    stored = layer.metadata.get(SCHEME_KEY) if layer is not None else None
    if stored:
        return LabelScheme.from_dict(stored)
    return mrspineseg_scheme()


def image_layer_data(volume: Volume, name: str | None = None) -> LayerDataTuple:
    """An image layer tuple: the voxel array scaled by spacing, geometry in metadata.

    Args:
        volume: the image, array of shape (X, Y, Z) in its voxel order.
        name: layer name; defaults to the file name without NIfTI extensions.
    """
    data = np.asarray(volume.array)
    finite = data[np.isfinite(data)]
    low, high = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    if high <= low:
        high = low + 1.0
    attributes = {
        "name": name or display_name(volume.path),
        "scale": tuple(float(s) for s in volume.spacing),
        "metadata": {**geometry_metadata(volume.affine, volume.path), VOLUME_KEY: True},
        "colormap": "gray",
        "contrast_limits": (float(low), float(high)),
    }
    return data, attributes, "image"


def labels_layer_data(
    array: np.ndarray,
    affine: np.ndarray,
    source_path: str | Path | None,
    name: str,
    scheme: LabelScheme | None = None,
) -> LayerDataTuple:
    """A labels layer tuple coloured and named by the scheme.

    Args:
        array: integer class ids, shape (X, Y, Z) in the image's voxel order.
        affine: the 4x4 voxel-to-world matrix (mm) the labels belong to.
        source_path: the label file, or None when the labels are new.
        name: layer name.
        scheme: label scheme; MRSpineSeg when None.
    """
    scheme = scheme or mrspineseg_scheme()
    volume = Volume(np.asarray(array), np.asarray(affine, dtype=float), source_path)
    metadata = geometry_metadata(volume.affine, source_path)
    metadata[SCHEME_KEY] = scheme.to_dict()
    attributes = {
        "name": name,
        "scale": tuple(float(s) for s in volume.spacing),
        "metadata": metadata,
        "colormap": class_colormap(scheme),
        "features": class_features(scheme),
        "opacity": 0.6,
    }
    return np.asarray(array).astype(np.int32, copy=False), attributes, "labels"


def geometry_metadata(affine: np.ndarray, source_path: str | Path | None) -> dict[str, Any]:
    """The metadata entries that let a layer be saved back in its source geometry."""
    return {
        AFFINE_KEY: np.asarray(affine, dtype=float).copy(),
        SOURCE_KEY: str(source_path) if source_path is not None else None,
    }


def layer_affine(layer: Any) -> np.ndarray:
    """The 4x4 source affine stored on a layer.

    Raises:
        CPS4Error: the layer did not come from the plugin's reader, sample or widgets, so
            its geometry in the world is unknown.
    """
    affine = layer.metadata.get(AFFINE_KEY)
    if affine is None:
        raise CPS4Error(
            "has no source geometry (no affine in its metadata); open the image with the "
            "CPS4 reader or create the labels from the data widget",
            path=f"layer {layer.name!r}",
        )
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise CPS4Error(f"stored affine has shape {affine.shape} or non-finite values", path=f"layer {layer.name!r}")
    return affine


def display_name(path: str | Path | None) -> str:
    """A file name without ``.nii``/``.nii.gz``; ``"volume"`` when there is no file."""
    if path is None:
        return "volume"
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def new_labels_for(image_layer: Any, name: str, scheme: LabelScheme | None = None) -> LayerDataTuple:
    """An empty labels layer tuple overlaying ``image_layer`` exactly (same shape and geometry)."""
    affine = layer_affine(image_layer)
    array = np.zeros(image_layer.data.shape, dtype=np.int32)
    data, attributes, kind = labels_layer_data(array, affine, None, name, scheme)
    attributes["scale"] = tuple(image_layer.scale)
    attributes["translate"] = tuple(image_layer.translate)
    attributes["metadata"][IMAGE_KEY] = image_layer.metadata.get(SOURCE_KEY)
    return data, attributes, kind
