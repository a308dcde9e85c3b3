"""The shared training loop's pieces: schedule, sampling, run-folder guards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from cps4_engine.errors import CPS4Error
from cps4_engine.training import (
    LoopSettings,
    TrainingLoop,
    autocast,
    batches,
    check_run_folder,
    learning_rate_factor,
)


@pytest.mark.parametrize(
    ("step", "schedule", "floor", "expected"),
    [
        (0, "cosine", 0.0, 0.2),  # warm-up of 5 steps out of 100: (0 + 1) / 5
        (4, "cosine", 0.0, 1.0),  # last warm-up step
        (5, "cosine", 0.0, 1.0),  # cosine starts at the base rate
        (52, "cosine", 0.0, 0.5),  # half-way through the decay: (52 - 5) / 95 ~ 0.4947
        (99, "cosine", 0.0, 0.0),
        (99, "cosine", 0.1, 0.1),
        (40, "constant", 0.0, 1.0),
    ],
)
def test_learning_rate_factor_warms_up_then_decays(step: int, schedule: str, floor: float, expected: float) -> None:
    assert learning_rate_factor(step, 100, schedule, 0.05, floor) == pytest.approx(expected, abs=0.01)


def test_batches_are_reproducible_from_the_generator_state() -> None:
    dataset = TensorDataset(torch.arange(10))
    generator = torch.Generator().manual_seed(3)
    stream = batches(dataset, 4, generator, weights=torch.ones(10))
    next(stream)
    saved = generator.get_state()
    expected = [next(stream)[0].tolist() for _ in range(3)]
    resumed = torch.Generator()
    resumed.set_state(saved)
    again = batches(dataset, 4, resumed, weights=torch.ones(10))
    assert [next(again)[0].tolist() for _ in range(3)] == expected


def test_weighted_batches_never_draw_a_zero_weight_item() -> None:
    weights = torch.tensor([0.0, 1.0, 0.0, 1.0])
    stream = batches(TensorDataset(torch.arange(4)), 8, torch.Generator().manual_seed(0), weights=weights)
    drawn = torch.cat([next(stream)[0] for _ in range(5)])
    assert set(drawn.tolist()) == {1, 3}


def test_run_folder_guards(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    check_run_folder(tmp_path, resume=False)  # killed before its first checkpoint: start afresh
    with pytest.raises(CPS4Error, match="nothing to resume"):
        check_run_folder(tmp_path, resume=True)
    (tmp_path / "last.safetensors").write_bytes(b"")
    with pytest.raises(CPS4Error, match="already holds a run; pass --resume"):
        check_run_folder(tmp_path, resume=False)
    check_run_folder(tmp_path / "fresh", resume=False)


def test_an_unknown_schedule_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(CPS4Error, match="--schedule 'linear' is unknown"):
        TrainingLoop(None, LoopSettings(out=tmp_path, stage="stage 2", max_steps=1, validation_every=1,  # type: ignore[arg-type]
                                        schedule="linear"))


@pytest.mark.parametrize(
    ("amp", "cpu_bf16", "expected"),
    [
        (True, False, torch.float32),  # amp is for CUDA: on the CPU it changes nothing
        (False, True, torch.bfloat16),
        (True, True, torch.bfloat16),
    ],
)
def test_cpu_autocast_follows_cpu_bf16_only(amp: bool, cpu_bf16: bool, expected: torch.dtype) -> None:
    weight = torch.ones(3, 4)
    with autocast(torch.device("cpu"), amp, cpu_bf16=cpu_bf16):
        product = torch.ones(2, 4) @ weight.T
    assert product.dtype == expected
