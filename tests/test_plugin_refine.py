"""The refinement panel in a real viewer: correction tools, order check, queue, loading a case."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cps4_engine.active.queue import case_uncertainty
from cps4_engine.active.workspace import Workspace
from cps4_engine.errors import CPS4Error
from cps4_engine.io import write_volume
from cps4_engine.labels import mrspineseg_scheme
from napari_cps4._layers import labels_layer_data
from napari_cps4._refine import ROUND_AXIS, RefinementPanel

pytestmark = pytest.mark.viewer

SCHEME = mrspineseg_scheme()
L5, L4, L3, D_L4L5 = 2, 3, 4, 12
AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])


def spine_labels() -> np.ndarray:
    """(4, 8, 24): L5, the L4/L5 disc, L4 and L3 stacked up voxel axis 2 (world z = superior)."""
    labels = np.zeros((4, 8, 24), dtype=np.int32)
    for index, class_id in enumerate((L5, D_L4L5, L4, L3)):
        labels[1:3, 2:6, 1 + 6 * index : 5 + 6 * index] = class_id
    return labels


class ReviewStub:
    """What the panel needs of the review widget: the layer, statuses and a table refresh."""

    def __init__(self) -> None:
        self.labels_layer = None
        self.image_layer = None
        self.statuses: dict[int, str] = {}
        self.refreshes = 0

    def review(self, labels_layer, image_layer=None) -> None:
        self.labels_layer, self.image_layer = labels_layer, image_layer

    def refresh_class_table(self) -> None:
        self.refreshes += 1


def test_corrections_and_order_check_on_a_labels_layer(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    data, attributes, _ = labels_layer_data(spine_labels(), AFFINE, None, "pseudo-label", SCHEME)
    layer = viewer.add_labels(data, **attributes)
    panel = RefinementPanel(viewer)
    assert panel.check_order().ok

    panel.shift(+1)
    np.testing.assert_array_equal(layer.data == L4, spine_labels() == L5)
    np.testing.assert_array_equal(layer.data == 13, spine_labels() == D_L4L5)
    panel.shift(-1)
    np.testing.assert_array_equal(layer.data, spine_labels())

    panel.swap(L5, L3)
    report = panel.check_order()
    assert not report.ok and report.of_kind("misordered")
    assert "lies below" in panel.report_text.toPlainText()
    panel.swap(L5, L3)

    panel.relabel_at((1, 2, 20), L4)
    assert (layer.data == L3).sum() == 0 and (layer.data == L4).sum() == 2 * (spine_labels() == L4).sum()
    duplicates = panel.check_order().of_kind("duplicate")
    assert [issue.classes for issue in duplicates] == [(L4,)]

    with pytest.raises(CPS4Error, match="no level above"):
        panel.shift(+10)
    assert (layer.data == L4).sum() == 2 * (spine_labels() == L4).sum()


def test_tools_act_on_the_review_widgets_layer_and_refresh_its_table(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    data, attributes, _ = labels_layer_data(spine_labels(), AFFINE, None, "reviewed", SCHEME)
    reviewed = viewer.add_labels(data, **attributes)
    other = viewer.add_labels(np.zeros_like(data), name="other")
    viewer.layers.selection.active = other
    stub = ReviewStub()
    stub.labels_layer = reviewed
    panel = RefinementPanel(viewer, review_widget=stub)
    panel.swap(L4, L3)
    assert (reviewed.data == L3).sum() == (spine_labels() == L4).sum()
    assert not other.data.any() and stub.refreshes == 1


def test_queue_table_from_a_workspace_and_loading_a_case(make_napari_viewer, tmp_path: Path) -> None:
    shape = spine_labels().shape
    cases = []
    for name in ("calm", "doubtful"):
        image = write_volume(tmp_path / f"{name}.nii.gz", np.random.default_rng(0).random(shape, dtype=np.float32), AFFINE)
        cases.append(SimpleNamespace(case_id=name, image_path=image, label_path=None, painted=None))
    workspace = Workspace.create(tmp_path / "ws", cases, SCHEME)
    for name, p in (("calm", 0.95), ("doubtful", 0.5)):
        probs = np.full((20, *shape), (1 - p) / 19, dtype=np.float32)
        probs[0] = np.where(spine_labels() == 0, p, (1 - p) / 19)
        for class_id in (L5, D_L4L5, L4, L3):
            probs[class_id] = np.where(spine_labels() == class_id, p, (1 - p) / 19)
        workspace.add_prediction(name, spine_labels().astype(np.uint8), 1, case_uncertainty(probs))

    viewer = make_napari_viewer()
    stub = ReviewStub()
    panel = RefinementPanel(viewer, review_widget=stub)
    panel.open_workspace(tmp_path / "ws")
    assert panel.queue_table.rowCount() == 2
    assert [panel.queue_table.item(row, 0).text() for row in range(2)] == ["doubtful", "calm"]

    panel.queue_table.cellClicked.emit(0, 0)
    assert panel.current_case == "doubtful"
    assert stub.labels_layer is viewer.layers["doubtful labels"]
    np.testing.assert_array_equal(stub.labels_layer.data, spine_labels())
    assert "doubtful" in viewer.layers

    stub.statuses = {L4: "accepted", L3: "needs edit"}
    panel.shift(+1)
    version = panel.save_to_workspace()
    reopened = Workspace.open(tmp_path / "ws")
    assert version == 2
    statuses = reopened.class_statuses("doubtful")
    assert statuses[L4].status == "accepted" and statuses[L3].status == "corrected"
    assert statuses[5].status == "corrected", "L3 became L2 by the shift: a human change"


def test_embedded_in_the_review_widget_and_retraining_off_the_gui_thread(
    make_napari_viewer, qtbot, tmp_path: Path
) -> None:
    from napari_cps4._review_widget import ReviewWidget

    rng = np.random.default_rng(1)
    cases = []
    for index in range(3):
        labels = np.roll(spine_labels(), index, axis=2)
        image = np.where(labels == 0, 0.1, 0.9).astype(np.float32) + rng.normal(0, 0.02, labels.shape).astype(np.float32)
        image_path = write_volume(tmp_path / f"case{index}.nii.gz", image, AFFINE)
        label_path = write_volume(tmp_path / f"case{index}_seg.nii.gz", labels.astype(np.uint8), AFFINE)
        cases.append(SimpleNamespace(case_id=f"case{index}", image_path=image_path, label_path=label_path, painted=None))
    Workspace.create(tmp_path / "ws", cases, SCHEME, heldout=["case2"], import_labels=["case0"])

    viewer = make_napari_viewer()
    review = ReviewWidget(viewer)
    panel = review.refinement_panel
    assert isinstance(panel, RefinementPanel) and panel.review_widget is review
    panel.open_workspace(tmp_path / "ws")
    panel.preset_combo.setCurrentText("tiny")
    panel.steps_spin.setValue(2)
    panel.method_combo.setCurrentText("supervised")
    panel.device_combo.setCurrentText("cpu")
    worker = panel.retrain()
    assert not panel.retrain_button.isEnabled()
    qtbot.waitUntil(lambda: panel.retrain_button.isEnabled(), timeout=120_000)
    assert panel.workspace.current_round == 1
    assert panel.plot.points(ROUND_AXIS)[0] == [1] and 0.0 <= panel.plot.points(ROUND_AXIS)[1][0] <= 1.0
    assert [entry.case_id for entry in panel.queue] == ["case1"]
    assert worker.is_running is False

    panel.load_case("case1")
    assert review.labels_layer is viewer.layers["case1 labels"]
    np.testing.assert_array_equal(review.labels_layer.data, panel.workspace.current_labels("case1"))
