"""One workspace object shared by the data dock and the refine panel, by clicks.

While a retraining round runs, saving is greyed out in both docks and refused by the
workspace; Stop cancels the round and records nothing.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QPushButton, QWidget

from cps4_engine.active.workspace import Workspace
from cps4_engine.errors import CPS4Error
from cps4_engine.io import write_volume
from cps4_engine.labels import mrspineseg_scheme
from napari_cps4._refine import ROUND_AXIS

pytestmark = pytest.mark.viewer

SCHEME = mrspineseg_scheme()
AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])
ROUND_TIMEOUT_MS = 180_000


def spine_labels(shift: int) -> np.ndarray:
    """(4, 8, 24): L5, the L4/L5 disc, L4 and L3 stacked up voxel axis 2, rolled by ``shift``."""
    labels = np.zeros((4, 8, 24), dtype=np.uint8)
    for index, class_id in enumerate((2, 12, 3, 4)):
        labels[1:3, 2:6, 1 + 6 * index : 5 + 6 * index] = class_id
    return np.roll(labels, shift, axis=2)


def make_workspace(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    cases = []
    for index in range(3):
        labels = spine_labels(index)
        image = np.where(labels == 0, 0.1, 0.9).astype(np.float32) + rng.normal(0, 0.02, labels.shape).astype(np.float32)
        image_path = write_volume(tmp_path / f"case{index}.nii.gz", image, AFFINE)
        label_path = write_volume(tmp_path / f"case{index}_seg.nii.gz", labels, AFFINE)
        cases.append(SimpleNamespace(case_id=f"case{index}", image_path=image_path, label_path=label_path, painted=None))
    return Workspace.create(tmp_path / "ws", cases, SCHEME, heldout=["case2"], import_labels=["case0"]).root


def button(widget: QWidget, text: str) -> QPushButton:
    [found] = [b for b in widget.findChildren(QPushButton) if b.text() == text]
    return found


@pytest.fixture()
def docks(make_napari_viewer, qtbot, tmp_path: Path):
    """A viewer with the data dock and the review dock (its Refine tab), one workspace open in both."""
    from napari_cps4._data_widget import DataWidget
    from napari_cps4._review_widget import ReviewWidget

    root = make_workspace(tmp_path)
    viewer = make_napari_viewer()
    data = DataWidget(viewer)
    review = ReviewWidget(viewer)
    panel = review.refinement_panel
    data.dataset_edit.setText(str(root))
    qtbot.mouseClick(data.open_button, Qt.MouseButton.LeftButton)
    panel.workspace_edit.setText(str(root))
    qtbot.mouseClick(button(panel, "Open"), Qt.MouseButton.LeftButton)
    panel.preset_combo.setCurrentText("tiny")
    panel.method_combo.setCurrentText("supervised")
    panel.device_combo.setCurrentText("cpu")
    return data, panel


def status_of(data, case_id: str) -> str:
    row = [data.case_table.item(r, 0).text() for r in range(data.case_table.rowCount())].index(case_id)
    return data.case_table.item(row, 1).text()


def test_both_docks_hold_one_workspace_object(docks, qtbot) -> None:
    data, panel = docks
    assert data.workspace is not None and data.workspace is panel.workspace
    panel.steps_spin.setValue(2)
    before = status_of(data, "case1")
    qtbot.mouseClick(panel.retrain_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: panel.retrain_button.isEnabled(), timeout=ROUND_TIMEOUT_MS)
    assert data.workspace is panel.workspace and panel.workspace.current_round == 1
    # The data dock's table follows the round without being reopened.
    after = status_of(data, "case1")
    assert after == panel.workspace.state("case1") and after != before
    assert panel.plot.points(ROUND_AXIS)[0] == [1]


def test_saving_is_off_while_a_round_runs_and_stop_cancels_it(docks, qtbot) -> None:
    data, panel = docks
    panel.steps_spin.setValue(100_000)  # far longer than the test: only Stop ends it
    assert not panel.stop_button.isEnabled()
    qtbot.mouseClick(panel.retrain_button, Qt.MouseButton.LeftButton)
    assert panel.stop_button.isEnabled()
    assert not panel.save_button.isEnabled() and not panel.retrain_button.isEnabled()
    assert not data.add_button.isEnabled(), "the data dock writes to the same workspace"
    with pytest.raises(CPS4Error, match="retraining round is running"):
        panel.workspace.save_human_labels("case1", spine_labels(1))
    qtbot.mouseClick(panel.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: panel.save_button.isEnabled(), timeout=ROUND_TIMEOUT_MS)
    assert data.add_button.isEnabled() and not panel.stop_button.isEnabled()
    assert panel.workspace.current_round == 0, "a cancelled round records nothing"
    assert "cancelled" in panel.progress_label.text()
    assert panel.workspace.save_human_labels("case1", spine_labels(1)) >= 1
