"""Presets and the checkpoint module: weights, run configs, resumable training state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from cps4_engine.checkpoint import (
    load_training_state,
    load_weights,
    random_states,
    read_run_config,
    save_training_state,
    save_weights,
    write_run_config,
)
from cps4_engine.errors import CPS4Error
from cps4_engine.presets import PRESET_NAMES, Preset, get_preset


def test_presets_have_the_promised_sizes() -> None:
    assert set(PRESET_NAMES) == {"tiny", "cpu", "paper"}
    assert get_preset("tiny").slice_size == (64, 32)
    paper = get_preset("paper")
    assert paper.slice_size == (512, 256)
    assert (paper.vit_hidden_size, paper.vit_layers, paper.patch_size) == (768, 12, 16)
    for name in PRESET_NAMES:
        preset = get_preset(name)
        assert Preset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset
        depth = 2 ** (len(preset.encoder_channels) - 1) if preset.image_encoder == "unet" else preset.patch_size
        assert preset.slice_size[0] % depth == 0 and preset.slice_size[1] % depth == 0


def test_unknown_preset_is_a_one_line_error() -> None:
    with pytest.raises(CPS4Error, match="unknown preset 'huge'"):
        get_preset("huge")


def test_weights_round_trip_including_shared_tensors(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    state = dict(model.state_dict())
    state["alias"] = state["weight"]
    path = save_weights(tmp_path / "w.safetensors", state)
    loaded = load_weights(path)
    assert torch.equal(loaded["weight"], model.weight.detach()) and torch.equal(loaded["alias"], loaded["weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_unreadable_weights_name_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 5)
    with pytest.raises(CPS4Error, match="bad.safetensors: not a readable safetensors file"):
        load_weights(bad)
    with pytest.raises(CPS4Error, match="weights file not found"):
        load_weights(tmp_path / "missing.safetensors")


def test_run_config_checks_stage_and_scheme(tmp_path) -> None:
    write_run_config(tmp_path, {"stage": 1, "scheme": {"name": "mrspineseg"}})
    config = read_run_config(tmp_path, stage=1, scheme="mrspineseg")
    assert config["versions"]["torch"] == torch.__version__ and "monai" in config["versions"]
    with pytest.raises(CPS4Error, match="not a stage-2 run folder \\(it is a stage-1 run\\)"):
        read_run_config(tmp_path, stage=2)
    with pytest.raises(CPS4Error, match="trained for scheme mrspineseg, not verse"):
        read_run_config(tmp_path, stage=1, scheme="verse")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CPS4Error, match="not a stage-1 run folder \\(no config.json\\)"):
        read_run_config(empty, stage=1)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(4, 3)).pow(2).sum().backward()
    optimizer.step()


def test_training_state_resumes_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    sampler = torch.Generator().manual_seed(5)
    for _ in range(3):
        _step(model, optimizer)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    save_training_state(tmp_path / "state.safetensors", 3, optimizer, generators={"sampler": sampler}, extra={"best": 0.5})
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(1).item(), torch.rand(1, generator=sampler).item())
    _step(model, optimizer)
    expected_weight = model.weight.detach().clone()

    resumed = torch.nn.Linear(3, 2)
    resumed.load_state_dict(weights)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.1)
    resumed_sampler = torch.Generator()
    step, extra = load_training_state(tmp_path / "state.safetensors", resumed_optimizer, generators={"sampler": resumed_sampler})
    assert (step, extra) == (3, {"best": 0.5})
    draws = (random.random(), float(np.random.rand()), torch.rand(1).item(), torch.rand(1, generator=resumed_sampler).item())
    assert draws == expected_draws
    _step(resumed, resumed_optimizer)
    assert torch.allclose(resumed.weight, expected_weight)


def test_each_rank_resumes_its_own_random_draws(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    rank0_sampler = torch.Generator().manual_seed(5)
    torch.manual_seed(100)
    rank1 = random_states({"sampler": torch.Generator().manual_seed(6)})
    torch.manual_seed(0)
    save_training_state(tmp_path / "state.safetensors", 3, optimizer, generators={"sampler": rank0_sampler},
                        other_ranks={1: rank1})
    expected = {0: (torch.rand(1).item(), torch.rand(1, generator=rank0_sampler).item())}
    torch.manual_seed(100)
    expected[1] = (torch.rand(1).item(), torch.rand(1, generator=torch.Generator().manual_seed(6)).item())
    # Rank 2 was not recorded (the run had two ranks): it falls back to rank 0's draws.
    expected[2] = expected[0]
    for rank in (0, 1, 2):
        sampler = torch.Generator()
        load_training_state(tmp_path / "state.safetensors", optimizer, generators={"sampler": sampler}, rank=rank)
        assert (torch.rand(1).item(), torch.rand(1, generator=sampler).item()) == expected[rank], rank


def test_weights_file_is_not_a_training_state(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    save_weights(tmp_path / "w.safetensors", model.state_dict())
    with pytest.raises(CPS4Error, match="not a cps4 training state file"):
        load_training_state(tmp_path / "w.safetensors", torch.optim.SGD(model.parameters(), lr=1.0))


def test_runs_saved_before_encoder_res_units_existed_still_load() -> None:
    saved = get_preset("cpu").to_dict()
    del saved["encoder_res_units"]
    assert Preset.from_dict(saved).encoder_res_units == 1
    assert get_preset("cpu").labeled_strong
    del saved["labeled_strong"]  # runs from before the strong labeled view trained without it
    assert Preset.from_dict(saved).labeled_strong is False
    del saved["embed_dim"]
    with pytest.raises(CPS4Error, match="preset settings lack embed_dim"):
        Preset.from_dict(saved)


def test_cpu_encoder_bottleneck_sees_most_of_the_slice() -> None:
    cpu = get_preset("cpu")
    levels = len(cpu.encoder_channels)
    assert cpu.slice_size[0] // 2 ** (levels - 1) <= 8 and cpu.encoder_res_units >= 2
