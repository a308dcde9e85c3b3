"""Stage-2 trainer: each method trains, EMA, pseudo-labels, prompt cache, partial labels,
resume, cancel and bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from _stage2_data import CountingVLM, mark_partial, phantom, write_dataset, write_stage1_run
from cps4_engine.checkpoint import load_weights
from cps4_engine.errors import CPS4Error
from cps4_engine.events import CancelToken
from cps4_engine.io import Volume
from cps4_engine.preprocess import prepare_volume
from cps4_engine.stage2 import (
    Stage2Config,
    Stage2Trainer,
    iter_train,
    pseudo_labels,
    sigmoid_rampup,
    supervised_loss,
    update_ema,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("stage2") / "data", cases=6)


def _config(dataset: Path, out: Path, **overrides) -> Stage2Config:
    settings = dict(
        data=dataset, out=out, labeled=2, method="supervised", preset="tiny", max_steps=6,
        device="cpu", seed=0, validation=1, validation_every=3,
    )
    settings.update(overrides)
    return Stage2Config(**settings)


def _run(trainer: Stage2Trainer, cancel: CancelToken | None = None) -> list:
    return list(trainer.run(cancel))


def test_supervised_loss_falls_and_run_folder_is_complete(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = Stage2Trainer(_config(dataset, out, max_steps=30, validation_every=10))
    events = _run(trainer)
    totals = [e.losses["total"] for e in events if e.kind == "step"]
    assert len(totals) == 30
    assert sum(totals[-5:]) / 5 < 0.8 * sum(totals[:5]) / 5
    assert events[0].kind == "start" and events[-1].kind == "end"
    for name in ("config.json", "model.safetensors", "last.safetensors", "teacher.safetensors",
                 "history.json", "split.json", "train_state.safetensors"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == 2 and config["method"] == "supervised"
    assert config["segmenter"]["out_channels"] == 20
    history = json.loads((out / "history.json").read_text())
    assert [entry["step"] for entry in history["validation"]] == [10, 20, 30]
    assert 0.0 <= history["validation"][-1]["dice"] <= 1.0
    split = json.loads((out / "split.json").read_text())
    assert len(split["labeled"]) == 2 and len(split["validation"]) == 1


def test_mean_teacher_teacher_is_an_average_of_the_student(dataset: Path, tmp_path: Path) -> None:
    trainer = Stage2Trainer(_config(dataset, tmp_path / "mt", method="mean-teacher", ema_decay=0.9))
    events = _run(trainer)
    steps = [e for e in events if e.kind == "step"]
    assert all("unsupervised" in e.losses and 0.0 <= e.losses["confident"] <= 1.0 for e in steps)
    assert steps[0].losses["weight"] < steps[-1].losses["weight"]
    student = trainer.student.state_dict()
    teacher = trainer.teacher.state_dict()
    differences = [float((student[k] - teacher[k]).abs().max()) for k in student if student[k].is_floating_point()]
    assert max(differences) > 0.0
    saved_teacher = load_weights(tmp_path / "mt" / "teacher.safetensors")
    assert all(torch.equal(saved_teacher[k], teacher[k]) for k in teacher)


def test_update_ema_follows_the_formula() -> None:
    student, teacher = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
    update_ema(teacher, student, decay=0.9, step=100)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.1))
    update_ema(teacher, student, decay=0.9, step=1)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.55))


def test_sigmoid_rampup_rises_from_near_zero_to_one() -> None:
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(50, 10) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0


def test_cps4_computes_prompt_maps_once_per_unlabeled_slice(dataset: Path, tmp_path: Path) -> None:
    vlm_run = write_stage1_run(tmp_path / "vlm")
    vlm = CountingVLM()
    trainer = Stage2Trainer(
        _config(dataset, tmp_path / "cps4", method="cps4", vlm=vlm_run, max_steps=8),
        vlm_loader=lambda run, device: vlm,
    )
    events = _run(trainer)
    assert sum(e.kind == "step" for e in events) == 8
    unlabeled_slices = int(re.search(r"(\d+) unlabeled slices", events[0].message).group(1))
    assert unlabeled_slices == 3 * 4
    assert vlm.slices_seen == unlabeled_slices
    assert vlm.calls == 1
    config = json.loads((tmp_path / "cps4" / "config.json").read_text())
    assert config["pseudo_label"] == "fused" and config["vlm"] == str(vlm_run.resolve())


def test_teacher_pseudo_labels_skip_the_stage1_model(dataset: Path, tmp_path: Path) -> None:
    vlm_run = write_stage1_run(tmp_path / "vlm")
    vlm = CountingVLM()
    trainer = Stage2Trainer(
        _config(dataset, tmp_path / "cps4t", method="cps4", vlm=vlm_run, pseudo_label="teacher", max_steps=2),
        vlm_loader=lambda run, device: vlm,
    )
    _run(trainer)
    assert vlm.calls == 0


def test_pseudo_labels_keep_given_pixels_and_mask_unsure_ones() -> None:
    teacher = torch.zeros(1, 20, 1, 4)
    teacher[0, 0, 0, 0] = 1.0  # confident background
    teacher[0, 3, 0, 1] = 1.0  # confident L4, but L4 is painted and this pixel is unknown
    teacher[0, 5, 0, 2] = 0.6  # unsure L2
    teacher[0, 0, 0, 2] = 0.4
    teacher[0, 7, 0, 3] = 1.0  # confident T12, overruled by the painted L3 given here
    given = torch.tensor([[[0, 0, 0, 4]]])
    painted = torch.zeros(1, 20, dtype=torch.bool)
    painted[0, [3, 4]] = True
    labels, mask = pseudo_labels(teacher, None, given, painted, "teacher", confidence_threshold=0.8)
    assert labels.tolist() == [[[0, 3, 5, 4]]]
    assert mask.tolist() == [[[True, False, False, True]]]


def test_fused_pseudo_labels_let_a_confident_prompt_overrule_an_unsure_teacher() -> None:
    teacher = torch.full((1, 20, 1, 1), 0.02)
    teacher[0, 0] = 0.62
    prompt = torch.zeros(1, 19, 1, 1)
    prompt[0, 3] = 0.99  # class 4
    given = torch.zeros(1, 1, 1, dtype=torch.int64)
    painted = torch.zeros(1, 20, dtype=torch.bool)
    teacher_labels, _ = pseudo_labels(teacher, prompt, given, painted, "teacher", 0.0)
    fused_labels, _ = pseudo_labels(teacher, prompt, given, painted, "fused", 0.0, prompt_weight=0.5)
    assert teacher_labels.item() == 0 and fused_labels.item() == 4
    default_labels, _ = pseudo_labels(teacher, prompt, given, painted, "fused", 0.0)
    assert default_labels.item() == 0  # at the default weight 0.25 a 0.62 teacher holds


def test_partial_mask_does_not_teach_that_unpainted_pixels_are_background() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.int64)
    labels[0, 2:5, 2:5] = 4
    unknown = labels == 0
    big = 20.0

    def logits_with(unknown_class: int) -> torch.Tensor:
        logits = torch.zeros(1, 20, 8, 8)
        logits[0, 4][labels[0] == 4] = big
        logits[0, unknown_class][unknown[0]] = big
        return logits

    partial = torch.tensor([True])
    painted = torch.zeros(1, 20, dtype=torch.bool)
    painted[0, 4] = True
    complete = torch.tensor([False])
    nothing = torch.zeros(1, 20, dtype=torch.bool)

    partial_as_l5 = sum(supervised_loss(logits_with(2), labels, partial, painted))
    partial_as_background = sum(supervised_loss(logits_with(0), labels, partial, painted))
    complete_as_l5 = sum(supervised_loss(logits_with(2), labels, complete, nothing))
    complete_as_background = sum(supervised_loss(logits_with(0), labels, complete, nothing))
    assert float(partial_as_l5) == pytest.approx(float(partial_as_background), abs=1e-4)
    assert float(partial_as_l5) < 1e-3
    assert float(complete_as_l5) > 1.0 and float(complete_as_background) < 1e-3

    logits = logits_with(2).requires_grad_(True)
    sum(supervised_loss(logits, labels, partial, painted)).backward()
    painted_logit_gradient = logits.grad[0, 4][unknown[0]]
    assert painted_logit_gradient.abs().max() > 0  # unknown pixels are known not to be L3


def test_partially_labeled_case_also_enters_the_unlabeled_stream(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "partial", cases=5)
    for number in range(1, 6):
        mark_partial(data, number, [3, 4])
    trainer = Stage2Trainer(_config(data, tmp_path / "run", method="mean-teacher", labeled=2, validation=0,
                                    max_steps=4))
    events = _run(trainer)
    counts = re.search(r"(\d+) labeled / (\d+) unlabeled slices", events[0].message)
    assert int(counts.group(1)) == 2 * 4
    assert int(counts.group(2)) == 5 * 4
    assert all(math.isfinite(e.losses["total"]) for e in events if e.kind == "step")


def test_volumes_of_different_intensity_ranges_are_normalised_per_volume(tmp_path: Path) -> None:
    image, label = phantom(3)
    plain = prepare_volume(Volume(image, torch.eye(4).numpy(), None), (64, 32))
    scaled = prepare_volume(Volume(image * 4000.0 + 100.0, torch.eye(4).numpy(), None), (64, 32))
    assert abs(plain.images - scaled.images).max() < 1e-4
    data = write_dataset(tmp_path / "ranges", cases=5, scales=[1.0, 4000.0, 0.001, 255.0, 1.0])
    events = _run(Stage2Trainer(_config(data, tmp_path / "run", labeled=3, max_steps=4)))
    assert all(math.isfinite(e.losses["total"]) for e in events if e.kind == "step")


def test_cancel_saves_a_checkpoint_and_resume_finishes_the_run(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cancel = CancelToken()
    events = []
    for event in iter_train(_config(dataset, out, method="mean-teacher", max_steps=6), cancel):
        events.append(event)
        if event.kind == "step" and event.step == 2:
            cancel.cancel()
    assert events[-1].kind == "cancelled" and events[-1].step == 2
    assert (out / "train_state.safetensors").is_file()
    with pytest.raises(CPS4Error, match="--resume"):
        Stage2Trainer(_config(dataset, out, method="mean-teacher", max_steps=6))
    resumed = list(iter_train(_config(dataset, out, method="mean-teacher", max_steps=6, resume=True)))
    assert [e.step for e in resumed if e.kind == "step"] == [3, 4, 5, 6]
    history = json.loads((out / "history.json").read_text())
    assert [entry["step"] for entry in history["steps"]] == [1, 2, 3, 4, 5, 6]


def test_initial_weights_continue_an_earlier_run(dataset: Path, tmp_path: Path) -> None:
    _run(Stage2Trainer(_config(dataset, tmp_path / "first", max_steps=3)))
    weights = tmp_path / "first" / "model.safetensors"
    second = Stage2Trainer(_config(dataset, tmp_path / "second", max_steps=1, learning_rate=1e-12,
                                   init_weights=weights))
    _run(second)
    start = load_weights(weights)
    after = second.student.state_dict()
    assert all(torch.allclose(after[name], start[name], atol=1e-6) for name in start)
    config = json.loads((tmp_path / "second" / "config.json").read_text())
    assert config["settings"]["init_weights"] == str(weights)


def test_initial_weights_of_another_preset_are_a_one_line_error(dataset: Path, tmp_path: Path) -> None:
    _run(Stage2Trainer(_config(dataset, tmp_path / "tiny", max_steps=1)))
    trainer = Stage2Trainer(_config(dataset, tmp_path / "cpu", preset="cpu", max_steps=1,
                                    init_weights=tmp_path / "tiny" / "model.safetensors"))
    with pytest.raises(CPS4Error, match="do not fit"):
        _run(trainer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "cps4"}, "needs --vlm"),
        ({"method": "mean-teacher", "labeled": 0}, "no labeled volume"),
        ({"method": "mean-teacher", "labeled": 9}, "more than the 6 labeled"),
        ({"method": "mean-teacher", "labeled": 5, "validation": 1}, "no unlabeled training volume"),
        ({"method": "mean-teacher", "pseudo_label": "prompt"}, "needs class-prompt maps"),
        ({"method": "clever"}, "unknown"),
        ({"labeled": 1.5}, "neither a count"),
        ({"resume": True}, "nothing to resume"),
        ({"prompt_weight": 1.5}, "--prompt-weight 1.5 must be between 0 and 1"),
        ({"ema_decay": -0.1}, "--ema-decay"),
        ({"init_weights": "missing.safetensors"}, "initial weights file not found"),
    ],
)
def test_bad_input_is_a_one_line_error(dataset: Path, tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(CPS4Error, match=message) as error:
        Stage2Trainer(_config(dataset, tmp_path / "run", **overrides))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("stage", "scheme", "message"),
    [(2, "mrspineseg", "not a stage-1 run"), (1, "totalspineseg", "scheme totalspineseg")],
)
def test_vlm_must_be_a_stage1_run_of_our_scheme(
    dataset: Path, tmp_path: Path, stage: int, scheme: str, message: str
) -> None:
    vlm_run = write_stage1_run(tmp_path / "vlm", scheme=scheme, stage=stage)
    with pytest.raises(CPS4Error, match=message):
        Stage2Trainer(_config(dataset, tmp_path / "run", method="cps4", vlm=vlm_run))


def test_resume_refuses_another_method(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(Stage2Trainer(_config(dataset, out, max_steps=2)))
    with pytest.raises(CPS4Error, match="was started with method 'supervised', not 'mean-teacher'"):
        Stage2Trainer(_config(dataset, out, max_steps=4, method="mean-teacher", resume=True))
