"""Per-class review of a pseudo-label: inspect, accept, reject, correct, save.

*Run inference* segments the chosen image with a stage-2 run (off the GUI thread) and
shows the pseudo-label as one labels layer; *Review layer* takes any labels layer
instead. The class table lists each class present: colour, name, prompt, voxel count,
mean confidence (from the prediction's probabilities; blank for a layer without one) and
review status, and the class prompt. Statuses are the workspace's vocabulary
(:data:`cps4_engine.active.workspace.CLASS_STATUSES`: ``machine``, ``accepted``,
``corrected``, ``rejected``), shown as *pending*, *accepted*, *needs edit*, *rejected*.

*Class layers* adds, on demand, one labels layer per class, named by the class first
(``L3 · <layer>``) so the layer list shows which is which (views for inspection;
corrections go into the combined layer with napari's own paint, erase and fill tools):
the table's *Show* box toggles a class layer, the opacity slider sets the selected
class's layer opacity, *Solo* shows only the selected class.

*Save* writes the reviewed mask (by default where the image's dataset layout keeps its
mask, :func:`cps4_engine.layouts.mask_path_for_image`) atomically, every version kept
(:func:`cps4_engine.active.workspace.save_mask_version`): accepted and needs-edit (corrected) classes are kept,
rejected and still-pending classes are erased, and the partial-mask sidecar lists the
kept classes — so the case joins the labeled set of the next training round as reviewed.

Keyboard shortcuts (when the viewer window has focus):

====================  ==========================================
``Alt+Shift+A``       accept the selected class
``Alt+Shift+E``       mark the selected class "needs edit"
``Alt+Shift+R``       reject the selected class
``Alt+Shift+J`` / K   select the next / previous class and jump to it
``Alt+Shift+S``       solo the selected class (again: show all)
====================  ==========================================

The active-refinement panel (review queue, spine-aware corrections, retrain rounds) is
embedded below; it works on :attr:`ReviewWidget.labels_layer`.
"""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import FunctionWorker, create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtGui import QKeySequence, QShortcut
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from cps4_engine.active.workspace import HUMAN_STATUSES, STATUS_LABELS, class_status, save_mask_version
from cps4_engine.errors import CPS4Error
from cps4_engine.inference import Prediction
from cps4_engine.io import Volume
from cps4_engine.layouts import mask_path_for_image
from napari_cps4._common import LayerCombo, color_icon, reports_errors, scroll_area
from napari_cps4._layers import IMAGE_KEY, SOURCE_KEY, labels_layer_data, layer_affine, scheme_of
from napari_cps4._refine import RefinementPanel
from napari_cps4._view import prepare_viewer
from napari_cps4._workers import predict

COLUMNS = ("Show", "Class", "Status", "Voxels", "Mean confidence", "Prompt")
STATUS_COLUMN, CONFIDENCE_COLUMN = COLUMNS.index("Status"), COLUMNS.index("Mean confidence")
SHORTCUTS = {
    "accept": "Alt+Shift+A",
    "needs edit": "Alt+Shift+E",
    "reject": "Alt+Shift+R",
    "next": "Alt+Shift+J",
    "previous": "Alt+Shift+K",
    "solo": "Alt+Shift+S",
}


class ReviewWidget(QWidget):
    """Class-by-class review of a pseudo-label (see the module docstring)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.image_layer: Image | None = None
        self.labels_layer: Labels | None = None
        self.prediction: Prediction | None = None
        self.statuses: dict[int, str] = {}
        self.class_layers: dict[int, Labels] = {}
        self.class_ids: list[int] = []
        self.worker: FunctionWorker | None = None
        self._solo = False

        self.image_combo = LayerCombo(napari_viewer, Image)
        self.run_edit = QLineEdit()
        self.run_edit.setPlaceholderText("stage-2 run folder")
        self.infer_button = QPushButton("Run inference")
        self.infer_button.clicked.connect(reports_errors(self.run_inference))
        self.labels_combo = LayerCombo(napari_viewer, Labels)
        self.use_layer_button = QPushButton("Review layer")
        self.use_layer_button.clicked.connect(reports_errors(self._use_layer_clicked))
        labels_row = QHBoxLayout()
        labels_row.addWidget(self.labels_combo)
        labels_row.addWidget(self.use_layer_button)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Stage-2 run", self.run_edit)
        form.addRow(self.infer_button)
        form.addRow("or labels", labels_row)

        self.class_table = QTableWidget(0, len(COLUMNS))
        self.class_table.setHorizontalHeaderLabels(COLUMNS)
        self.class_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.class_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.class_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.class_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.class_table.cellDoubleClicked.connect(
            reports_errors(lambda row, _column: self.jump_to_class(self.class_ids[row]))
        )
        self.class_table.itemChanged.connect(self._show_box_changed)

        self.accept_button = QPushButton("Accept")
        self.accept_button.clicked.connect(reports_errors(lambda: self._set_selected_status("accepted")))
        self.edit_button = QPushButton("Needs edit")
        self.edit_button.clicked.connect(reports_errors(lambda: self._set_selected_status("corrected")))
        self.reject_button = QPushButton("Reject")
        self.reject_button.clicked.connect(reports_errors(lambda: self._set_selected_status("rejected")))
        self.jump_button = QPushButton("Jump to")
        self.jump_button.clicked.connect(reports_errors(lambda: self.jump_to_class(self._selected_class())))
        status_row = QHBoxLayout()
        for button in (self.accept_button, self.edit_button, self.reject_button, self.jump_button):
            status_row.addWidget(button)

        self.split_button = QPushButton("Class layers")
        self.split_button.setToolTip("one labels layer per class, for toggling and solo viewing")
        self.split_button.clicked.connect(reports_errors(self.split_class_layers))
        self.solo_button = QPushButton("Solo")
        self.solo_button.clicked.connect(reports_errors(self._toggle_solo))
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(70)
        self.opacity_slider.valueChanged.connect(self._opacity_changed)
        layers_row = QHBoxLayout()
        layers_row.addWidget(self.split_button)
        layers_row.addWidget(self.solo_button)
        layers_row.addWidget(QLabel("opacity"))
        layers_row.addWidget(self.opacity_slider)

        self.complete_check = QCheckBox("Mask complete (no class is missing)")
        self.save_edit = QLineEdit()
        self.save_edit.setPlaceholderText("mask file to write (.nii.gz)")
        self.save_button = QPushButton("Save reviewed mask")
        self.save_button.clicked.connect(reports_errors(self.save))
        save_row = QHBoxLayout()
        save_row.addWidget(self.save_edit)
        save_row.addWidget(self.save_button)
        self.status_label = QLabel(_shortcut_help())
        self.status_label.setWordWrap(True)

        review_page = QWidget()
        review_layout = QVBoxLayout(review_page)
        review_layout.addLayout(form)
        review_layout.addWidget(self.class_table)
        review_layout.addLayout(status_row)
        review_layout.addLayout(layers_row)
        review_layout.addWidget(self.complete_check)
        review_layout.addLayout(save_row)
        review_layout.addWidget(self.status_label)

        self.tabs = QTabWidget()
        self.tabs.addTab(scroll_area(review_page), "Review")
        self.refinement_panel = RefinementPanel(self.viewer, review_widget=self)
        self.tabs.addTab(scroll_area(self.refinement_panel), "Refine")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        prepare_viewer(napari_viewer)

        self.shortcuts: dict[str, QShortcut] = {}
        actions = {
            "accept": lambda: self._set_selected_status("accepted"),
            "needs edit": lambda: self._set_selected_status("corrected"),
            "reject": lambda: self._set_selected_status("rejected"),
            "next": lambda: self._step_class(1),
            "previous": lambda: self._step_class(-1),
            "solo": self._toggle_solo,
        }
        for name, action in actions.items():
            shortcut = QShortcut(QKeySequence(SHORTCUTS[name]), self)
            shortcut.setContext(Qt.ShortcutContext.WindowShortcut)
            shortcut.activated.connect(reports_errors(action))
            self.shortcuts[name] = shortcut

    # public API ------------------------------------------------------------------------------

    def run_inference(self, run_dir: str | Path | None = None, image_layer: Image | None = None) -> FunctionWorker:
        """Segment the image with a stage-2 run in a thread worker; the result becomes the layer.

        Raises:
            CPS4Error: no image, no run folder, or a run already going.
        """
        if self.worker is not None:
            raise CPS4Error("inference is already running")
        image_layer = image_layer or self.image_combo.layer()
        if image_layer is None:
            raise CPS4Error("open an image first")
        run_text = str(run_dir) if run_dir is not None else self.run_edit.text().strip()
        if not run_text:
            raise CPS4Error("choose a stage-2 run folder (train one in the Training widget)")
        volume = Volume(image_layer.data, layer_affine(image_layer), image_layer.metadata.get(SOURCE_KEY))
        worker = create_worker(
            predict, Path(run_text), volume,
            _start_thread=False, _connect={"errored": self._inference_failed},
        )
        worker.returned.connect(lambda prediction: self.show_prediction(prediction, image_layer))
        worker.finished.connect(self._inference_finished)
        self.worker = worker
        self.infer_button.setEnabled(False)
        self.status_label.setText("running inference…")
        worker.start()
        return worker

    def show_prediction(self, prediction: Prediction, image_layer: Image) -> Labels:
        """Show a prediction as the pseudo-label layer over ``image_layer`` and review it."""
        name = f"{image_layer.name} pseudo-label"
        data, attributes, _ = labels_layer_data(prediction.labels, layer_affine(image_layer), None, name)
        attributes["scale"] = tuple(image_layer.scale)
        attributes["translate"] = tuple(image_layer.translate)
        attributes["metadata"][IMAGE_KEY] = image_layer.metadata.get(SOURCE_KEY)
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        layer = self.viewer.add_labels(data, **attributes)
        self.review(layer, image_layer, prediction)
        self.status_label.setText(f"{name}: {len(self.class_ids)} classes to review")
        return layer

    def review(
        self, labels_layer: Labels, image_layer: Image | None = None, prediction: Prediction | None = None
    ) -> None:
        """Start reviewing ``labels_layer``: every class present starts ``machine`` (pending)."""
        self._remove_class_layers()
        self.labels_layer = labels_layer
        self.image_layer = image_layer or self.image_combo.layer()
        self.prediction = prediction
        self.statuses = {}
        image_path = labels_layer.metadata.get(IMAGE_KEY) or (
            self.image_layer.metadata.get(SOURCE_KEY) if self.image_layer is not None else None
        )
        self.save_edit.setText(_default_mask_path(image_path))
        self.refresh_class_table()
        self.viewer.layers.selection.active = labels_layer

    def refresh_class_table(self) -> None:
        """Recount voxels and confidences of the reviewed layer and redraw the class table."""
        layer = self.labels_layer
        self.class_table.blockSignals(True)
        if layer is None:
            self.class_ids = []
            self.class_table.setRowCount(0)
            self.class_table.blockSignals(False)
            return
        data = np.asarray(layer.data)
        ids, counts = np.unique(data, return_counts=True)
        present = {int(i): int(n) for i, n in zip(ids, counts) if i != 0}
        self.class_ids = sorted(set(present) | {c for c, s in self.statuses.items() if s != "machine"})
        scheme = scheme_of(layer)
        names, prompts, colors = scheme.names(), scheme.prompts(), scheme.napari_colors()
        confidence = self._mean_confidence(data)
        self.class_table.setRowCount(len(self.class_ids))
        for row, class_id in enumerate(self.class_ids):
            self.statuses.setdefault(class_id, "machine")
            show_item = QTableWidgetItem()
            show_item.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
            class_layer = self.class_layers.get(class_id)
            visible = class_layer.visible if class_layer is not None else True
            show_item.setCheckState(Qt.CheckState.Checked if visible else Qt.CheckState.Unchecked)
            name_item = QTableWidgetItem(color_icon(colors.get(class_id, colors[None])), names.get(class_id, str(class_id)))
            name_item.setToolTip(prompts.get(class_id, ""))
            mean = confidence.get(class_id)
            values = (
                STATUS_LABELS[self.statuses[class_id]],
                str(present.get(class_id, 0)),
                f"{mean:.3f}" if mean is not None else "",
                prompts.get(class_id, ""),
            )
            self.class_table.setItem(row, 0, show_item)
            self.class_table.setItem(row, 1, name_item)
            for column, value in enumerate(values, start=2):
                self.class_table.setItem(row, column, QTableWidgetItem(value))
        self.class_table.blockSignals(False)

    def set_status(self, class_id: int, status: str) -> None:
        """Set a class's review status: one of ``CLASS_STATUSES`` or its label ("needs edit").

        Raises:
            CPS4Error: not a review status.
        """
        self.statuses[class_id] = class_status(status)
        self.refresh_class_table()

    def jump_to_class(self, class_id: int) -> None:
        """Move the slider to the slice through the class's centroid and select its row.

        Raises:
            CPS4Error: the class has no voxels in the reviewed layer.
        """
        layer = self._require_layer()
        voxels = np.argwhere(np.asarray(layer.data) == class_id)
        if voxels.size == 0:
            raise CPS4Error(f"class {class_id} has no voxels", path=f"layer {layer.name!r}")
        centroid = voxels.mean(axis=0)
        for axis in self.viewer.dims.not_displayed:
            slice_index = float(np.round(centroid[axis]))
            self.viewer.dims.set_point(axis, slice_index * layer.scale[axis] + layer.translate[axis])
        if class_id in self.class_ids:
            self.class_table.selectRow(self.class_ids.index(class_id))

    def split_class_layers(self) -> dict[int, Labels]:
        """Add (or refresh) one labels layer per class present, each holding that class only."""
        layer = self._require_layer()
        self._remove_class_layers()
        data = np.asarray(layer.data)
        names = scheme_of(layer).short_names()
        for class_id in self.class_ids:
            only = np.where(data == class_id, class_id, 0).astype(data.dtype)
            attributes = {
                "name": f"{names.get(class_id, class_id)} · {layer.name}",
                "scale": tuple(layer.scale),
                "translate": tuple(layer.translate),
                "colormap": layer.colormap,
                "features": layer.features,
                "opacity": self.opacity_slider.value() / 100,
                "metadata": {**layer.metadata, "class_id": class_id},
            }
            self.class_layers[class_id] = self.viewer.add_labels(only, **attributes)
        layer.visible = False
        self.refresh_class_table()
        return self.class_layers

    def solo(self, class_id: int | None) -> None:
        """Show only ``class_id``'s layer (making class layers if needed); None shows all."""
        layer = self._require_layer()
        if class_id is not None and not self.class_layers:
            self.split_class_layers()
        for other_id, class_layer in self.class_layers.items():
            class_layer.visible = class_id is None or other_id == class_id
        layer.visible = not self.class_layers
        self._solo = class_id is not None
        self.refresh_class_table()

    def save(self, path: str | Path | None = None) -> Path:
        """Write the reviewed mask (accepted + needs-edit classes) and mark the case reviewed.

        Returns:
            The written mask file; every version is kept in ``previous_versions/<name>/``.

        Raises:
            CPS4Error: nothing reviewed to keep, or no target file.
        """
        layer = self._require_layer()
        target_text = str(path) if path is not None else self.save_edit.text().strip()
        if not target_text:
            raise CPS4Error("choose the mask file to write")
        kept = sorted(c for c, s in self.statuses.items() if s in HUMAN_STATUSES)
        if not kept:
            raise CPS4Error("no class is accepted or corrected yet; accept or edit classes before saving")
        data = np.asarray(layer.data)
        reviewed = np.where(np.isin(data, kept), data, 0)
        complete = self.complete_check.isChecked() and all(s in HUMAN_STATUSES for s in self.statuses.values())
        target = Path(target_text)
        save_mask_version(target, reviewed, layer_affine(layer), None if complete else kept,
                          image=layer.metadata.get(IMAGE_KEY))
        layer.metadata[SOURCE_KEY] = str(target)
        self.status_label.setText(f"saved {target.name}: {len(kept)} classes reviewed")
        show_info(f"CPS4: reviewed mask saved to {target}")
        return target

    # internals -------------------------------------------------------------------------------

    def _mean_confidence(self, data: np.ndarray) -> dict[int, float]:
        prediction = self.prediction
        if prediction is None or getattr(prediction, "confidence", None) is None:
            return {}
        confidence = np.asarray(prediction.confidence)
        if confidence.shape != data.shape:
            return {}
        return {
            int(class_id): float(confidence[data == class_id].mean())
            for class_id in np.unique(data)
            if class_id != 0
        }

    def _require_layer(self) -> Labels:
        if self.labels_layer is None or self.labels_layer not in self.viewer.layers:
            raise CPS4Error("nothing to review; run inference or choose a labels layer first")
        return self.labels_layer

    def _selected_class(self) -> int:
        if not self.class_ids:
            raise CPS4Error("nothing to review yet; run inference or choose a labels layer first")
        rows = [index.row() for index in self.class_table.selectionModel().selectedRows()]
        if not rows or not 0 <= rows[0] < len(self.class_ids):
            raise CPS4Error("select a class in the table first")
        return self.class_ids[rows[0]]

    def _set_selected_status(self, status: str) -> None:
        class_id = self._selected_class()
        self.set_status(class_id, status)
        self.class_table.selectRow(self.class_ids.index(class_id))

    def _step_class(self, offset: int) -> None:
        if not self.class_ids:
            raise CPS4Error("nothing to review yet")
        row = (self.class_table.currentRow() + offset) % len(self.class_ids)
        self.class_table.selectRow(row)
        self.jump_to_class(self.class_ids[row])

    def _remove_class_layers(self) -> None:
        for class_layer in self.class_layers.values():
            if class_layer in self.viewer.layers:
                self.viewer.layers.remove(class_layer)
        self.class_layers = {}
        if self.labels_layer is not None:
            self.labels_layer.visible = True

    def _show_box_changed(self, item: QTableWidgetItem) -> None:
        if item.column() != 0 or not 0 <= item.row() < len(self.class_ids):
            return
        class_id = self.class_ids[item.row()]
        if class_id not in self.class_layers:
            self.split_class_layers()
        self.class_layers[class_id].visible = item.checkState() == Qt.CheckState.Checked

    def _opacity_changed(self, value: int) -> None:
        row = self.class_table.currentRow()
        if 0 <= row < len(self.class_ids) and self.class_ids[row] in self.class_layers:
            self.class_layers[self.class_ids[row]].opacity = value / 100
        elif self.labels_layer is not None:
            self.labels_layer.opacity = value / 100

    def _inference_failed(self, error: Exception) -> None:
        # A worker with its own errored handler does not notify the viewer; say it here.
        self.status_label.setText(f"inference failed: {error}")
        show_error(f"CPS4 inference failed: {error}")

    def _inference_finished(self) -> None:
        self.worker = None
        self.infer_button.setEnabled(True)

    def _use_layer_clicked(self) -> None:
        layer = self.labels_combo.layer()
        if layer is None:
            raise CPS4Error("there is no labels layer to review")
        self.review(layer)

    def _toggle_solo(self) -> None:
        self.solo(None if self._solo else self._selected_class())


def _default_mask_path(image_path: str | None) -> str:
    """Where the image's dataset layout keeps its mask, or "" when that is not known."""
    if not image_path:
        return ""
    try:
        return str(mask_path_for_image(image_path))
    except CPS4Error:
        return ""


def _shortcut_help() -> str:
    return "Shortcuts: " + ", ".join(f"{key} {name}" for name, key in SHORTCUTS.items())
