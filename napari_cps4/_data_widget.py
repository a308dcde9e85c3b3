"""Data widget: open a dataset, see each case's status, label a volume from scratch.

Top half — **dataset**: any layout :func:`cps4_engine.data.open_dataset` reads
(MRSpineSeg, nnU-Net/Decathlon, index JSON, plain folder), or an active-refinement
workspace (a folder with ``workspace.json``). The table lists every case with its status
— ``labeled``, ``partial``, ``unlabeled`` for a dataset; ``unlabeled``,
``pseudo-labeled``, ``in review``, ``reviewed``, ``held out`` for a workspace — and its
human-painted classes; double-click a row or press *Load case* to open its image and mask
as layers. Every spine volume opens sagittal (slider along the sagittal axis found from
the affine, superior up; :mod:`napari_cps4._view`); *Sagittal view* turns the view back on
demand.

Bottom half — **labeling**: pick an image layer, *New labels layer* makes an empty
labels layer over it with the scheme's colours; choose the class to paint by name in the
class list (it sets napari's brush label), paint with napari's tools, tick *Mask
complete* when every unpainted voxel really is background, and *Add to labeled set*
saves the mask in the image's geometry, atomically, with the partial-mask sidecar
listing the painted classes; every version is kept in ``previous_versions/<name>/``
(:func:`cps4_engine.active.workspace.save_mask_version`).

Where the mask goes: a case of an open workspace gets a new human label version; an image
that belongs to the open dataset gets its mask where that layout keeps masks
(:mod:`cps4_engine.layouts`: MRSpineSeg ``Mask/mask_case<N>``, nnU-Net ``labelsTr/<case>``,
plain folder ``<case>_seg`` for ``<case>`` or ``<case>_img``); any other image (the sample data, a file opened from elsewhere, a case of a read-only
index-JSON dataset) is added as a new case ``MR/Case<N>`` + ``Mask/mask_case<N>`` to the
labeled-set folder, in the MRSpineSeg layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import napari
import numpy as np
from napari.layers import Image, Labels, Layer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from cps4_engine.active.workspace import MANIFEST as WORKSPACE_MANIFEST
from cps4_engine.active.workspace import Workspace, save_mask_version, shared_workspace
from cps4_engine.data import Case, Dataset, open_dataset
from cps4_engine.errors import CPS4Error
from cps4_engine.io import read_volume, write_volume
from cps4_engine.layouts import mask_path_for_image, next_mrspineseg_case
from napari_cps4._common import LayerCombo, color_icon, reports_errors, scrolling
from napari_cps4._layers import (
    IMAGE_KEY,
    SOURCE_KEY,
    labels_layer_data,
    layer_affine,
    new_labels_for,
    scheme_of,
)
from napari_cps4._reader import read_layer
from napari_cps4._view import prepare_viewer, show_sagittal

CASE_COLUMNS = ("Case", "Status", "Painted classes", "Image")


class DataWidget(QWidget):
    """Dataset table and labeling-from-scratch controls (see the module docstring)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.dataset: Dataset | None = None
        self.workspace: Workspace | None = None
        self.cases: list[Case] = []
        self._painted_layer: Labels | None = None

        self.dataset_edit = QLineEdit()
        self.dataset_edit.setPlaceholderText("dataset folder or index.json")
        browse_button = QPushButton("Browse…")
        browse_button.clicked.connect(reports_errors(self._browse_dataset))
        self.open_button = QPushButton("Open")
        self.open_button.clicked.connect(reports_errors(self._open_clicked))
        path_row = QHBoxLayout()
        path_row.addWidget(self.dataset_edit)
        path_row.addWidget(browse_button)
        path_row.addWidget(self.open_button)

        self.case_table = QTableWidget(0, len(CASE_COLUMNS))
        self.case_table.setHorizontalHeaderLabels(CASE_COLUMNS)
        self.case_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.case_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.case_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.case_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.case_table.cellDoubleClicked.connect(reports_errors(lambda row, _column: self._load_row(row)))
        self.load_button = QPushButton("Load case")
        self.load_button.clicked.connect(reports_errors(lambda: self._load_row(self.case_table.currentRow())))
        self.sagittal_button = QPushButton("Sagittal view")
        self.sagittal_button.setToolTip("page through sagittal slices of the chosen image, superior up")
        self.sagittal_button.clicked.connect(reports_errors(self._sagittal_clicked))
        case_buttons = QHBoxLayout()
        case_buttons.addWidget(self.load_button)
        case_buttons.addWidget(self.sagittal_button)

        dataset_box = QGroupBox("Dataset")
        dataset_layout = QVBoxLayout(dataset_box)
        dataset_layout.addLayout(path_row)
        dataset_layout.addWidget(self.case_table)
        dataset_layout.addLayout(case_buttons)

        self.image_combo = LayerCombo(napari_viewer, Image)
        self.new_labels_button = QPushButton("New labels layer")
        self.new_labels_button.setToolTip("An empty labels layer over the image, with the class palette")
        self.new_labels_button.clicked.connect(reports_errors(self.create_labels_layer))
        self.labels_combo = LayerCombo(napari_viewer, Labels)
        self.labels_combo.currentTextChanged.connect(self._labels_layer_changed)
        self.class_combo = QComboBox()
        self.class_combo.currentIndexChanged.connect(self._class_chosen)
        self.complete_check = QCheckBox("Mask complete (unpainted voxels are background)")
        self.labeled_set_edit = QLineEdit()
        self.labeled_set_edit.setPlaceholderText("folder for new labeled cases (MRSpineSeg layout)")
        self.add_button = QPushButton("Add to labeled set")
        self.add_button.clicked.connect(reports_errors(self.add_to_labeled_set))
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        labeling_box = QGroupBox("Labeling")
        labeling_layout = QFormLayout(labeling_box)
        labeling_layout.addRow("Image", self.image_combo)
        labeling_layout.addRow(self.new_labels_button)
        labeling_layout.addRow("Labels", self.labels_combo)
        labeling_layout.addRow("Paint class", self.class_combo)
        labeling_layout.addRow(self.complete_check)
        labeling_layout.addRow("Labeled set", self.labeled_set_edit)
        labeling_layout.addRow(self.add_button)
        labeling_layout.addRow(self.status_label)

        content = QWidget()
        layout = QVBoxLayout(content)
        layout.addWidget(dataset_box)
        layout.addWidget(labeling_box)
        layout.addStretch(1)
        scrolling(self, content)
        self._labels_layer_changed(self.labels_combo.currentText())
        prepare_viewer(napari_viewer)

    # dataset -----------------------------------------------------------------------------

    def open_dataset(self, path: str | Path) -> list[Case]:
        """Open a dataset folder (any supported layout) or a workspace and list its cases.

        A folder with a ``workspace.json`` is opened as an active-refinement workspace: the
        table then shows each case's review state (``unlabeled``, ``pseudo-labeled``,
        ``in review``, ``reviewed``, ``held out``) and its latest label version.

        Raises:
            CPS4Error: the folder is missing, empty or of no known layout.
        """
        path = Path(path)
        if (path / WORKSPACE_MANIFEST).is_file():
            self._use_workspace(shared_workspace(path))
            self.dataset = None
        else:
            self.dataset = open_dataset(path)
            self._use_workspace(None)
            if not self.labeled_set_edit.text() and self.dataset.layout == "mrspineseg":
                self.labeled_set_edit.setText(str(self.dataset.root))
        self.dataset_edit.setText(str(path))
        self.refresh_cases()
        return self.cases

    def _use_workspace(self, workspace: Workspace | None) -> None:
        """Show ``workspace`` (the object every dock shares) and follow its rounds."""
        if self.workspace is not None and self.workspace is not workspace:
            self.workspace.remove_round_listener(self._round_running_changed)
        if workspace is not None and workspace is not self.workspace:
            workspace.add_round_listener(self._round_running_changed)
        self.workspace = workspace
        self.add_button.setEnabled(workspace is None or not workspace.round_running)

    def _round_running_changed(self, running: bool) -> None:
        self.add_button.setEnabled(not running)
        self.add_button.setToolTip("a retraining round is running on this workspace" if running else "")
        if not running and self.workspace is not None:
            self.workspace.reload()
            self.refresh_cases()

    def refresh_cases(self) -> None:
        """Re-read the cases and their status into the table."""
        if self.workspace is not None:
            workspace = self.workspace
            self.cases = [
                Case(case_id, workspace.image_path(case_id), workspace.version_path(case_id),
                     tuple(workspace.human_classes(case_id)) or None)
                for case_id in workspace.case_ids()
            ]
            statuses = [workspace.state(case.case_id) for case in self.cases]
        else:
            self.cases = list(self.dataset.cases) if self.dataset is not None else []
            statuses = [case_status(case) for case in self.cases]
        self.case_table.setRowCount(len(self.cases))
        names = scheme_of(None).short_names()
        for row, (case, status) in enumerate(zip(self.cases, statuses)):
            painted = ", ".join(names.get(i, str(i)) for i in case.painted) if case.painted else ""
            values = (case.case_id, status, painted, Path(case.image_path).name)
            for column, value in enumerate(values):
                self.case_table.setItem(row, column, QTableWidgetItem(value))

    def load_case(self, case: Case) -> list[Layer]:
        """Add a case's image (and mask, when it has one) as layers; returns the new layers.

        The image opens sagittal (:func:`napari_cps4._view.prepare_viewer`), so the
        annotator pages through sagittal slices.
        """
        image = self.viewer.add_layer(Layer.create(*read_layer(Path(case.image_path))))
        layers = [image]
        if case.label_path is not None:
            mask = read_volume(case.label_path, kind="label")
            data, attributes, _ = labels_layer_data(
                mask.array, mask.affine, case.label_path, f"{case.case_id} labels", scheme_of(None)
            )
            attributes["metadata"][IMAGE_KEY] = str(case.image_path)
            attributes["scale"] = tuple(image.scale)
            layers.append(self.viewer.add_labels(data, **attributes))
        self.image_combo.select_layer(image)
        if len(layers) > 1:
            self.labels_combo.select_layer(layers[1])
        return layers

    # labeling ----------------------------------------------------------------------------

    def create_labels_layer(self, image_layer: Image | None = None) -> Labels:
        """Create an empty labels layer over ``image_layer`` (default: the chosen image).

        Raises:
            CPS4Error: there is no image layer, or it has no known geometry.
        """
        image_layer = image_layer or self.image_combo.layer()
        if image_layer is None:
            raise CPS4Error("open an image first (File > Open, or load a case above)")
        data, attributes, _ = new_labels_for(image_layer, f"{image_layer.name} labels")
        labels_layer = self.viewer.add_labels(data, **attributes)
        labels_layer.mode = "paint"
        self.labels_combo.select_layer(labels_layer)
        self.viewer.layers.selection.active = labels_layer
        self._class_chosen(self.class_combo.currentIndex())
        return labels_layer

    def add_to_labeled_set(self, labels_layer: Labels | None = None, image_layer: Image | None = None) -> Path:
        """Save the painted mask (and, for a new case, its image) as a labeled case.

        Returns:
            The written mask file.

        Raises:
            CPS4Error: nothing painted, no geometry, or no folder to add a new case to.
        """
        labels_layer = labels_layer or self.labels_combo.layer()
        image_layer = image_layer or self.image_combo.layer()
        if labels_layer is None:
            raise CPS4Error("no labels layer to save; press 'New labels layer' and paint first")
        array = np.asarray(labels_layer.data)
        painted = sorted(int(v) for v in np.unique(array) if v != 0)
        if not painted:
            raise CPS4Error("nothing is painted yet", path=f"layer {labels_layer.name!r}")
        affine = layer_affine(labels_layer)
        image_path = labels_layer.metadata.get(IMAGE_KEY)
        if image_path is None and image_layer is not None:
            image_path = image_layer.metadata.get(SOURCE_KEY)
        complete = self.complete_check.isChecked()
        workspace_case = self._case_of(image_path) if self.workspace is not None else None
        if workspace_case is not None:
            version = self.workspace.save_human_labels(workspace_case.case_id, array, complete=complete)
            self.status_label.setText(f"Saved {workspace_case.case_id} as label version {version}")
            self.refresh_cases()
            return self.workspace.version_path(workspace_case.case_id)
        mask_path = self._mask_path_in_dataset(image_path)
        if mask_path is None:
            if image_layer is None:
                raise CPS4Error("choose the image these labels belong to", path=f"layer {labels_layer.name!r}")
            image_path, mask_path = self._new_case_paths()
            write_volume(image_path, np.asarray(image_layer.data), layer_affine(image_layer))
        save_mask_version(mask_path, array, affine, None if complete else painted, image=image_path)
        labels_layer.metadata[SOURCE_KEY] = str(mask_path)
        labels_layer.metadata[IMAGE_KEY] = str(image_path)
        names = scheme_of(labels_layer).names()
        state = "complete" if complete else "partial"
        self.status_label.setText(
            f"Saved {mask_path.name} ({state}: {', '.join(names.get(i, str(i)) for i in painted)})"
        )
        self._reopen_dataset()
        return mask_path

    # internals ---------------------------------------------------------------------------

    def _case_of(self, image_path: str | None) -> Case | None:
        if image_path is None:
            return None
        resolved = Path(image_path).resolve()
        return next((case for case in self.cases if Path(case.image_path).resolve() == resolved), None)

    def _mask_path_in_dataset(self, image_path: str | None) -> Path | None:
        case = self._case_of(image_path) if self.dataset is not None else None
        if case is None:
            return None
        if case.label_path is not None:
            return Path(case.label_path)
        if self.dataset.layout == "index":
            return None
        return mask_path_for_image(case.image_path, self.dataset.layout)

    def _new_case_paths(self) -> tuple[Path, Path]:
        text = self.labeled_set_edit.text().strip()
        if not text:
            raise CPS4Error("choose a labeled-set folder (or open a dataset) to add this image to")
        return next_mrspineseg_case(text)

    def _reopen_dataset(self) -> None:
        root_text = self.dataset_edit.text().strip() or self.labeled_set_edit.text().strip()
        if root_text:
            self.open_dataset(root_text)

    def _labels_layer_changed(self, name: str) -> None:
        if self._painted_layer is not None:
            self._painted_layer.events.selected_label.disconnect(self._sync_class_from_layer)
            self._painted_layer = None
        layer = self.labels_combo.layer()
        scheme = scheme_of(layer)
        colors = scheme.napari_colors()
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        for class_id, class_name in sorted(scheme.names().items()):
            if class_id != 0:
                self.class_combo.addItem(color_icon(colors[class_id]), class_name, class_id)
        self.class_combo.blockSignals(False)
        if layer is not None:
            self._painted_layer = layer
            layer.events.selected_label.connect(self._sync_class_from_layer)
            self._sync_class_from_layer()

    def _sagittal_clicked(self) -> None:
        layer = self.image_combo.layer()
        if layer is None:
            raise CPS4Error("open an image first")
        show_sagittal(self.viewer, layer)

    def _class_chosen(self, index: int) -> None:
        layer = self.labels_combo.layer()
        class_id = self.class_combo.itemData(index)
        if layer is not None and class_id is not None and layer.selected_label != class_id:
            layer.selected_label = int(class_id)

    def _sync_class_from_layer(self, event: Any = None) -> None:
        layer = self._painted_layer
        if layer is None:
            return
        index = self.class_combo.findData(int(layer.selected_label))
        if index >= 0 and index != self.class_combo.currentIndex():
            self.class_combo.blockSignals(True)
            self.class_combo.setCurrentIndex(index)
            self.class_combo.blockSignals(False)

    def _browse_dataset(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Dataset folder")
        if folder:
            self.dataset_edit.setText(folder)
            self._open_clicked()

    def _open_clicked(self) -> None:
        text = self.dataset_edit.text().strip()
        if not text:
            raise CPS4Error("type or browse to a dataset folder first")
        self.open_dataset(text)

    def _load_row(self, row: int) -> None:
        if not 0 <= row < len(self.cases):
            raise CPS4Error("choose a case in the table first")
        self.load_case(self.cases[row])


def case_status(case: Case) -> str:
    """``labeled``, ``partial`` or ``unlabeled`` for a dataset case."""
    if not case.is_labeled:
        return "unlabeled"
    return "partial" if case.is_partial else "labeled"
