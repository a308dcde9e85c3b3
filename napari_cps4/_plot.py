"""Curves for the docks, painted by Qt on the GUI thread.

The Training dock shows the total loss by step (left axis) and the validation Dice (right
axis, 0–1); the Refine tab shows the held-out Dice by round. A :class:`CurvePlot` paints
its curves with ``QPainter`` in its paint event: Qt draws a few thousand points in C++
within a millisecond or two and coalesces repaint requests, so new points cost the GUI
thread nothing worth measuring. The earlier matplotlib figure, even rendered in a worker
thread, held the interpreter lock for long stretches and stalled the viewer with it: the
event loop's worst gap during a tiny dock run beside a busy process was 480–580 ms with it
against about 20 ms without it (tests/test_plugin_responsiveness.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QFontMetricsF, QPainter, QPaintEvent, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

LOSS_COLOUR = "#1f77b4"
DICE_COLOUR = "#ff7f0e"
ROUND_COLOUR = "#2ca02c"
TICKS = 4
"""About how many labelled ticks each axis gets."""


@dataclass(frozen=True)
class Axis:
    """One vertical axis of a :class:`CurvePlot` and the curve drawn against it.

    Attributes:
        name: the axis label, also the curve's key in :meth:`CurvePlot.add` and
            :meth:`CurvePlot.points`.
        colour: the curve's and the label's colour (``#rrggbb``).
        limits: fixed ``(low, high)`` of the axis, or None to fit the curve's values.
        markers: draw a dot at every point (sparse curves: validations, rounds).
    """

    name: str
    colour: str
    limits: tuple[float, float] | None = None
    markers: bool = False


def nice_ticks(low: float, high: float, count: int = TICKS, integers: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering ``[low, high]``.

    ``integers`` keeps the ticks at least 1 apart (steps, rounds). Example:
    ``nice_ticks(0, 1500)`` is ``[0, 500, 1000, 1500]``; ``nice_ticks(1, 3, integers=True)``
    is ``[1, 2, 3]``.
    """
    span = high - low
    if not math.isfinite(span) or span <= 0:
        return [low]
    rough = span / max(1, count)
    step = 10.0 ** math.floor(math.log10(rough))
    for multiple in (1, 2, 5, 10):
        if span / (step * multiple) <= count:
            step *= multiple
            break
    if integers:
        step = max(step, 1.0)
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


class CurvePlot(QWidget):
    """A title, a shared x axis and one curve per vertical axis (one or two axes).

    Args:
        x_label: the horizontal axis' label (e.g. ``"step"``).
        left: the left axis and its curve.
        right: an optional right axis and its curve.
        height: the widget's fixed height in pixels.
    """

    def __init__(self, x_label: str, left: Axis, right: Axis | None = None, height: int = 200) -> None:
        super().__init__()
        self.x_label = x_label
        self.axes = [axis for axis in (left, right) if axis is not None]
        self.title = ""
        self._curves: dict[str, tuple[list[float], list[float]]] = {a.name: ([], []) for a in self.axes}
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        self.setFixedHeight(height)
        self.setMinimumWidth(240)

    def reset(self, title: str) -> None:
        """Clear every curve and set the title (e.g. the stage being trained)."""
        self.title = title
        for xs, ys in self._curves.values():
            xs.clear()
            ys.clear()
        self.update()

    def add(self, name: str, x: float, y: float) -> None:
        """Append one point to the curve of axis ``name``; repainted at the next paint."""
        xs, ys = self._curves[name]
        xs.append(float(x))
        ys.append(float(y))
        self.update()

    def set_points(self, name: str, xs: list[float], ys: list[float]) -> None:
        """Replace the curve of axis ``name`` by the points ``(xs[i], ys[i])``."""
        if len(xs) != len(ys):
            raise ValueError(f"{len(xs)} x values for {len(ys)} y values")
        self._curves[name] = ([float(x) for x in xs], [float(y) for y in ys])
        self.update()

    def points(self, name: str) -> tuple[list[float], list[float]]:
        """The curve of axis ``name`` as ``(xs, ys)`` copies."""
        xs, ys = self._curves[name]
        return list(xs), list(ys)

    # painting ----------------------------------------------------------------------------

    def _x_range(self) -> tuple[float, float]:
        xs = [x for curve_xs, _ in self._curves.values() for x in curve_xs]
        if not xs:
            return 0.0, 1.0
        low, high = min(xs), max(xs)
        return (low, low + 1.0) if high <= low else (low, high)

    def _y_range(self, axis: Axis) -> tuple[float, float]:
        if axis.limits is not None:
            return axis.limits
        ys = [y for y in self._curves[axis.name][1] if math.isfinite(y)]
        if not ys:
            return 0.0, 1.0
        low, high = min(ys), max(ys)
        pad = 0.05 * (high - low) if high > low else max(abs(high) * 0.05, 1e-3)
        return low - pad, high + pad

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        font = QFont(self.font())
        font.setPointSizeF(7.5)
        painter.setFont(font)
        metrics = QFontMetricsF(font)
        line = metrics.height()
        text_colour = self.palette().windowText().color()
        tick_width = metrics.horizontalAdvance("0.0000")
        left = tick_width + 1.6 * line
        right = tick_width + 1.6 * line if len(self.axes) > 1 else 0.8 * line
        frame = QRectF(left, 1.5 * line, self.width() - left - right, self.height() - 4.0 * line)
        if frame.width() < 10 or frame.height() < 10:
            painter.end()
            return
        x_low, x_high = self._x_range()

        def to_x(x: float) -> float:
            return frame.left() + (x - x_low) / (x_high - x_low) * frame.width()

        painter.setPen(QPen(text_colour, 1.0))
        painter.drawRect(frame)
        painter.drawText(QRectF(0, 0, self.width(), 1.4 * line), Qt.AlignmentFlag.AlignCenter, self.title)
        integral = all(float(x).is_integer() for xs, _ in self._curves.values() for x in xs)
        for tick in nice_ticks(x_low, x_high, integers=integral):
            x = to_x(tick)
            painter.drawLine(QPointF(x, frame.bottom()), QPointF(x, frame.bottom() + 3))
            painter.drawText(QRectF(x - tick_width, frame.bottom() + 3, 2 * tick_width, line),
                             Qt.AlignmentFlag.AlignHCenter, f"{tick:g}")
        painter.drawText(QRectF(frame.left(), frame.bottom() + 1.1 * line, frame.width(), line),
                         Qt.AlignmentFlag.AlignHCenter, self.x_label)
        for side, axis in zip(("left", "right"), self.axes):
            self._paint_axis(painter, axis, side, frame, to_x, tick_width, line)
        painter.end()

    def _paint_axis(self, painter: QPainter, axis: Axis, side: str, frame: QRectF, to_x, tick_width: float,
                    line: float) -> None:
        colour = QColor(axis.colour)
        y_low, y_high = self._y_range(axis)

        def to_y(y: float) -> float:
            return frame.bottom() - (y - y_low) / (y_high - y_low) * frame.height()

        painter.setPen(QPen(colour, 1.0))
        edge = frame.left() if side == "left" else frame.right()
        outward = -1.0 if side == "left" else 1.0
        align = Qt.AlignmentFlag.AlignRight if side == "left" else Qt.AlignmentFlag.AlignLeft
        for tick in nice_ticks(y_low, y_high):
            y = to_y(tick)
            painter.drawLine(QPointF(edge, y), QPointF(edge + 3 * outward, y))
            box_left = edge - 4 - tick_width if side == "left" else edge + 4
            painter.drawText(QRectF(box_left, y - line / 2, tick_width, line),
                             align | Qt.AlignmentFlag.AlignVCenter, f"{tick:.4g}")
        painter.save()
        label_x = edge + outward * (tick_width + 1.0 * line)
        painter.translate(label_x, frame.center().y())
        painter.rotate(-90 if side == "left" else 90)
        painter.drawText(QRectF(-frame.height() / 2, -line / 2, frame.height(), line),
                         Qt.AlignmentFlag.AlignCenter, axis.name)
        painter.restore()

        xs, ys = self._curves[axis.name]
        stride = max(1, len(xs) // max(1, int(frame.width())))
        points = [QPointF(to_x(x), to_y(y)) for x, y in zip(xs[::stride], ys[::stride]) if math.isfinite(y)]
        if not points:
            return
        painter.save()
        painter.setClipRect(frame)
        painter.setPen(QPen(colour, 1.5))
        painter.drawPolyline(QPolygonF(points))
        if axis.markers:
            painter.setBrush(colour)
            for point in points:
                painter.drawEllipse(point, 2.5, 2.5)
        painter.restore()
