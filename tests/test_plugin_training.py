"""Viewer tests that train: stage 1 and stage 2 from the widget, Stop, inspector, responsiveness."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage

from cps4_engine.errors import CPS4Error
from cps4_engine.synthetic import write_synthetic_dataset
from napari_cps4._inspector_widget import InspectorWidget
from napari_cps4._review_widget import CONFIDENCE_COLUMN, ReviewWidget
from napari_cps4._plot import LOSS_COLOUR
from napari_cps4._training_widget import AUTO_WEIGHTING, LOSS_AXIS, STAGES, TrainingWidget, parse_labeled

from event_loop_gaps import GapRecorder

pytestmark = pytest.mark.viewer

STAGE1, STAGE2 = list(STAGES)
RUN_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, cases=4, seed=3)
    return root


def _configure(widget: TrainingWidget, data: Path, out: Path, stage: str, steps: int) -> None:
    widget.stage_combo.setCurrentText(stage)
    widget.data_edit.setText(str(data))
    widget.out_edit.setText(str(out))
    widget.labeled_edit.setText("1")
    widget.steps_spin.setValue(steps)
    widget.preset_combo.setCurrentText("tiny")
    widget.device_combo.setCurrentText("cpu")
    widget.text_encoder_edit.setText("tiny")


def _pixels_of(widget, colour: str) -> int:
    """How many pixels of ``widget``'s rendering are within 40 RGB levels of ``colour``."""
    image = widget.grab().toImage().convertToFormat(QImage.Format.Format_RGB888)
    rows = np.frombuffer(image.constBits().asstring(image.sizeInBytes()), np.uint8)
    pixels = rows.reshape(image.height(), image.bytesPerLine())[:, : 3 * image.width()].reshape(-1, 3)
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels.astype(int) - target).max(axis=1) <= 40).sum())


def test_labeled_count_or_fraction() -> None:
    assert parse_labeled("2") == 2
    assert parse_labeled("0.05") == pytest.approx(0.05)
    for bad in ("", "abc", "0", "-1", "1.5"):
        with pytest.raises(CPS4Error):
            parse_labeled(bad)


def test_stage1_then_stage2_from_the_widget_and_inspector(make_napari_viewer, qtbot, tiny_dataset, tmp_path) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cps4", "spine")
    image = viewer.layers[0]
    widget = TrainingWidget(viewer)

    _configure(widget, tiny_dataset, tmp_path / "stage1", STAGE1, steps=3)
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    assert widget.result is not None and widget.result.last_event.kind == "end"
    assert (tmp_path / "stage1" / "model.safetensors").is_file()
    assert widget.vlm_edit.text() == str(widget.result.run_dir)
    steps, losses = widget.plot.points(LOSS_AXIS)
    assert steps == [1.0, 2.0, 3.0] and all(loss > 0 for loss in losses)
    assert _pixels_of(widget.plot, LOSS_COLOUR) > 20, "the loss curve is painted"

    _configure(widget, tiny_dataset, tmp_path / "stage2", STAGE2, steps=6)
    widget.method_combo.setCurrentText("cps4")
    widget.preview_combo.select_layer(image)
    gaps = GapRecorder()
    gaps.start()
    widget.start().yielded.connect(gaps.stop_at_end)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    gaps.stop()
    print(f"\nlongest event-loop gap while stage 2 trained: {gaps.longest_s * 1000:.1f} ms "
          f"over {gaps.ticks} ticks of a 10 ms timer")
    assert gaps.ticks > 10
    assert gaps.longest_s < 0.100

    assert widget.result.last_event.kind == "end"
    prediction = widget.prediction_layer
    assert prediction is not None and prediction in viewer.layers
    assert prediction.data.shape == image.data.shape
    np.testing.assert_allclose(prediction.scale, image.scale)
    assert prediction.data.max() <= 19

    review = ReviewWidget(viewer)
    review.image_combo.select_layer(image)
    review.run_edit.setText(str(tmp_path / "stage2"))
    review.run_inference()
    qtbot.waitUntil(lambda: review.worker is None, timeout=RUN_TIMEOUT_MS)
    assert review.labels_layer is not None and review.labels_layer.name == "synthetic spine pseudo-label"
    np.testing.assert_array_equal(review.labels_layer.data, prediction.data)
    confidences = [review.class_table.item(r, CONFIDENCE_COLUMN).text() for r in range(review.class_table.rowCount())]
    assert all(0.0 <= float(c) <= 1.0 for c in confidences)

    inspector = InspectorWidget(viewer)
    inspector.image_combo.select_layer(image)
    inspector.run_edit.setText(str(tmp_path / "stage1"))
    inspector.device_combo.setCurrentText("cpu")
    inspector.choose_class(4)
    assert "L3" in inspector.prompt_edit.text()
    inspector.inspect()
    qtbot.waitUntil(lambda: inspector.worker is None, timeout=RUN_TIMEOUT_MS)
    heat = inspector.heatmap_layer
    assert heat is not None and heat in viewer.layers
    assert heat.data.shape == image.data.shape
    assert 0.0 <= float(heat.data.min()) and float(heat.data.max()) <= 1.0
    assert "binary map: L3" in viewer.layers
    shares = [float(inspector.token_table.item(r, 1).text()) for r in range(inspector.token_table.rowCount())]
    assert shares and sum(shares) == pytest.approx(1.0, abs=0.01)


def test_stop_saves_a_checkpoint_and_frees_the_widget(make_napari_viewer, qtbot, tiny_dataset, tmp_path) -> None:
    viewer = make_napari_viewer()
    widget = TrainingWidget(viewer)
    _configure(widget, tiny_dataset, tmp_path / "stopped", STAGE2, steps=100_000)
    widget.method_combo.setCurrentText("supervised")
    worker = widget.start()
    worker.yielded.connect(lambda event: widget.stop() if event.kind == "step" else None)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    assert widget.result.last_event.kind == "cancelled"
    assert widget.result.last_event.step < 100_000
    assert (tmp_path / "stopped" / "last.safetensors").is_file()
    assert widget.start_button.isEnabled() and not widget.stop_button.isEnabled()


def test_training_errors_become_a_status_not_a_crash(make_napari_viewer, qtbot, tmp_path) -> None:
    viewer = make_napari_viewer()
    widget = TrainingWidget(viewer)
    _configure(widget, tmp_path / "missing", tmp_path / "run", STAGE2, steps=2)
    widget.method_combo.setCurrentText("supervised")
    with pytest.raises(CPS4Error, match="missing"):
        widget.start()  # the split is checked before a worker starts
    assert widget.worker is None
    assert widget.status_label.text().startswith("not started:")
    assert "missing" in widget.status_label.text()
    assert widget.start_button.isEnabled()


def test_cps4_without_stage1_run_is_refused_before_starting(make_napari_viewer, tiny_dataset, tmp_path) -> None:
    widget = TrainingWidget(make_napari_viewer())
    _configure(widget, tiny_dataset, tmp_path / "run", STAGE2, steps=2)
    widget.method_combo.setCurrentText("cps4")
    widget.vlm_edit.setText("")
    with pytest.raises(CPS4Error, match="stage-1 run"):
        widget.start()
    assert widget.worker is None


def test_the_text_encoder_is_fixed_unless_fine_tuning_is_ticked(make_napari_viewer, tiny_dataset, tmp_path) -> None:
    widget = TrainingWidget(make_napari_viewer())
    _configure(widget, tiny_dataset, tmp_path / "run", STAGE1, steps=2)
    assert widget.build_config().freeze_text_encoder is True
    widget.fine_tune_text_check.setChecked(True)
    assert widget.build_config().freeze_text_encoder is False
    widget.stage_combo.setCurrentText(STAGE2)
    assert widget.fine_tune_text_check.isHidden()


def _cps4_option_widgets(widget: TrainingWidget) -> list:
    return [widget.vlm_edit, widget.base_combo, widget.pseudo_label_combo, widget.prompt_weighting_combo]


def _click_start_and_wait(widget: TrainingWidget, qtbot) -> None:
    qtbot.mouseClick(widget.start_button, Qt.MouseButton.LeftButton)
    assert widget.worker is not None, widget.status_label.text()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)


def test_cps4_on_unimatch_with_reliability_weighting_from_the_combos(
    make_napari_viewer, qtbot, tiny_dataset, tmp_path
) -> None:
    widget = TrainingWidget(make_napari_viewer())
    stage1 = tmp_path / "stage1"
    _configure(widget, tiny_dataset, stage1, STAGE1, steps=3)
    _click_start_and_wait(widget, qtbot)
    assert widget.result.last_event.kind == "end"
    assert (stage1 / "class_reliability.json").is_file()

    _configure(widget, tiny_dataset, tmp_path / "stage2", STAGE2, steps=2)
    widget.method_combo.setCurrentText("cps4")
    widget.base_combo.setCurrentText("unimatch")
    widget.pseudo_label_combo.setCurrentText("fused")
    widget.prompt_weighting_combo.setCurrentText("reliability")
    assert not any(option.isHidden() for option in _cps4_option_widgets(widget))
    _click_start_and_wait(widget, qtbot)
    assert widget.result.last_event.kind == "end", widget.status_label.text()
    config = json.loads((tmp_path / "stage2" / "config.json").read_text())
    assert (config["method"], config["base"], config["pseudo_label"]) == ("cps4", "unimatch", "fused")
    assert config["prompt_weighting"] == "reliability"
    assert config["vlm"] == str(stage1.resolve())

    # An engine error about a dock option names the dock's field, not the command-line flag.
    without_reliability = tmp_path / "stage1_without_reliability"
    shutil.copytree(stage1, without_reliability)
    (without_reliability / "class_reliability.json").unlink()
    widget.vlm_edit.setText(str(without_reliability))
    widget.out_edit.setText(str(tmp_path / "refused"))
    _click_start_and_wait(widget, qtbot)
    status = widget.status_label.text()
    assert status.startswith("failed:") and "'Prompt weights' reliability needs" in status, status
    assert "--prompt-weighting" not in status


def test_cps4_options_apply_to_stage2_cps4_only(make_napari_viewer, tiny_dataset, tmp_path) -> None:
    widget = TrainingWidget(make_napari_viewer())
    _configure(widget, tiny_dataset, tmp_path / "run", STAGE2, steps=2)
    for method in ("supervised", "mean-teacher", "unimatch"):
        widget.method_combo.setCurrentText(method)
        assert all(option.isHidden() for option in _cps4_option_widgets(widget)), method
        config = widget.build_config()
        assert (config.method, config.base, config.vlm, config.pseudo_label, config.prompt_weighting) == (
            method, None, None, None, None)

    widget.method_combo.setCurrentText("cps4")
    widget.vlm_edit.setText(str(tmp_path / "stage1"))
    assert not any(option.isHidden() for option in _cps4_option_widgets(widget))
    assert widget.prompt_weighting_combo.currentText() == AUTO_WEIGHTING
    config = widget.build_config()
    assert (config.base, config.pseudo_label, config.prompt_weighting) == ("mean-teacher", "fused", None)
    widget.prompt_weighting_combo.setCurrentText("global")
    assert widget.build_config().prompt_weighting == "global"
    # Only fused pseudo-labels are weighted: the weighting is greyed out and not passed on.
    widget.pseudo_label_combo.setCurrentText("teacher")
    assert not widget.prompt_weighting_combo.isEnabled()
    assert widget.build_config().prompt_weighting is None
    widget.pseudo_label_combo.setCurrentText("fused")
    assert widget.prompt_weighting_combo.isEnabled()

    widget.stage_combo.setCurrentText(STAGE1)
    assert all(option.isHidden() for option in _cps4_option_widgets(widget))
