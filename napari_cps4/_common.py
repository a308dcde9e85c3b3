"""Small Qt helpers shared by the dock widgets: error reporting, layer pickers, views."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import napari
from napari.utils.notifications import show_error
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QComboBox

from cps4_engine.errors import CPS4Error
from cps4_engine.io import sagittal_layout
from napari_cps4._layers import AFFINE_KEY

Handler = TypeVar("Handler", bound=Callable[..., Any])


def reports_errors(handler: Handler) -> Handler:
    """Wrap a button handler so a :class:`CPS4Error` becomes a viewer notification.

    Only user-facing errors are caught; anything else is a bug and propagates to napari's
    own error reporting.
    """

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except CPS4Error as error:
            show_error(str(error))
            return None

    return wrapper  # type: ignore[return-value]


def color_icon(rgba: Any, size: int = 12) -> QIcon:
    """A square icon filled with an RGBA colour given as floats in [0, 1]."""
    red, green, blue, alpha = (int(round(255 * float(c))) for c in tuple(rgba)[:4])
    pixmap = QPixmap(size, size)
    pixmap.fill(QColor(red, green, blue, max(alpha, 255 if alpha else 0)))
    return QIcon(pixmap)


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of one type, kept in sync with the layer list."""

    def __init__(self, viewer: napari.viewer.Viewer, layer_type: type) -> None:
        super().__init__()
        self._viewer = viewer
        self._layer_type = layer_type
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.moved.connect(self.refresh)
        self.refresh()

    def refresh(self, event: Any = None) -> None:
        """Re-list the layers, keeping the current choice when it still exists."""
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        names = [layer.name for layer in self._viewer.layers if isinstance(layer, self._layer_type)]
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        self.currentTextChanged.emit(self.currentText())

    def layer(self) -> Any | None:
        """The chosen layer, or None when there is none."""
        name = self.currentText()
        if name and name in self._viewer.layers:
            return self._viewer.layers[name]
        return None

    def select_layer(self, layer: Any) -> None:
        """Make ``layer`` the current choice (refreshing the list first)."""
        self.refresh()
        self.setCurrentText(layer.name)


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
