"""What the plugin sets up in any viewer it meets: the sagittal view and its NIfTI reader.

:func:`prepare_viewer` runs wherever the plugin first touches a viewer — its reader, its
sample data and every dock — so neither depends on a particular dock being open:

- every spine volume the plugin opens (an image layer made by
  :func:`napari_cps4._layers.image_layer_data`: a file read by the plugin's reader, the
  sample, a dataset or review-queue case) turns the view sagittal, superior up, on the
  middle slice, when it is added;
- ``*.nii`` and ``*.nii.gz`` are read by this plugin's reader unless the user already
  chose another one for them (napari's own "remember this choice" setting), so
  File ▸ Open and ``viewer.open(path, plugin=None)`` stop asking which reader to use
  (a bare ``viewer.open(path)`` is napari's built-in reader by napari's own default).
"""

from __future__ import annotations

import weakref
from typing import Any

import napari
from napari.layers import Image
from napari.settings import get_settings

from cps4_engine.io import sagittal_layout
from napari_cps4._layers import AFFINE_KEY, VOLUME_KEY

PLUGIN_NAME = "napari-cps4"
NIFTI_PATTERNS = ("*.nii", "*.nii.gz")

_prepared: "weakref.WeakSet[Any]" = weakref.WeakSet()


def prepare_viewer(viewer: napari.viewer.Viewer | None) -> None:
    """Follow new spine volumes with the sagittal view and prefer the plugin's reader.

    Safe to call many times for one viewer; None (no viewer yet) only sets the reader.
    """
    prefer_plugin_reader()
    if viewer is None or viewer in _prepared:
        return
    _prepared.add(viewer)

    def volume_inserted(event: Any) -> None:
        layer = event.value
        if isinstance(layer, Image) and layer.metadata.get(VOLUME_KEY):
            show_sagittal(viewer, layer)

    viewer.layers.events.inserted.connect(volume_inserted, position="last")


def prefer_plugin_reader() -> None:
    """Make this plugin the reader of ``.nii``/``.nii.gz`` unless the user picked another."""
    settings = get_settings().plugins
    preferences = dict(settings.extension2reader)
    missing = {pattern: PLUGIN_NAME for pattern in NIFTI_PATTERNS if pattern not in preferences}
    if missing:
        settings.extension2reader = {**preferences, **missing}


def on_activate(context: Any = None) -> None:
    """npe2 activation hook (the plugin's first command): prefer the plugin's reader."""
    prefer_plugin_reader()


def show_sagittal(viewer: napari.viewer.Viewer, layer: Any) -> None:
    """Page through sagittal slices of ``layer``, superior up and anterior left.

    The slider runs along the sagittal voxel axis found from the layer's affine; the
    displayed rows are the superior-inferior axis and the columns the anterior-posterior
    axis, flipped by the camera where the voxel axes run the other way. The slider is set
    to the middle slice. Layers without a stored affine leave the view as it is.
    """
    affine = layer.metadata.get(AFFINE_KEY)
    if affine is None or viewer.dims.ndim != 3 or layer.ndim != 3:
        return
    layout = sagittal_layout(affine)
    viewer.dims.order = layout.axes
    viewer.scene.camera.orientation2d = (
        "up" if layout.flip_rows else "down",
        "left" if layout.flip_cols else "right",
    )
    axis = layout.axes[0]
    middle = (layer.data.shape[axis] // 2) * layer.scale[axis] + layer.translate[axis]
    viewer.dims.set_point(axis, middle)
    viewer.reset_view()

