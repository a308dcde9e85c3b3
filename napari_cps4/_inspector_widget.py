"""Prompt inspector: what does a class prompt (or any text) attend to in this volume?

Pick a class (its default prompt is filled in) or type free text, then *Show heat map*:
a stage-1 model scores every voxel against the prompt (off the GUI thread) and the heat
map appears as an image layer over the volume (``inferno``, additive); for a class
prompt the class's binary map (the thresholded class map stage 2 fuses into
pseudo-labels) is added as a labels layer too. The table lists every word of the prompt
with its share of the attention (word pieces such as ``verteb`` + ``##ra`` are shown as
one word with their shares summed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import napari
import numpy as np
from napari.layers import Image
from napari.qt.threading import FunctionWorker, create_worker
from napari.utils.notifications import show_error
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from cps4_engine.classmaps import load_vlm, prompt_heatmap, volume_class_maps, word_attention
from cps4_engine.device import resolve_device
from cps4_engine.errors import CPS4Error
from cps4_engine.io import Volume
from cps4_engine.labels import mrspineseg_scheme
from cps4_engine.options import device_choices
from napari_cps4._common import LayerCombo, color_icon, reports_errors, scrolling
from napari_cps4._layers import SOURCE_KEY, geometry_metadata, labels_layer_data, layer_affine
from napari_cps4._view import prepare_viewer

FREE_TEXT = "(free text)"


@dataclass
class Inspection:
    """A worker's answer: the heat map and, for a class prompt, the class's binary map.

    Attributes:
        text: the prompt that was scored.
        class_id: the class picked, or None for free text.
        heatmap: prompt-to-voxel score, shape (X, Y, Z), in [0, 1].
        tokens: the prompt's tokens as the text encoder split them.
        token_attention: each token's share of the attention (fractions summing to ~1).
        binary: the class's binary map (X, Y, Z) of 0/1, or None.
    """

    text: str
    class_id: int | None
    heatmap: np.ndarray
    tokens: list[str]
    token_attention: list[float]
    binary: np.ndarray | None


def inspect_prompt(run_dir: Path, volume: Volume, text: str, class_id: int | None, device: str) -> Inspection:
    """Score ``text`` against ``volume`` with a stage-1 run (runs in a thread worker)."""
    vlm = load_vlm(run_dir, resolve_device(device))
    heat = prompt_heatmap(vlm, volume, text)
    binary = None
    if class_id is not None:
        binary = np.asarray(volume_class_maps(vlm, volume).binary[class_id - 1]).astype(np.uint8)
    return Inspection(
        text=text,
        class_id=class_id,
        heatmap=np.asarray(heat.heatmap, dtype=np.float32),
        tokens=list(heat.tokens),
        token_attention=[float(a) for a in heat.token_attention],
        binary=binary,
    )


class InspectorWidget(QWidget):
    """Prompt heat maps and token attention (see the module docstring)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.scheme = mrspineseg_scheme()
        self.worker: FunctionWorker | None = None
        self.inspection: Inspection | None = None
        self.heatmap_layer: Image | None = None

        self.image_combo = LayerCombo(napari_viewer, Image)
        self.run_edit = QLineEdit()
        self.run_edit.setPlaceholderText("stage-1 run folder")
        self.device_combo = QComboBox()
        self.device_combo.addItems(device_choices())
        self.class_combo = QComboBox()
        self.class_combo.addItem(FREE_TEXT, None)
        colors = self.scheme.napari_colors()
        for class_id, name in sorted(self.scheme.names().items()):
            if class_id != 0:
                self.class_combo.addItem(color_icon(colors[class_id]), name, class_id)
        self.class_combo.currentIndexChanged.connect(self._class_changed)
        self.prompt_edit = QLineEdit()
        self.prompt_edit.setPlaceholderText("prompt text, e.g. 'the L3 vertebra'")
        self.show_button = QPushButton("Show heat map")
        self.show_button.clicked.connect(reports_errors(self.inspect))
        self.token_table = QTableWidget(0, 2)
        self.token_table.setHorizontalHeaderLabels(("Word", "Attention share"))
        self.token_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.token_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Stage-1 run", self.run_edit)
        form.addRow("Device", self.device_combo)
        form.addRow("Class", self.class_combo)
        form.addRow("Prompt", self.prompt_edit)
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.addLayout(form)
        layout.addWidget(self.show_button)
        layout.addWidget(self.token_table)
        layout.addWidget(self.status_label)
        scrolling(self, content)
        prepare_viewer(napari_viewer)

    def choose_class(self, class_id: int | None) -> None:
        """Pick a class (fills in its default prompt) or None for free text."""
        self.class_combo.setCurrentIndex(self.class_combo.findData(class_id) if class_id is not None else 0)

    def inspect(self, text: str | None = None) -> FunctionWorker:
        """Score the prompt in a thread worker; the result is shown as layers and a table.

        Raises:
            CPS4Error: no image, no run folder, empty prompt, or a run already going.
        """
        if self.worker is not None:
            raise CPS4Error("the inspector is already working")
        image_layer = self.image_combo.layer()
        if image_layer is None:
            raise CPS4Error("open an image first")
        run_text = self.run_edit.text().strip()
        if not run_text:
            raise CPS4Error("choose a stage-1 run folder (train stage 1 in the Training widget)")
        prompt = (text if text is not None else self.prompt_edit.text()).strip()
        if not prompt:
            raise CPS4Error("type a prompt or pick a class")
        class_id = self.class_combo.currentData()
        if class_id is not None and prompt != self.scheme.prompts()[class_id]:
            class_id = None
        volume = Volume(image_layer.data, layer_affine(image_layer), image_layer.metadata.get(SOURCE_KEY))
        worker = create_worker(
            inspect_prompt, Path(run_text), volume, prompt, class_id, self.device_combo.currentText(),
            _start_thread=False, _connect={"errored": self._failed},
        )
        worker.returned.connect(lambda inspection: self.show_inspection(inspection, image_layer))
        worker.finished.connect(self._finished)
        self.worker = worker
        self.show_button.setEnabled(False)
        self.status_label.setText(f"scoring {prompt!r}…")
        worker.start()
        return worker

    def show_inspection(self, inspection: Inspection, image_layer: Image) -> None:
        """Add the heat map (and binary map) over ``image_layer`` and list token attention."""
        self.inspection = inspection
        heat_name = f"heat map: {inspection.text}"
        for name in [heat_name] + ([self._binary_name(inspection.class_id)] if inspection.class_id else []):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        affine = layer_affine(image_layer)
        self.heatmap_layer = self.viewer.add_image(
            inspection.heatmap,
            name=heat_name,
            scale=tuple(image_layer.scale),
            translate=tuple(image_layer.translate),
            metadata=geometry_metadata(affine, None),
            colormap="inferno",
            blending="additive",
            opacity=0.6,
            contrast_limits=(0.0, max(float(inspection.heatmap.max()), 1e-6)),
        )
        if inspection.binary is not None and inspection.class_id is not None:
            data, attributes, _ = labels_layer_data(
                inspection.binary * inspection.class_id, affine, None, self._binary_name(inspection.class_id)
            )
            attributes["scale"] = tuple(image_layer.scale)
            attributes["translate"] = tuple(image_layer.translate)
            self.viewer.add_labels(data, **attributes)
        words = word_attention(inspection.tokens, inspection.token_attention)
        self.token_table.setRowCount(len(words))
        for row, (token, share) in enumerate(words):
            self.token_table.setItem(row, 0, QTableWidgetItem(token))
            self.token_table.setItem(row, 1, QTableWidgetItem(f"{share:.3f}"))
        self.status_label.setText(f"heat map of {inspection.text!r}: max {inspection.heatmap.max():.3f}")

    def _binary_name(self, class_id: int) -> str:
        return f"binary map: {self.scheme.short_names()[class_id]}"

    def _class_changed(self, index: int) -> None:
        class_id = self.class_combo.itemData(index)
        if class_id is not None:
            self.prompt_edit.setText(self.scheme.prompts()[class_id])

    def _failed(self, error: Exception) -> None:
        # A worker with its own errored handler does not notify the viewer; say it here.
        self.status_label.setText(f"failed: {error}")
        show_error(f"CPS4 prompt inspector failed: {error}")

    def _finished(self) -> None:
        self.worker = None
        self.show_button.setEnabled(True)
