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


def test_predict_writes_labels_in_each_images_geometry(tmp_path, capsys) -> None:
    import torch

    from cps4_engine.checkpoint import save_weights, write_run_config
    from cps4_engine.io import read_volume
    from cps4_engine.models.segmenter import build_segmenter, segmenter_config
    from cps4_engine.presets import get_preset

    preset = get_preset("tiny")
    run = tmp_path / "run"
    torch.manual_seed(0)
    save_weights(run / "model.safetensors", build_segmenter(preset).state_dict())
    write_run_config(run, {"stage": 2, "scheme": {"name": "mrspineseg"}, "segmenter": segmenter_config(preset)})
    image = tmp_path / "Case1.nii.gz"
    affine = np.array([[0, 0, -2.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    write_volume(image, np.random.default_rng(0).random((20, 12, 7)).astype(np.float32), affine)
    out = tmp_path / "pred"
    args = ["predict", str(run), str(image), "--out", str(out), "--device", "cpu", "--batch-size", "2"]
    assert main(args) == 0
    assert "Case1_labels.nii.gz" in capsys.readouterr().out
    labels = read_volume(out / "Case1_labels.nii.gz", kind="label")
    assert labels.shape == (20, 12, 7) and np.allclose(labels.affine, affine)
    assert (out / "Case1_confidence.nii.gz").is_file() and not (out / "Case1_probs.nii.gz").exists()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(image), "--out", str(out)]) == 2
    assert "not a stage-2 run" in capsys.readouterr().err
    assert main(args[:-2] + ["--batch-size", "0"]) == 2


def test_demo_refuses_a_used_folder_and_bad_sizes(tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(tmp_path / "new"), "--cases", "3", "--train-cases", "3"]) == 2
    assert "test case" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "new"), "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
