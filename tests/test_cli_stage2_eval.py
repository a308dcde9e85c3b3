"""``cps4 evaluate`` and ``cps4 predict`` from the command line: output, JSON, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cps4_engine.cli import main
from cps4_engine.io import write_volume

AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])


@pytest.fixture()
def label_pair(tmp_path):
    """One case: class 4 GT 3×3×1 = 9 voxels, prediction 6 of them: Dice 12/15 = 0.8."""
    gt = np.zeros((6, 6, 2), np.uint8)
    gt[1:4, 1:4, 0] = 4
    pred = np.zeros_like(gt)
    pred[1:3, 1:4, 0] = 4
    write_volume(tmp_path / "gt.nii.gz", gt, AFFINE)
    write_volume(tmp_path / "pred.nii.gz", pred, AFFINE)
    return tmp_path / "pred.nii.gz", tmp_path / "gt.nii.gz"


def test_evaluate_prints_table_and_writes_json(label_pair, tmp_path, capsys) -> None:
    pred, gt = label_pair
    out = tmp_path / "out" / "metrics.json"
    assert main(["evaluate", str(pred), str(gt), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    mean_row = [line for line in printed.splitlines() if line.startswith("mean")][0]
    assert mean_row.split()[2] == "80.0"
    assert any(line.startswith("L3 ") for line in printed.splitlines())
    data = json.loads(out.read_text())
    assert data["summary"]["mean_dice"] == pytest.approx(0.8)
    assert data["cases"][0]["dice"] == {"4": pytest.approx(0.8)}
    assert data["cases"][0]["hd95"]["4"] == pytest.approx(1.0)


def test_evaluate_bad_input_exits_2_with_one_line(label_pair, tmp_path, capsys) -> None:
    pred, _ = label_pair
    assert main(["evaluate", str(pred), str(tmp_path / "missing.nii.gz")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "missing.nii.gz" in error and "not found" in error
    (tmp_path / "broken.nii.gz").write_bytes(b"not nifti at all")
    assert main(["evaluate", str(pred), str(tmp_path / "broken.nii.gz")]) == 2
    assert "broken.nii.gz" in capsys.readouterr().err
    assert main(["evaluate", str(pred), str(pred), "--classes", "x"]) == 2
    assert "--classes" in capsys.readouterr().err
