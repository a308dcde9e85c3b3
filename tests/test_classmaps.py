"""Class maps and prompt heat maps from a stage-1 run, in the volume's own geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cps4_engine.checkpoint import write_run_config
from cps4_engine.classmaps import load_vlm, prompt_heatmap, volume_class_maps
from cps4_engine.errors import CPS4Error
from cps4_engine.io import read_volume
from cps4_engine.stage1 import Stage1Config, pretrain
from cps4_engine.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("classmaps")
    write_synthetic_dataset(root / "data", cases=2, seed=5)
    run = pretrain(Stage1Config(data=root / "data", out=root / "run", labeled=1, preset="tiny", max_steps=3,
                                device="cpu", text_encoder="tiny", validation=0))
    return run, read_volume(sorted((root / "data" / "MR").iterdir())[0])


def test_loaded_model_reproduces_the_saved_weights(trained) -> None:
    run, _ = trained
    vlm = load_vlm(run, "cpu")
    assert not vlm.training and vlm.slice_size == (64, 32) and len(vlm.prompts) == 20
    images = torch.rand(3, 1, 64, 32)
    probabilities = vlm.class_probabilities(images)
    assert probabilities.shape == (3, 19, 64, 32) and float(probabilities.min()) >= 0 and float(probabilities.max()) <= 1
    assert torch.equal(load_vlm(run, "cpu").class_probabilities(images), probabilities)


def test_volume_class_maps_and_heatmap_live_in_the_volume_grid(trained) -> None:
    run, volume = trained
    vlm = load_vlm(run, "cpu")
    maps = volume_class_maps(vlm, volume, threshold=0.3)
    assert maps.probabilities.shape == (19, *volume.shape) and maps.binary.dtype == bool
    assert np.array_equal(maps.binary, maps.probabilities > 0.3)
    heat = prompt_heatmap(vlm, volume, "L3 vertebra")
    assert heat.heatmap.shape == volume.shape and len(heat.tokens) == len(heat.token_attention)
    assert heat.tokens[1:3] == ["l3", "vertebra"] and abs(sum(heat.token_attention) - 1.0) < 1e-5
    with pytest.raises(CPS4Error, match="the prompt is empty"):
        prompt_heatmap(vlm, volume, "  ")


def test_wrong_run_folders_are_refused(trained, tmp_path) -> None:
    run, _ = trained
    write_run_config(tmp_path / "stage2", {"stage": 2, "scheme": {"name": "mrspineseg"}})
    with pytest.raises(CPS4Error, match="not a stage-1 run folder"):
        load_vlm(tmp_path / "stage2")
    config = json.loads((run / "config.json").read_text())
    config["scheme"]["name"] = "verse"
    (tmp_path / "verse").mkdir()
    (tmp_path / "verse" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CPS4Error, match="trained for scheme verse, not mrspineseg"):
        load_vlm(tmp_path / "verse")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "text_encoder"):
        target = broken / name
        (target.symlink_to(run / name))
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CPS4Error, match="model.safetensors: not a readable safetensors file"):
        load_vlm(broken)


def test_word_pieces_are_joined_into_words_with_their_shares_summed() -> None:
    from cps4_engine.classmaps import word_attention

    words = word_attention(["[CLS]", "verteb", "##ra", "l", "##3", "[SEP]"], [0.1, 0.2, 0.3, 0.1, 0.2, 0.1])
    assert [word for word, _ in words] == ["[CLS]", "vertebra", "l3", "[SEP]"]
    assert [round(share, 6) for _, share in words] == [0.1, 0.5, 0.3, 0.1]
