"""A live training-curve plot for the dock: loss per step and validation Dice.

The figure is a matplotlib figure rendered by the Agg backend in a napari thread worker
and shown as a picture. Drawing it on the GUI thread (``FigureCanvasQTAgg``) takes
100–400 ms on a loaded 2-core machine, which alone would stall the viewer past the
100 ms responsiveness bar at every training step; rendered off-thread, the GUI thread only
swaps a finished image in. At most one render runs at a time and renders start at most
once per :data:`MIN_RENDER_INTERVAL_MS` (matplotlib is mostly Python, so each render
competes with the GUI thread for the interpreter lock); points that arrive in between are
drawn by the next render.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from napari.qt.threading import create_worker
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QLabel, QSizePolicy

Curve = tuple[tuple[int, ...], tuple[float, ...]]
MIN_RENDER_INTERVAL_MS = 1000


class CurvePlot(QLabel):
    """Total loss (left axis) and validation Dice (right axis, 0–1) by training step."""

    def __init__(self, width_in: float = 4.0, height_in: float = 2.4, dpi: int = 90) -> None:
        super().__init__()
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        self.setMinimumHeight(int(height_in * dpi))
        self.figure = Figure(figsize=(width_in, height_in), dpi=dpi)
        FigureCanvasAgg(self.figure)
        self.figure.subplots_adjust(left=0.15, right=0.85, bottom=0.2, top=0.88)
        self.loss_axes = self.figure.add_subplot(1, 1, 1)
        self.dice_axes = self.loss_axes.twinx()
        self.title = ""
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.dice_steps: list[int] = []
        self.dice: list[float] = []
        self.renders = 0
        self._rendering = False
        self._stale = False
        self._cooldown = QTimer(self)
        self._cooldown.setSingleShot(True)
        self._cooldown.setInterval(MIN_RENDER_INTERVAL_MS)
        self._cooldown.timeout.connect(self._cooldown_over)
        self.reset("")

    def reset(self, title: str) -> None:
        """Clear both curves and set the plot title (e.g. the stage being trained)."""
        self.title = title
        self.steps.clear()
        self.losses.clear()
        self.dice_steps.clear()
        self.dice.clear()
        self._request_render()

    def add_loss(self, step: int, loss: float) -> None:
        """Append one step's total loss; the picture is redrawn in the background."""
        self.steps.append(step)
        self.losses.append(loss)
        self._request_render()

    def add_dice(self, step: int, dice: float) -> None:
        """Append one validation Dice (fraction in [0, 1]); redrawn in the background."""
        self.dice_steps.append(step)
        self.dice.append(dice)
        self._request_render()

    @property
    def busy(self) -> bool:
        """True while a render is running or queued."""
        return self._rendering or self._stale

    def _request_render(self) -> None:
        if self._rendering or self._cooldown.isActive():
            self._stale = True
            return
        self._rendering = True
        worker = create_worker(
            self._render,
            self.title,
            (tuple(self.steps), tuple(self.losses)),
            (tuple(self.dice_steps), tuple(self.dice)),
            _start_thread=False,
        )
        worker.returned.connect(self._show)
        worker.start()

    def _render(self, title: str, loss: Curve, dice: Curve) -> np.ndarray:
        """Draw the figure with Agg (runs in a worker thread); returns RGBA (H, W, 4) uint8."""
        for axes in (self.loss_axes, self.dice_axes):
            axes.clear()
            axes.tick_params(labelsize=7)
        self.loss_axes.set_title(title, fontsize=9)
        self.loss_axes.set_xlabel("step", fontsize=8)
        self.loss_axes.set_ylabel("loss", fontsize=8, color="tab:blue")
        self.dice_axes.yaxis.set_label_position("right")
        self.dice_axes.yaxis.tick_right()
        self.dice_axes.set_ylabel("validation Dice", fontsize=8, color="tab:orange")
        self.dice_axes.set_ylim(0.0, 1.0)
        self.loss_axes.plot(*loss, color="tab:blue", linewidth=1.0)
        self.dice_axes.plot(*dice, "o-", color="tab:orange", markersize=3)
        if loss[0]:
            self.dice_axes.set_xlim(self.loss_axes.get_xlim())
        self.figure.canvas.draw()
        return np.asarray(self.figure.canvas.buffer_rgba()).copy()

    def _show(self, rgba: np.ndarray) -> None:
        height, width, _ = rgba.shape
        image = QImage(rgba.data, width, height, 4 * width, QImage.Format.Format_RGBA8888).copy()
        self.setPixmap(QPixmap.fromImage(image))
        self.renders += 1
        self._rendering = False
        self._cooldown.start()

    def _cooldown_over(self) -> None:
        if self._stale:
            self._stale = False
            self._request_render()
