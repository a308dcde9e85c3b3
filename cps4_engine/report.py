"""Report figures: label overlays over sagittal slices and training curves.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, so no display is needed
and the process-wide backend that napari's own plots use is left alone) and saved
atomically as PNG.
"""

from __future__ import annotations

import io as _bytes_io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from cps4_engine.events import TrainEvent
from cps4_engine.io import sagittal_spacing, to_sagittal, write_bytes_atomic
from cps4_engine.labels import LabelScheme

OVERLAY_ALPHA = 0.55


@dataclass
class TrainingCurves:
    """Losses and validation metrics of one training run, as recorded from its events.

    Attributes:
        name: what trained, e.g. ``"stage 1"``.
        steps: step numbers of the loss entries.
        losses: loss name -> values, one per entry of ``steps``.
        validation_steps: step numbers of the validation entries.
        metrics: metric name -> values, one per entry of ``validation_steps``.
    """

    name: str
    steps: list[int] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    validation_steps: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def record(self, event: TrainEvent) -> None:
        """Add a ``step`` event's losses or a ``validation`` event's metrics."""
        if event.kind == "step" and event.losses:
            self.steps.append(event.step)
            for key, value in event.losses.items():
                self.losses.setdefault(key, [math.nan] * (len(self.steps) - 1)).append(float(value))
            for values in self.losses.values():
                values.extend([math.nan] * (len(self.steps) - len(values)))
        elif event.kind == "validation" and event.metrics:
            self.validation_steps.append(event.step)
            for key, value in event.metrics.items():
                self.metrics.setdefault(key, [math.nan] * (len(self.validation_steps) - 1)).append(float(value))
            for values in self.metrics.values():
                values.extend([math.nan] * (len(self.validation_steps) - len(values)))


def _new_figure(columns: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, columns, squeeze=False)


def _save_figure(figure: Figure, path: str | Path, dpi: int = 110) -> Path:
    buffer = _bytes_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(array) < window:
        return array
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, array[0]), array])
    return np.convolve(padded, kernel, mode="valid")


def save_training_curves(path: str | Path, runs: Sequence[TrainingCurves]) -> Path:
    """One panel per run: every loss against step (moving average over ~5 % of the run),
    validation metrics on a second axis in [0, 1].

    Args:
        path: PNG file to write.
        runs: the recorded runs, e.g. stage 1 and stage 2.

    Returns:
        ``path``.
    """
    columns = max(len(runs), 1)
    figure, axes = _new_figure(columns, (5.5 * columns, 3.8))
    for axis, run in zip(axes[0], runs):
        window = max(1, len(run.steps) // 20)
        for name, values in run.losses.items():
            if name in ("weight", "confident"):
                continue
            axis.plot(run.steps, _smooth(values, window), label=name, linewidth=1.4 if name == "total" else 0.9)
        axis.set_title(run.name)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
        handles, labels = axis.get_legend_handles_labels()
        if run.validation_steps:
            metric_axis = axis.twinx()
            for name, values in run.metrics.items():
                metric_axis.plot(run.validation_steps, values, "o--", markersize=3, label=f"val {name}")
            metric_axis.set_ylim(0.0, 1.0)
            metric_axis.set_ylabel("validation")
            more_handles, more_labels = metric_axis.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        if handles:
            axis.legend(handles, labels, fontsize=7, loc="upper right")
    figure.subplots_adjust(wspace=0.45)
    return _save_figure(figure, path)


def colour_labels(labels: np.ndarray, scheme: LabelScheme) -> np.ndarray:
    """RGBA image of a label slice in the scheme's colours; background transparent.

    Args:
        labels: ``(rows, cols)`` integer class ids.
        scheme: supplies each class's RGB colour; ids outside it are grey.

    Returns:
        float ``(rows, cols, 4)`` in [0, 1].
    """
    palette = np.full((max(int(labels.max(initial=0)), scheme.num_classes - 1) + 1, 4), 0.5)
    palette[:, 3] = OVERLAY_ALPHA
    palette[0] = 0.0
    for info in scheme.classes[1:]:
        palette[info.id, :3] = np.asarray(info.color) / 255.0
    return palette[np.clip(labels, 0, None).astype(np.int64)]


def best_sagittal_slice(labels: np.ndarray, affine: np.ndarray) -> int:
    """Index of the sagittal slice (display order) with the most foreground voxels."""
    foreground = to_sagittal(labels, affine) > 0
    return int(np.argmax(foreground.reshape(foreground.shape[0], -1).sum(1)))


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    affine: np.ndarray,
    panels: Mapping[str, np.ndarray],
    scheme: LabelScheme,
    slice_index: int | None = None,
    title: str = "",
) -> Path:
    """A sagittal slice with label volumes coloured over it, one panel per volume.

    Args:
        path: PNG file to write.
        image: ``(X, Y, Z)`` intensities.
        affine: the volume's affine (gives the sagittal axis and the pixel aspect).
        panels: panel title -> ``(X, Y, Z)`` label volume, e.g. ground truth, prediction.
        scheme: the class colours and short names (legend).
        slice_index: sagittal slice to show; None picks the one with the most
            foreground in the first panel.
        title: figure title.

    Returns:
        ``path``.
    """
    first = next(iter(panels.values()))
    index = best_sagittal_slice(first, affine) if slice_index is None else slice_index
    _, row_mm, col_mm = sagittal_spacing(affine)
    grey = to_sagittal(image, affine)[index].astype(np.float64)
    low, high = np.percentile(grey, [0.5, 99.5])
    grey = np.clip((grey - low) / max(high - low, 1e-8), 0.0, 1.0)
    figure, axes = _new_figure(len(panels), (3.2 * len(panels) + 1.6, 5.0))
    present: set[int] = set()
    for axis, (name, labels) in zip(axes[0], panels.items()):
        label_slice = to_sagittal(labels, affine)[index]
        present |= {int(c) for c in np.unique(label_slice) if c > 0}
        axis.imshow(grey, cmap="gray", aspect=row_mm / col_mm, interpolation="nearest")
        axis.imshow(colour_labels(label_slice, scheme), aspect=row_mm / col_mm, interpolation="nearest")
        axis.set_title(name)
        axis.set_axis_off()
    legend = [
        Patch(color=np.asarray(scheme.by_id(c).color) / 255.0, label=scheme.by_id(c).short)
        for c in sorted(present)
        if c < scheme.num_classes
    ]
    if legend:
        figure.legend(handles=legend, loc="center right", fontsize=7, frameon=False)
    figure.suptitle(title or f"sagittal slice {index}")
    figure.subplots_adjust(right=0.82)
    return _save_figure(figure, path)
