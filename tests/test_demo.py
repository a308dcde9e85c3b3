"""The demo pipeline end to end (tiny settings) and its report pieces."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from cps4_engine.demo import QUICK_SETTINGS, run_demo
from cps4_engine.errors import CPS4Error
from cps4_engine.events import TrainEvent
from cps4_engine.labels import mrspineseg_scheme
from cps4_engine.report import TrainingCurves, best_sagittal_slice, colour_labels, save_overlay, save_training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# voxel axis 0 superior-inferior, 1 anterior-posterior, 2 left-right (like the real cases)
IPL_AFFINE = np.array([[0, 0, -1.0, 0], [0, -1.0, 0, 0], [-2.0, 0, 0, 0], [0, 0, 0, 1]])


def test_curves_record_steps_and_validation(tmp_path) -> None:
    curves = TrainingCurves("stage 2")
    curves.record(TrainEvent("start", max_steps=3))
    curves.record(TrainEvent("step", step=1, max_steps=3, losses={"total": 2.0, "dice": 1.0}))
    curves.record(TrainEvent("step", step=2, max_steps=3, losses={"total": 1.5, "dice": 0.9, "unsupervised": 0.3}))
    curves.record(TrainEvent("validation", step=2, max_steps=3, metrics={"dice": 0.4}))
    assert curves.steps == [1, 2]
    assert curves.losses["total"] == [2.0, 1.5]
    assert np.isnan(curves.losses["unsupervised"][0]) and curves.losses["unsupervised"][1] == 0.3
    assert curves.validation_steps == [2] and curves.metrics == {"dice": [0.4]}
    path = save_training_curves(tmp_path / "curves.png", [TrainingCurves("stage 1"), curves])
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_overlay_uses_scheme_colours_on_the_fullest_slice(tmp_path) -> None:
    scheme = mrspineseg_scheme()
    labels = np.zeros((20, 10, 6), np.uint8)
    labels[2:8, 2:6, 3] = 4
    labels[10:12, 2:6, 3] = 13
    labels[3:5, 3:5, 1] = 4
    # voxel axis 2 is left-right; display slice s is voxel index s along it
    assert best_sagittal_slice(labels, IPL_AFFINE) == 3
    rgba = colour_labels(labels[:, :, 3], scheme)
    assert rgba.shape == (20, 10, 4)
    assert np.allclose(rgba[5, 3, :3], np.asarray(scheme.by_id(4).color) / 255.0)
    assert rgba[0, 0, 3] == 0.0 and rgba[5, 3, 3] > 0
    image = np.random.default_rng(0).random(labels.shape)
    path = save_overlay(tmp_path / "overlay.png", image, IPL_AFFINE, {"truth": labels, "prediction": labels}, scheme)
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_bad_settings_and_used_folders_are_refused(tmp_path) -> None:
    with pytest.raises(CPS4Error, match="test case"):
        run_demo(tmp_path / "a", dataclasses.replace(QUICK_SETTINGS, cases=6, train_cases=6))
    with pytest.raises(CPS4Error, match="labeled"):
        run_demo(tmp_path / "a", dataclasses.replace(QUICK_SETTINGS, labeled=6))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("keep me")
    with pytest.raises(CPS4Error, match="not empty"):
        run_demo(tmp_path / "used", QUICK_SETTINGS)
    assert (tmp_path / "used" / "mine.txt").read_text() == "keep me"


def _parse_dice_table(report: str) -> dict[str, tuple[float, float]]:
    """Rows of the per-class Markdown table: class -> (mean Dice %, sd)."""
    rows = {}
    for line in report.splitlines():
        match = re.match(r"^\| (\S+) \| (\d+) \| ([\d.]+) ± ([\d.]+) \| ", line)
        if match:
            rows[match.group(1)] = (float(match.group(3)), float(match.group(4)))
    return rows


@pytest.mark.slow
def test_demo_runs_end_to_end_with_tiny_settings(tmp_path) -> None:
    settings = dataclasses.replace(
        QUICK_SETTINGS, cases=4, train_cases=3, labeled=1, stage1_steps=3, stage2_steps=4, text_encoder="tiny"
    )
    lines: list[str] = []
    result = run_demo(tmp_path / "demo", settings, device="cpu", echo=lines.append)
    report_dir = tmp_path / "demo" / "report"
    for name in ("report.md", "metrics.json", "overlay.png", "curves.png"):
        assert (report_dir / name).is_file(), name
    assert (report_dir / "overlay.png").read_bytes().startswith(PNG_SIGNATURE)
    rows = _parse_dice_table(result.report.read_text())
    assert "mean" in rows and len(rows) >= 2
    assert rows["mean"][0] == pytest.approx(100 * result.mean_dice, abs=0.06)
    assert 0.0 <= result.mean_dice <= 1.0
    assert any(line.startswith("[5/5]") for line in lines)
    assert list((tmp_path / "demo" / "predictions").glob("*_labels.nii.gz"))
