"""``cps4 pretrain`` and ``cps4 inspect-prompt`` end to end on a tiny synthetic dataset."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from cps4_engine.cli import main
from cps4_engine.synthetic import write_synthetic_dataset


def test_pretrain_then_inspect_prompt_writes_a_heatmap_in_the_image_geometry(tmp_path, capsys) -> None:
    write_synthetic_dataset(tmp_path / "data", cases=2, seed=3)
    run = tmp_path / "run"
    status = main(["pretrain", str(tmp_path / "data"), "--labeled", "1", "--out", str(run), "--preset", "tiny",
                   "--max-steps", "3", "--device", "cpu", "--text-encoder", "tiny", "--validation", "0",
                   "--no-token-loss", "--prompt-template", "an MR slice showing the {name}",
                   "--pixel-weight", "0.5", "--train-text-encoder", "--no-prompt-centring"])
    assert status == 0 and (run / "model.safetensors").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["losses"]["pixel"] == 0.5 and config["losses"]["token"] == 0.0
    assert config["text_encoder"]["frozen"] is False and config["centre_prompts"] is False
    assert "stage 1 done" in capsys.readouterr().out
    image = sorted((tmp_path / "data" / "MR").iterdir())[1]
    heat_path = tmp_path / "heat.nii.gz"
    assert main(["inspect-prompt", str(run), str(image), "L4/L5 disc", "--out", str(heat_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "attention shares by word" in printed and "l4" in printed
    source, heat = nib.load(image), nib.load(heat_path)
    assert heat.shape == source.shape and np.array_equal(heat.affine, source.affine)
    values = np.asarray(heat.dataobj)
    assert values.min() >= 0.0 and values.max() <= 1.0


def test_bad_input_exits_2_with_one_line(tmp_path, capsys) -> None:
    (tmp_path / "run").mkdir()
    status = main(["inspect-prompt", str(tmp_path / "run"), str(tmp_path / "x.nii.gz"), "L3", "--out", str(tmp_path / "h.nii.gz")])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "not a stage-1 run folder" in error and len(error.splitlines()) == 1
    status = main(["pretrain", str(tmp_path / "run"), "--labeled", "2", "--out", str(tmp_path / "r"), "--preset", "huge"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "unknown preset 'huge'" in error and len(error.splitlines()) == 1
