"""The annotator's session by mouse clicks, in a real viewer with the four docks docked.

Every QPushButton of every dock is clicked at least once (``ButtonClicks`` checks it at
the end of the walk), with ``qtbot.mouseClick`` on the real buttons, following
docs/walkthrough.md: open the sample → new labels → paint → add to the labeled set → the
dataset reopens with the case labeled → train stage 1 and stage 2 (tiny) → Stop, Resume →
review the pseudo-label → accept / needs edit / reject → save → Refine: new workspace,
retrain one round (the round plot gets a point), stop a second one, open a queued case, shift levels, swap,
relabel, check order, save → the prompt inspector's heat map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QPushButton, QTableWidget, QWidget

import napari_cps4._common
import napari_cps4._data_widget
import napari_cps4._inspector_widget
import napari_cps4._refine
import napari_cps4._review_widget
import napari_cps4._training_widget
from cps4_engine.active.workspace import Workspace
from cps4_engine.data import open_dataset
from cps4_engine.io import read_volume, sagittal_layout, write_volume
from cps4_engine.labels import mrspineseg_scheme
from cps4_engine.synthetic import sample_volume, write_synthetic_dataset
from napari_cps4._layers import AFFINE_KEY
from napari_cps4._review_widget import STATUS_COLUMN
from napari_cps4._training_widget import STAGES
from napari_cps4._refine import ROUND_AXIS

pytestmark = pytest.mark.viewer

STAGE1, STAGE2 = list(STAGES)
RUN_TIMEOUT_MS = 180_000
DOCKS = ("Data and labeling", "Training", "Per-class review", "Prompt inspector")
NOTIFYING_MODULES = (
    napari_cps4._common,
    napari_cps4._review_widget,
    napari_cps4._training_widget,
    napari_cps4._refine,
    napari_cps4._inspector_widget,
)


class Notifications:
    """The viewer notifications the plugin shows, by kind (``error``, ``warning``, ``info``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shown: list[tuple[str, str]] = []
        for module in NOTIFYING_MODULES:
            for kind in ("error", "warning", "info"):
                name = f"show_{kind}"
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, lambda message, kind=kind: self.shown.append((kind, message)))

    def errors(self) -> list[str]:
        return [message for kind, message in self.shown if kind == "error"]

    def warnings(self) -> list[str]:
        return [message for kind, message in self.shown if kind == "warning"]

    def take_errors(self) -> list[str]:
        """The errors shown since the last call."""
        errors = self.errors()
        self.shown = [(kind, message) for kind, message in self.shown if kind != "error"]
        return errors


class ButtonClicks:
    """Every push button of some widgets, and which of them a mouse click has reached."""

    def __init__(self, qtbot, widgets: list[QWidget]) -> None:
        self.qtbot = qtbot
        self.buttons = {button for widget in widgets for button in widget.findChildren(QPushButton)}
        self.clicked: set[QPushButton] = set()
        for button in self.buttons:
            button.clicked.connect(lambda _checked=False, button=button: self.clicked.add(button))

    def click(self, button: QPushButton) -> None:
        assert button.isVisible() and button.isEnabled(), f"button {button.text()!r} cannot be clicked"
        self.qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
        assert button in self.clicked, f"the click did not reach {button.text()!r}"

    def by_text(self, owner: QWidget, text: str) -> QPushButton:
        [button] = [b for b in owner.findChildren(QPushButton) if b.text() == text]
        return button

    def click_text(self, owner: QWidget, text: str) -> None:
        self.click(self.by_text(owner, text))

    def not_clicked(self) -> list[str]:
        return sorted(button.text() for button in self.buttons - self.clicked)


def click_cell(qtbot, table: QTableWidget, row: int, column: int = 0, double: bool = False) -> None:
    """Click (or double-click) a table cell with the mouse."""
    table.scrollToItem(table.item(row, column))
    centre = table.visualItemRect(table.item(row, column)).center()
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=centre)
    if double:  # a double click is a press and release followed by a double-click event
        qtbot.mouseDClick(table.viewport(), Qt.MouseButton.LeftButton, pos=centre)


def wait_idle(qtbot, widget) -> None:
    """Wait until a dock's worker has finished (the dock forgets it then)."""
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)


@pytest.fixture
def docked(make_napari_viewer, monkeypatch):
    """A shown viewer with the four docks docked, and the notifications they show."""
    viewer = make_napari_viewer(show=True)
    notes = Notifications(monkeypatch)
    widgets = {name: viewer.window.add_plugin_dock_widget("napari-cps4", name)[1] for name in DOCKS}
    return viewer, widgets, notes


def test_every_button_of_every_dock_by_clicks(docked, qtbot, tmp_path: Path, monkeypatch) -> None:
    viewer, widgets, notes = docked
    data_dock, training, review, inspector = (widgets[name] for name in DOCKS)
    clicks = ButtonClicks(qtbot, list(widgets.values()))
    dataset = tmp_path / "data"
    write_synthetic_dataset(dataset, cases=4, seed=5)
    case2_truth = truth_of(dataset, "Case2")
    (dataset / "Mask" / "mask_case2.nii.gz").unlink()  # one unlabeled case for the review queue

    # -- Data and labeling: the sample opens sagittal; label it from scratch by clicks --------
    viewer.open_sample("napari-cps4", "spine")
    image = viewer.layers["synthetic spine"]
    sagittal_axis = sagittal_layout(image.metadata[AFFINE_KEY]).axes[0]
    assert viewer.dims.not_displayed == (sagittal_axis,)
    viewer.layers.remove("synthetic spine labels")

    monkeypatch.setattr(napari_cps4._data_widget.QFileDialog, "getExistingDirectory", lambda *args: str(dataset))
    clicks.click_text(data_dock, "Browse…")
    assert [data_dock.case_table.item(r, 1).text() for r in range(4)] == ["labeled", "unlabeled", "labeled", "labeled"]
    assert data_dock.labeled_set_edit.text() == str(dataset)
    clicks.click(data_dock.open_button)
    assert data_dock.case_table.rowCount() == 4

    data_dock.image_combo.select_layer(image)
    clicks.click(data_dock.new_labels_button)
    painted = viewer.layers["synthetic spine labels"]
    _, truth, _ = sample_volume(seed=0)
    for class_id in (3, 4, 12):
        data_dock.class_combo.setCurrentIndex(data_dock.class_combo.findData(class_id))
        assert painted.selected_label == class_id
        painted.data[truth == class_id] = painted.selected_label  # as the brush would
    clicks.click(data_dock.add_button)
    assert not notes.take_errors()
    new_case = dataset / "Mask" / "mask_case5.nii.gz"
    assert new_case.is_file()
    assert [data_dock.case_table.item(4, c).text() for c in (0, 1)] == ["Case5", "partial"]
    assert open_dataset(dataset).case("Case5").painted == (3, 4, 12)

    click_cell(qtbot, data_dock.case_table, 0)
    clicks.click(data_dock.load_button)
    assert "Case1" in viewer.layers and "Case1 labels" in viewer.layers
    case_image = viewer.layers["Case1"]
    assert viewer.dims.not_displayed == (sagittal_layout(case_image.metadata[AFFINE_KEY]).axes[0],)
    viewer.dims.order = (2, 0, 1)
    data_dock.image_combo.select_layer(case_image)
    clicks.click(data_dock.sagittal_button)
    assert viewer.dims.not_displayed == (sagittal_layout(case_image.metadata[AFFINE_KEY]).axes[0],)

    # -- Training: stage 1, then stage 2 (Stop, Resume), all tiny ------------------------------
    training.data_edit.setText(str(dataset))
    training.labeled_edit.setText("2")
    training.preset_combo.setCurrentText("tiny")
    training.device_combo.setCurrentText("cpu")
    training.stage_combo.setCurrentText(STAGE1)
    training.text_encoder_edit.setText("tiny")
    training.steps_spin.setValue(3)
    training.out_edit.setText(str(tmp_path / "stage1"))
    clicks.click(training.start_button)
    wait_idle(qtbot, training)
    assert training.result.last_event.kind == "end" and not notes.take_errors()
    assert training.vlm_edit.text() == str(tmp_path / "stage1")

    training.stage_combo.setCurrentText(STAGE2)
    training.method_combo.setCurrentText("cps4")
    training.preview_combo.select_layer(image)
    training.steps_spin.setValue(20)
    training.out_edit.setText(str(tmp_path / "stage2"))
    clicks.click(training.start_button)
    assert "caching the stage-1 maps" in training.status_label.text()
    qtbot.waitUntil(lambda: training.status_label.text().startswith("step"), timeout=RUN_TIMEOUT_MS)
    clicks.click(training.stop_button)
    wait_idle(qtbot, training)
    assert training.result.last_event.kind == "cancelled"
    stopped_at = training.result.last_event.step
    assert stopped_at < 20

    clicks.click(training.start_button)  # the run folder holds the stopped run: refused, in the dock's words
    wait_idle(qtbot, training)
    [refusal] = notes.take_errors()
    assert "press Resume" in refusal and "--" not in refusal
    clicks.click(training.resume_button)
    wait_idle(qtbot, training)
    assert training.result.last_event.kind == "end" and training.result.last_event.step == 20
    assert not notes.take_errors()
    assert training.prediction_layer is not None and training.prediction_layer in viewer.layers

    # -- Per-class review: guarded buttons, inference, statuses, class layers, save ------------
    review.tabs.setCurrentIndex(0)
    for text in ("Accept", "Needs edit", "Reject", "Jump to", "Solo"):
        clicks.click_text(review, text)
    assert len(notes.take_errors()) == 5, "each button with nothing to review says so"

    review.image_combo.select_layer(image)
    review.run_edit.setText(str(tmp_path / "stage2"))
    clicks.click(review.infer_button)
    assert review.status_label.text() == "running inference…"
    wait_idle(qtbot, review)
    assert review.labels_layer is not None and review.labels_layer.name == "synthetic spine pseudo-label"
    assert "running inference" not in review.status_label.text()
    assert len(review.class_ids) >= 3, "the tiny model predicts at least three classes"

    review.labels_combo.select_layer(viewer.layers["Case1 labels"])
    clicks.click(review.use_layer_button)
    assert review.save_edit.text() == str(dataset / "Mask" / "mask_case1.nii.gz"), "the layout's mask path"
    classes = sorted(int(v) for v in np.unique(viewer.layers["Case1 labels"].data) if v)
    assert review.class_ids == classes
    review.class_table.clearSelection()
    clicks.click(review.accept_button)
    assert notes.take_errors() == ["select a class in the table first"]
    for row, button, status in ((0, review.accept_button, "accepted"), (1, review.edit_button, "needs edit"),
                                (2, review.reject_button, "rejected")):
        click_cell(qtbot, review.class_table, row, 1)
        clicks.click(button)
        assert review.class_table.item(row, STATUS_COLUMN).text() == status
    click_cell(qtbot, review.class_table, 0, 1)
    clicks.click(review.jump_button)
    clicks.click(review.split_button)
    short = mrspineseg_scheme().short_names()
    assert [layer.name for layer in review.class_layers.values()] == [
        f"{short[class_id]} · Case1 labels" for class_id in classes
    ], "class first, so the layer list shows which class each layer is"
    click_cell(qtbot, review.class_table, 0, 1)
    clicks.click(review.solo_button)
    assert [layer.visible for layer in review.class_layers.values()] == [c == classes[0] for c in classes]
    clicks.click(review.solo_button)
    reviewed = tmp_path / "reviewed" / "mask_case1.nii.gz"
    review.save_edit.setText(str(reviewed))
    clicks.click(review.save_button)
    assert not notes.take_errors()
    assert set(np.unique(read_volume(reviewed, kind="label").array)) == {0, classes[0], classes[1]}

    # -- Refine: a workspace with a held-out case, one round, corrections on a queued case -----
    review.tabs.setCurrentIndex(1)
    panel = review.refinement_panel
    panel.workspace_edit.setText(str(tmp_path / "ws"))
    panel.data_edit.setText(str(dataset))
    panel.heldout_edit.setText("Case4")
    clicks.click_text(panel, "New from dataset")
    assert not notes.take_errors()
    assert panel.queue_table.rowCount() == 0 and "press Retrain" in panel.queue_label.text()
    clicks.click_text(panel, "Open")
    panel.method_combo.setCurrentText("supervised")
    panel.preset_combo.setCurrentText("tiny")
    panel.steps_spin.setValue(3)
    panel.device_combo.setCurrentText("cpu")
    clicks.click(panel.retrain_button)
    assert not panel.save_button.isEnabled(), "saving waits while a round writes the workspace"
    qtbot.waitUntil(lambda: panel.retrain_button.isEnabled(), timeout=RUN_TIMEOUT_MS)
    assert not notes.take_errors()
    assert panel.plot.points(ROUND_AXIS)[0] == [1] and 0.0 <= panel.plot.points(ROUND_AXIS)[1][0] <= 1.0
    queued = [panel.queue_table.item(r, 0).text() for r in range(panel.queue_table.rowCount())]
    assert sorted(queued) == ["Case2", "Case5"]
    panel.steps_spin.setValue(100_000)  # a round only Stop ends
    clicks.click(panel.retrain_button)
    clicks.click(panel.stop_button)
    qtbot.waitUntil(lambda: panel.retrain_button.isEnabled(), timeout=RUN_TIMEOUT_MS)
    assert not notes.take_errors()
    assert panel.plot.points(ROUND_AXIS)[0] == [1] and "cancelled" in panel.progress_label.text()

    click_cell(qtbot, panel.queue_table, queued.index("Case2"))
    assert panel.current_case == "Case2"
    assert review.labels_layer.name == "Case2 labels" and review.labels_layer in viewer.layers
    layer = review.labels_layer
    assert viewer.dims.not_displayed == (sagittal_layout(viewer.layers["Case2"].metadata[AFFINE_KEY]).axes[0],)
    layer.data = case2_truth  # a clean spine to correct
    clicks.click_text(panel, "Check order")
    assert panel.report_text.toPlainText() == "vertebra and disc order: no problem found"
    before = np.asarray(layer.data).copy()
    clicks.click_text(panel, "Shift levels up")
    assert not notes.take_errors()
    clicks.click_text(panel, "Shift levels down")
    np.testing.assert_array_equal(layer.data, before)
    clicks.click_text(panel, "Swap")
    assert notes.take_errors() == ["choose the two classes to swap (classes 1 and 2)"]
    panel.first_class.setCurrentIndex(panel.first_class.findData(3))
    panel.second_class.setCurrentIndex(panel.second_class.findData(4))
    clicks.click_text(panel, "Swap")
    np.testing.assert_array_equal(layer.data == 4, before == 3)
    voxel = tuple(int(v) for v in np.argwhere(np.asarray(layer.data) == 4)[0])
    panel.voxel_edit.setText(", ".join(map(str, voxel)))
    panel.first_class.setCurrentIndex(panel.first_class.findData(5))
    clicks.click_text(panel, "Relabel structure as class 1")
    assert layer.data[voxel] == 5 and not notes.take_errors()
    clicks.click(panel.save_button)
    assert not notes.take_errors()
    assert len(Workspace.open(tmp_path / "ws").versions("Case2")) >= 2

    # -- Prompt inspector -------------------------------------------------------------------
    inspector.image_combo.select_layer(image)
    inspector.run_edit.setText(str(tmp_path / "stage1"))
    inspector.device_combo.setCurrentText("cpu")
    inspector.choose_class(4)
    clicks.click(inspector.show_button)
    wait_idle(qtbot, inspector)
    assert inspector.heatmap_layer is not None and "binary map: L3" in viewer.layers
    assert not any(inspector.token_table.item(r, 0).text().startswith("##")
                   for r in range(inspector.token_table.rowCount()))
    assert not notes.take_errors()

    assert clicks.not_clicked() == []


def truth_of(dataset: Path, case_id: str) -> np.ndarray:
    return read_volume(dataset / "Mask" / f"mask_{case_id.lower()}.nii.gz", kind="label").array


def test_adding_a_painted_plain_folder_case_keeps_the_dataset_readable(docked, qtbot, tmp_path: Path) -> None:
    viewer, widgets, notes = docked
    data_dock = widgets["Data and labeling"]
    clicks = ButtonClicks(qtbot, [data_dock])
    image, label, affine = sample_volume(seed=4)
    folder = tmp_path / "plain"
    write_volume(folder / "case01_img.nii.gz", image, affine)
    write_volume(folder / "case02_img.nii.gz", image, affine)
    write_volume(folder / "case02_seg.nii.gz", label, affine)
    data_dock.dataset_edit.setText(str(folder))
    clicks.click(data_dock.open_button)
    assert [data_dock.case_table.item(r, 1).text() for r in range(2)] == ["unlabeled", "labeled"]

    click_cell(qtbot, data_dock.case_table, 0, double=True)
    clicks.click(data_dock.new_labels_button)
    painted = viewer.layers["case01_img labels"]
    painted.data[label == 4] = 4
    clicks.click(data_dock.add_button)
    assert not notes.take_errors()
    assert (folder / "case01_seg.nii.gz").is_file() and not (folder / "case01_img_seg.nii.gz").exists()
    assert [data_dock.case_table.item(r, 1).text() for r in range(2)] == ["partial", "labeled"]
    case = open_dataset(folder).case("case01")
    assert case.label_path == folder / "case01_seg.nii.gz" and case.painted == (4,)

    review = widgets["Per-class review"]
    review.review(painted)
    assert review.save_edit.text() == str(folder / "case01_seg.nii.gz")


def test_docks_fit_a_1366_by_768_screen(docked, qtbot) -> None:
    viewer, widgets, _notes = docked
    window = viewer.window._qt_window
    window.resize(1366, 768)
    qtbot.wait(50)
    assert window.height() <= 768 and window.width() <= 1366
    for name, widget in widgets.items():
        assert widget.minimumSizeHint().height() < 768 // 2, f"{name} would force the window taller"


def test_opening_a_nifti_uses_the_plugin_reader_and_the_sagittal_view(make_napari_viewer, tmp_path: Path) -> None:
    image, _label, affine = sample_volume(seed=1)
    path = write_volume(tmp_path / "Case1.nii.gz", image, affine)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-cps4")  # the first use of the plugin, as File > Open's dialog would
    viewer.layers.clear()
    viewer.dims.order = (0, 1, 2)
    # No reader named (as File > Open does; a bare viewer.open(path) asks napari's builtins).
    [layer] = viewer.open(str(path), plugin=None)
    assert AFFINE_KEY in layer.metadata
    assert viewer.dims.not_displayed == (sagittal_layout(affine).axes[0],)
    rows_up = viewer.camera.orientation2d[0]
    assert rows_up == ("up" if sagittal_layout(affine).flip_rows else "down")


def test_the_sample_opens_sagittal_with_no_dock_open(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cps4", "spine")
    image = viewer.layers["synthetic spine"]
    layout = sagittal_layout(image.metadata[AFFINE_KEY])
    assert viewer.dims.not_displayed == (layout.axes[0],)
    assert viewer.dims.point[layout.axes[0]] == pytest.approx(image.data.shape[layout.axes[0]] // 2 * image.scale[layout.axes[0]])


def test_a_users_own_reader_choice_is_kept(make_napari_viewer, tmp_path: Path) -> None:
    from napari.settings import get_settings

    from napari_cps4._view import prepare_viewer

    get_settings().plugins.extension2reader = {"*.nii.gz": "napari"}
    prepare_viewer(make_napari_viewer())
    preferences = get_settings().plugins.extension2reader
    assert preferences["*.nii.gz"] == "napari" and preferences["*.nii"] == "napari-cps4"


def test_training_errors_are_notifications_in_the_docks_words(docked, qtbot, tmp_path: Path) -> None:
    _viewer, widgets, notes = docked
    training = widgets["Training"]
    clicks = ButtonClicks(qtbot, [training])
    dataset = tmp_path / "data"
    write_synthetic_dataset(dataset, cases=3, seed=1)
    for number in (2, 3):
        (dataset / "Mask" / f"mask_case{number}.nii.gz").unlink()
    training.stage_combo.setCurrentText(STAGE2)
    training.method_combo.setCurrentText("supervised")
    training.data_edit.setText(str(dataset))
    training.out_edit.setText(str(tmp_path / "run"))
    training.labeled_edit.setText("2")
    clicks.click(training.start_button)
    [error] = notes.take_errors()
    assert error == "'Labeled volumes' 2 asks for 2 volumes but only 1 training volumes have masks"
    assert training.worker is None and "not started" in training.status_label.text()

    training.labeled_edit.setText("1")
    training.preset_combo.setCurrentText("tiny")
    training.steps_spin.setValue(2)
    training.device_combo.setCurrentText("cpu")
    clicks.click(training.start_button)
    assert any("no validation volumes" in warning for warning in notes.warnings())
    wait_idle(qtbot, training)
    assert not notes.take_errors(), training.status_label.text()
    assert training.result.last_event.kind == "end"


def test_devices_offered_are_those_this_machine_has(docked) -> None:
    import torch

    _viewer, widgets, _notes = docked
    panel = widgets["Per-class review"].refinement_panel
    offered = [panel.device_combo.itemText(i) for i in range(panel.device_combo.count())]
    assert offered[0] == "auto" and "cpu" in offered
    assert ("cuda" in offered) == torch.cuda.is_available()
    assert panel.first_class.currentIndex() == -1 and panel.second_class.currentIndex() == -1
    assert panel.first_class.findData(0) == -1, "background is no class to swap"


def test_slots_get_only_the_arguments_they_take(monkeypatch) -> None:
    from cps4_engine.errors import CPS4Error
    from napari_cps4._common import reports_errors

    shown: list[str] = []
    monkeypatch.setattr(napari_cps4._common, "show_error", shown.append)
    calls: list[tuple] = []

    class Panel:
        def retrain(self) -> None:
            calls.append(("retrain",))

        def start(self, resume: bool = False) -> None:
            calls.append(("start", resume))

        def refuse(self) -> None:
            raise CPS4Error("choose a workspace first")

    panel = Panel()
    reports_errors(panel.retrain)(False)  # clicked(checked)
    reports_errors(panel.start)(True)  # a default is kept, not filled by the signal
    reports_errors(lambda row, column: calls.append(("cell", row, column)))(2, 3)
    assert calls == [("retrain",), ("start", False), ("cell", 2, 3)]
    assert reports_errors(panel.refuse)(False) is None and shown == ["choose a workspace first"]
    with pytest.raises(ZeroDivisionError):
        reports_errors(lambda: 1 / 0)(False)  # bugs are not dressed up as user errors

    def read_only() -> None:
        raise PermissionError(13, "Permission denied", "/data/case01_seg.nii.gz")

    assert reports_errors(read_only)(False) is None
    assert shown[-1] == "/data/case01_seg.nii.gz: Permission denied"
