"""Small Qt helpers shared by the dock widgets: error reporting, layer pickers, views."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

import napari
from napari.utils.notifications import show_error
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QComboBox, QFrame, QScrollArea, QVBoxLayout, QWidget

from cps4_engine.errors import CPS4Error, os_error_message

Handler = TypeVar("Handler", bound=Callable[..., Any])


def reports_errors(handler: Handler) -> Handler:
    """Wrap a Qt slot so a :class:`CPS4Error` or an ``OSError`` becomes a viewer notification.

    Qt signals hand their own arguments to a slot (``clicked`` its ``checked`` flag,
    ``cellClicked`` the row and column); the wrapper passes on only as many positional
    arguments as ``handler`` requires, so ``lambda: …``, a method whose arguments all have
    defaults (they keep them) and ``lambda row, column: …`` all work as slots of any signal.

    Only user-facing errors are caught; anything else is a bug and propagates to napari's
    own error reporting.
    """
    accepted = required_positionals(handler)

    @functools.wraps(handler)
    def wrapper(*args: Any) -> Any:
        try:
            return handler(*args[:accepted])
        except CPS4Error as error:
            show_error(str(error))
            return None
        except OSError as error:
            show_error(os_error_message(error))
            return None

    return wrapper  # type: ignore[return-value]


def required_positionals(function: Callable[..., Any]) -> int | None:
    """How many positional arguments without a default ``function`` takes; None for ``*args``."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is inspect.Parameter.empty for p in parameters)


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



def scroll_area(content: QWidget) -> QScrollArea:
    """``content`` in a frameless scroll area that resizes it to fit where it can."""
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setWidget(content)
    return area


def scrolling(owner: QWidget, content: QWidget) -> None:
    """Fill ``owner`` with ``content`` in a scroll area.

    A dock's minimum height is then the scroll area's, not its content's, so four docks
    fit a 1366 x 768 screen instead of forcing the window taller than it.
    """
    layout = QVBoxLayout(owner)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(scroll_area(content))
