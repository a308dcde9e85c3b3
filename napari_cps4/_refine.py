"""The active-refinement panel: workspace, review queue, spine-aware corrections, rounds.

Embedded in the review widget (its *Refine* tab); usable alone on any labels layer.

- **Workspace**: open a workspace folder, or make one from a dataset folder, optionally
  holding out some of its labeled cases (never trained on; each round's Dice is measured
  on them, which the round plot shows).
- **Review queue**: the workspace's unreviewed cases, most uncertain first, with the
  classes to check; click a row to load that case as an image (sagittal) and a labels
  layer. An empty queue says why it is empty.
- **Corrections** on the reviewed labels layer (``review_widget.labels_layer``, else the
  selected labels layer): shift every level up or down, swap two classes, give the
  structure at a voxel (the cursor, or typed coordinates) another class, and check the
  vertebra/disc order. Everything goes through :mod:`cps4_engine.active.correction`.
- **Save to workspace** stores the layer as a new human label version with the review
  widget's statuses (one vocabulary: the workspace's ``CLASS_STATUSES``).
- **Retrain** runs a refinement round (:mod:`cps4_engine.active.rounds`) off the GUI
  thread; **Stop** cancels it (nothing of the round is recorded). While it runs, the
  workspace refuses human edits (:meth:`cps4_engine.active.workspace.Workspace.begin_round`)
  and every dock showing it greys out its save buttons. The plot shows each round's Dice
  on the held-out cases.
- The panel and the data dock share one workspace object per folder
  (:func:`cps4_engine.active.workspace.shared_workspace`): no dock keeps its own copy. Methods, presets and devices (those this
  machine has) come from :mod:`cps4_engine.options`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import napari
import numpy as np
from napari.layers import Labels
from napari.qt.threading import FunctionWorker, GeneratorWorker, thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from cps4_engine.active import correction
from cps4_engine.active.queue import QueueEntry, review_queue
from cps4_engine.active.workspace import Workspace, class_status, shared_workspace
from cps4_engine.errors import CPS4Error
from cps4_engine.events import CancelToken
from cps4_engine.io import read_volume
from cps4_engine.labels import LabelScheme
from cps4_engine.options import DEFAULT_PRESET, DEFAULT_ROUND_METHOD, METHODS, PRESETS, default_steps, device_choices
from napari_cps4._common import reports_errors
from napari_cps4._layers import (
    AFFINE_KEY,
    IMAGE_KEY,
    image_layer_data,
    labels_layer_data,
    scheme_of,
)
from napari_cps4._plot import ROUND_COLOUR, Axis, CurvePlot
from napari_cps4._view import prepare_viewer
from napari_cps4._workers import round_events

QUEUE_COLUMNS = ("case", "state", "score", "classes to check")


ROUND_AXIS = "held-out Dice"


def round_points(records: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Rounds and their held-out mean Dice (``metrics["mean_dice"]`` in [0, 1]) from round records."""
    points = [
        (int(r["round"]), float(r["metrics"]["mean_dice"]))
        for r in records
        if isinstance(r.get("metrics", {}).get("mean_dice"), (int, float))
    ]
    return [p[0] for p in points], [p[1] for p in points]


class RefinementPanel(QWidget):
    """Active semi-supervised refinement (see the module docstring).

    Args:
        viewer: the napari viewer.
        review_widget: the review widget it is embedded in (provides ``labels_layer``,
            ``image_layer``, ``statuses`` and ``refresh_class_table()``), or None.
    """

    def __init__(self, viewer: napari.viewer.Viewer, review_widget: Any | None = None) -> None:
        super().__init__()
        self.viewer = viewer
        self.review_widget = review_widget
        self.workspace: Workspace | None = None
        self.current_case: str | None = None
        self.queue: list[QueueEntry] = []
        self.worker: GeneratorWorker | FunctionWorker | None = None
        self._round_workspace: Workspace | None = None  # the workspace the running round writes

        self.workspace_edit = QLineEdit()
        self.workspace_edit.setPlaceholderText("workspace folder")
        self.data_edit = QLineEdit()
        self.data_edit.setPlaceholderText("dataset folder (to make a new workspace)")
        open_button = QPushButton("Open")
        open_button.clicked.connect(reports_errors(lambda: self.open_workspace(self.workspace_edit.text().strip())))
        self.heldout_edit = QLineEdit()
        self.heldout_edit.setPlaceholderText("held-out cases, e.g. Case4, Case5")
        self.heldout_edit.setToolTip("labeled cases never trained on; each round's Dice is measured on them")
        init_button = QPushButton("New from dataset")
        init_button.clicked.connect(
            reports_errors(lambda: self.init_workspace(
                self.workspace_edit.text().strip(), self.data_edit.text().strip(),
                [part.strip() for part in self.heldout_edit.text().split(",") if part.strip()],
            ))
        )
        workspace_row = QHBoxLayout()
        workspace_row.addWidget(self.workspace_edit)
        workspace_row.addWidget(open_button)
        data_row = QHBoxLayout()
        data_row.addWidget(self.data_edit)
        data_row.addWidget(init_button)

        self.queue_table = QTableWidget(0, len(QUEUE_COLUMNS))
        self.queue_table.setHorizontalHeaderLabels(QUEUE_COLUMNS)
        self.queue_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.queue_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.queue_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.queue_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.queue_table.cellClicked.connect(reports_errors(lambda row, _column: self.load_case(self.queue[row].case_id)))
        self.queue_label = QLabel("Review queue (most uncertain first)")
        self.queue_label.setWordWrap(True)

        self.first_class = QComboBox()
        self.second_class = QComboBox()
        shift_up = QPushButton("Shift levels up")
        shift_up.setToolTip("rename every vertebra and disc one level up (L4 → L3)")
        shift_up.clicked.connect(reports_errors(lambda: self.shift(+1)))
        shift_down = QPushButton("Shift levels down")
        shift_down.setToolTip("rename every vertebra and disc one level down (L4 → L5)")
        shift_down.clicked.connect(reports_errors(lambda: self.shift(-1)))
        swap_button = QPushButton("Swap")
        swap_button.clicked.connect(reports_errors(lambda: self.swap(self.first_class.currentData(), self.second_class.currentData())))
        self.voxel_edit = QLineEdit()
        self.voxel_edit.setPlaceholderText("voxel i, j, k (empty: under the cursor)")
        relabel_button = QPushButton("Relabel structure as class 1")
        relabel_button.setToolTip("give the connected structure at the voxel the first class above")
        relabel_button.clicked.connect(reports_errors(self._relabel_clicked))
        check_button = QPushButton("Check order")
        check_button.clicked.connect(reports_errors(self.check_order))
        self.report_text = QPlainTextEdit()
        self.report_text.setReadOnly(True)
        self.report_text.setMaximumHeight(90)
        self.save_button = QPushButton("Save to workspace")
        self.save_button.clicked.connect(reports_errors(self.save_to_workspace))

        tools = QGroupBox("Corrections")
        tools_layout = QFormLayout(tools)
        shift_row = QHBoxLayout()
        shift_row.addWidget(shift_up)
        shift_row.addWidget(shift_down)
        tools_layout.addRow(shift_row)
        swap_row = QHBoxLayout()
        swap_row.addWidget(self.first_class)
        swap_row.addWidget(self.second_class)
        swap_row.addWidget(swap_button)
        tools_layout.addRow("classes 1, 2", swap_row)
        relabel_row = QHBoxLayout()
        relabel_row.addWidget(self.voxel_edit)
        relabel_row.addWidget(relabel_button)
        tools_layout.addRow(relabel_row)
        tools_layout.addRow(check_button)
        tools_layout.addRow(self.report_text)
        tools_layout.addRow(self.save_button)

        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1_000_000)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(PRESETS)
        self.preset_combo.currentTextChanged.connect(lambda preset: self.steps_spin.setValue(default_steps(preset, 2)))
        self.preset_combo.setCurrentText(DEFAULT_PRESET)
        self.steps_spin.setValue(default_steps(DEFAULT_PRESET, 2))
        self.method_combo = QComboBox()
        self.method_combo.addItems(METHODS)
        self.method_combo.setCurrentText(DEFAULT_ROUND_METHOD)
        self.vlm_edit = QLineEdit()
        self.vlm_edit.setPlaceholderText("stage-1 run (for cps4)")
        self.device_combo = QComboBox()
        self.device_combo.addItems(device_choices())
        self.retrain_button = QPushButton("Retrain (next round)")
        self.retrain_button.clicked.connect(reports_errors(self.retrain))
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("cancel the running round; the workspace stays as it was")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(reports_errors(self.stop))
        self.cancel = CancelToken()
        self.progress_label = QLabel("")
        self.plot = CurvePlot("round", Axis(ROUND_AXIS, ROUND_COLOUR, limits=(0.0, 1.0), markers=True), height=170)
        rounds_box = QGroupBox("Rounds")
        rounds_layout = QFormLayout(rounds_box)
        rounds_layout.addRow("method", self.method_combo)
        rounds_layout.addRow("stage-1 run", self.vlm_edit)
        rounds_layout.addRow("preset", self.preset_combo)
        rounds_layout.addRow("steps", self.steps_spin)
        rounds_layout.addRow("device", self.device_combo)
        round_buttons = QHBoxLayout()
        round_buttons.addWidget(self.retrain_button)
        round_buttons.addWidget(self.stop_button)
        rounds_layout.addRow(round_buttons)
        rounds_layout.addRow(self.progress_label)
        rounds_layout.addRow(self.plot)

        layout = QVBoxLayout(self)
        layout.addLayout(workspace_row)
        layout.addLayout(data_row)
        layout.addWidget(self.heldout_edit)
        layout.addWidget(self.queue_label)
        layout.addWidget(self.queue_table)
        layout.addWidget(tools)
        layout.addWidget(rounds_box)
        self._fill_class_combos(scheme_of(None))
        prepare_viewer(viewer)

    # workspace and queue -----------------------------------------------------------------

    def open_workspace(self, path: str | Path) -> Workspace:
        """Open a workspace folder and show its queue and rounds."""
        if not str(path):
            raise CPS4Error("choose a workspace folder")
        workspace = shared_workspace(path)
        if self.workspace is not workspace:
            if self.workspace is not None:
                self.workspace.remove_round_listener(self._round_running_changed)
            workspace.add_round_listener(self._round_running_changed)
            self.workspace = workspace
        self._round_running_changed(workspace.round_running)
        self.workspace_edit.setText(str(self.workspace.root))
        self._fill_class_combos(self.workspace.scheme)
        self.refresh_queue()
        return self.workspace

    def init_workspace(self, path: str | Path, data: str | Path, heldout: Sequence[str] = ()) -> Workspace:
        """Make a workspace from a dataset folder (its masks become human labels).

        Args:
            path: the workspace folder to create.
            data: the dataset folder (any layout).
            heldout: ids of labeled cases to hold out of training.

        Raises:
            CPS4Error: a folder is missing, or a held-out id is no labeled case.
        """
        from cps4_engine.data import open_dataset
        from cps4_engine.labels import mrspineseg_scheme

        if not str(path) or not str(data):
            raise CPS4Error("choose a workspace folder and a dataset folder")
        dataset = open_dataset(data)
        labeled = {case.case_id for case in dataset.cases if case.is_labeled}
        unknown = [case_id for case_id in heldout if case_id not in labeled]
        if unknown:
            raise CPS4Error(f"held-out case {unknown[0]!r} is not a labeled case of the dataset "
                            f"(labeled: {', '.join(sorted(labeled)) or 'none'})", path=dataset.root)
        Workspace.create(path, list(dataset.cases), mrspineseg_scheme(), source=str(dataset.root),
                         heldout=list(heldout))
        return self.open_workspace(path)

    def refresh_queue(self) -> None:
        """Re-rank the review queue and redraw the table and the round plot."""
        workspace = self._require_workspace()
        self.queue = review_queue(workspace)
        self.queue_table.setRowCount(len(self.queue))
        for row, entry in enumerate(self.queue):
            classes = ", ".join(
                f"{workspace.scheme.by_id(figures.class_id).short} {figures.score:.2f}"
                for figures, _status in entry.classes[:4]
            )
            values = (entry.case_id, entry.state, f"{entry.uncertainty.score:.3f}", classes)
            for column, value in enumerate(values):
                self.queue_table.setItem(row, column, QTableWidgetItem(value))
        self.queue_label.setText(_queue_caption(workspace, len(self.queue)))
        self.plot.set_points(ROUND_AXIS, *round_points(workspace.rounds))

    def load_case(self, case_id: str) -> Labels:
        """Show a workspace case: its image and its latest labels as layers.

        The labels layer is handed to the review widget when there is one.
        """
        workspace = self._require_workspace()
        image = read_volume(workspace.image_path(case_id), kind="image")
        labels = workspace.current_labels(case_id)
        if labels is None:
            labels = np.zeros(image.shape, dtype=np.int32)
        data, attributes, _ = image_layer_data(image, name=case_id)
        for name in (case_id, f"{case_id} labels"):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        image_layer = self.viewer.add_image(data, **attributes)  # opens sagittal (prepare_viewer)
        data, attributes, _ = labels_layer_data(
            labels, image.affine, workspace.version_path(case_id), f"{case_id} labels", workspace.scheme
        )
        attributes["metadata"][IMAGE_KEY] = str(workspace.image_path(case_id))
        labels_layer = self.viewer.add_labels(data, **attributes)
        self.current_case = case_id
        if self.review_widget is not None:
            self.review_widget.review(labels_layer, image_layer)
            for class_id, status in workspace.class_statuses(case_id).items():
                self.review_widget.statuses[class_id] = status.status
            self.review_widget.refresh_class_table()
        self.viewer.layers.selection.active = labels_layer
        return labels_layer

    def save_to_workspace(self) -> int:
        """Store the corrected layer as a new human label version of the loaded case."""
        workspace = self._require_workspace()
        if self.current_case is None:
            raise CPS4Error("load a case from the review queue first")
        layer = self.target_layer()
        statuses = {}
        if self.review_widget is not None:
            statuses = {
                class_id: class_status(status)
                for class_id, status in self.review_widget.statuses.items()
                if class_status(status) != "machine" and (np.asarray(layer.data) == class_id).any()
            }
        version = workspace.save_human_labels(self.current_case, np.asarray(layer.data), statuses)
        show_info(f"CPS4: saved {self.current_case} as label version {version}")
        self.refresh_queue()
        return version

    # corrections -------------------------------------------------------------------------

    def target_layer(self) -> Labels:
        """The labels layer the tools act on: the review widget's, else the selected one."""
        layer = getattr(self.review_widget, "labels_layer", None)
        if layer is None or layer not in self.viewer.layers:
            active = self.viewer.layers.selection.active
            layer = active if isinstance(active, Labels) else None
        if layer is None:
            raise CPS4Error("select a labels layer (or review one) first")
        return layer

    def _scheme(self, layer: Labels) -> LabelScheme:
        return self.workspace.scheme if self.workspace is not None else scheme_of(layer)

    def _apply(self, layer: Labels, labels: np.ndarray, message: str) -> None:
        layer.data = labels.astype(np.asarray(layer.data).dtype, copy=False)
        if self.review_widget is not None:
            self.review_widget.refresh_class_table()
        self.report_text.setPlainText(message)

    def shift(self, offset: int) -> None:
        """Rename every vertebra and disc of the target layer ``offset`` levels up (+) or down."""
        layer = self.target_layer()
        shifted = correction.shift_levels(np.asarray(layer.data), offset, self._scheme(layer))
        self._apply(layer, shifted, f"shifted every level {abs(offset)} {'up' if offset > 0 else 'down'}")

    def swap(self, first: int, second: int) -> None:
        """Exchange two classes in the target layer."""
        if first is None or second is None:
            raise CPS4Error("choose the two classes to swap (classes 1 and 2)")
        layer = self.target_layer()
        scheme = self._scheme(layer)
        swapped = correction.swap_classes(np.asarray(layer.data), int(first), int(second), scheme)
        self._apply(layer, swapped, f"swapped {scheme.by_id(first).short} and {scheme.by_id(second).short}")

    def relabel_at(self, voxel: tuple[int, int, int], new_class: int) -> None:
        """Give the connected structure containing ``voxel`` (layer data index) ``new_class``."""
        layer = self.target_layer()
        scheme = self._scheme(layer)
        relabelled = correction.relabel_component(np.asarray(layer.data), voxel, int(new_class), scheme)
        self._apply(layer, relabelled, f"structure at {tuple(voxel)} is now {scheme.by_id(new_class).short}")

    def cursor_voxel(self) -> tuple[int, int, int]:
        """The target layer's voxel under the viewer's cursor."""
        layer = self.target_layer()
        position = layer.world_to_data(self.viewer.cursor.position)
        return tuple(int(round(p)) for p in position[-3:])  # type: ignore[return-value]

    def check_order(self) -> correction.OrderReport:
        """Check vertebra/disc order of the target layer and show the report."""
        layer = self.target_layer()
        affine = layer.metadata.get(AFFINE_KEY)
        if affine is None:
            raise CPS4Error("has no source geometry for the order check", path=f"layer {layer.name!r}")
        report = correction.check_order(np.asarray(layer.data), np.asarray(affine), self._scheme(layer))
        self.report_text.setPlainText(str(report))
        return report

    def _relabel_clicked(self) -> None:
        text = self.voxel_edit.text().strip()
        if text:
            try:
                voxel = tuple(int(part) for part in text.replace(",", " ").split())
            except ValueError:
                raise CPS4Error(f"voxel {text!r}: give three integers i, j, k") from None
            if len(voxel) != 3:
                raise CPS4Error(f"voxel {text!r}: give three integers i, j, k")
        else:
            voxel = self.cursor_voxel()
        new_class = self.first_class.currentData()
        if new_class is None:
            raise CPS4Error("choose the new class as class 1 first")
        self.relabel_at(voxel, new_class)

    # rounds -------------------------------------------------------------------------------

    def retrain(self) -> GeneratorWorker:
        """Run the next refinement round in a thread worker; the queue and plot refresh at the end."""
        from cps4_engine.active.rounds import RoundConfig

        workspace = self._require_workspace()
        if self.worker is not None and self.worker.is_running:
            raise CPS4Error("a round is already running")
        vlm = self.vlm_edit.text().strip() or None
        config = RoundConfig(
            method=self.method_combo.currentText(),
            vlm=vlm,
            preset=self.preset_combo.currentText(),
            max_steps=self.steps_spin.value(),
            device=self.device_combo.currentText(),
        )
        workspace.begin_round()  # greys out saving in every dock showing this workspace
        self._round_workspace = workspace
        self.cancel = CancelToken()
        worker = thread_worker(round_events)(workspace, config, self.cancel)
        worker.yielded.connect(self._round_event)
        worker.finished.connect(self._round_finished)
        worker.errored.connect(self._round_failed)
        self.progress_label.setText(f"round {workspace.current_round + 1}: starting")
        self.worker = worker
        worker.start()
        return worker

    def stop(self) -> None:
        """Cancel the running round: the trainer stops at its next step, nothing is recorded."""
        if self._round_workspace is None:  # the worker may not have reached its thread yet
            raise CPS4Error("no round is running")
        self.cancel.cancel()
        self.progress_label.setText("stopping the round…")

    def _round_running_changed(self, running: bool) -> None:
        self.retrain_button.setEnabled(not running)
        self.save_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def _round_event(self, event: Any) -> None:
        self.progress_label.setText(event.message or f"{event.kind} {event.step}/{event.max_steps}")

    def _round_finished(self) -> None:
        if self._round_workspace is not None:
            self._round_workspace.end_round()
            self._round_workspace = None
        if self.workspace is not None:
            self.workspace.reload()
            self.refresh_queue()
        if self.cancel.cancelled:
            self.progress_label.setText("round cancelled: the workspace is as it was")

    def _round_failed(self, error: Exception) -> None:
        self.progress_label.setText(f"round failed: {error}")
        show_error(f"CPS4 refinement round failed: {error}")

    # internals ----------------------------------------------------------------------------

    def _require_workspace(self) -> Workspace:
        if self.workspace is None:
            raise CPS4Error("open or create a workspace first")
        return self.workspace

    def _fill_class_combos(self, scheme: LabelScheme) -> None:
        # Foreground classes only, none chosen: a swap or relabel is always the user's pick.
        for combo in (self.first_class, self.second_class):
            combo.clear()
            for info in scheme.classes:
                if info.id in scheme.foreground_ids:
                    combo.addItem(f"{info.short} ({info.id})", info.id)
            combo.setCurrentIndex(-1)
            combo.setPlaceholderText("class")


def _queue_caption(workspace: Workspace, queued: int) -> str:
    """The queue's heading; for an empty queue, why it is empty and what to do next."""
    if queued:
        return f"Review queue: {queued} cases, most uncertain first"
    if not workspace.unreviewed():
        return "Review queue empty: every training case has a complete, reviewed mask"
    return ("Review queue empty: no unreviewed case has a machine prediction yet; "
            "press Retrain to run a round, which predicts them")
