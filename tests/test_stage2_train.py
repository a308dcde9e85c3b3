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
from cps4_engine import distributed
from cps4_engine.checkpoint import load_weights
from cps4_engine.errors import CPS4Error
from cps4_engine.events import CancelToken
from cps4_engine.fusion import RELIABILITY_CEILING, RELIABILITY_FLOOR
from cps4_engine.io import Volume
from cps4_engine.presets import Preset
from cps4_engine.preprocess import UNKNOWN_LABEL, prepare_volume
from cps4_engine.stage2 import (
    Stage2Config,
    Stage2Trainer,
    consistency_loss,
    iter_train,
    pseudo_labels,
    sigmoid_rampup,
    supervised_loss,
    unimatch_loss,
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
    # A marked partial mask (data.load_case): unknown pixels carry UNKNOWN_LABEL; the same
    # pixels are background (0) in the complete mask.
    labels = torch.zeros(1, 8, 8, dtype=torch.int64)
    labels[0, 2:5, 2:5] = 4
    unknown = labels == 0
    partial_labels = torch.where(unknown, UNKNOWN_LABEL, labels)
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

    partial_as_l5 = sum(supervised_loss(logits_with(2), partial_labels, partial, painted))
    partial_as_background = sum(supervised_loss(logits_with(0), partial_labels, partial, painted))
    complete_as_l5 = sum(supervised_loss(logits_with(2), labels, complete, nothing))
    complete_as_background = sum(supervised_loss(logits_with(0), labels, complete, nothing))
    assert float(partial_as_l5) == pytest.approx(float(partial_as_background), abs=1e-4)
    assert float(partial_as_l5) < 1e-3
    assert float(complete_as_l5) > 1.0 and float(complete_as_background) < 1e-3

    logits = logits_with(2).requires_grad_(True)
    sum(supervised_loss(logits, partial_labels, partial, painted)).backward()
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
        ({"method": "unimatch", "pseudo_label": "fused"}, "needs class-prompt maps"),
        ({"method": "mean-teacher", "base": "fixmatch"}, "--base 'fixmatch' is unknown"),
        ({"method": "mean-teacher", "base": "unimatch"}, "--base unimatch applies to --method cps4 only"),
        ({"method": "supervised", "base": "mean-teacher"}, "applies to --method cps4 only"),
        ({"method": "unimatch", "prompt_weighting": "global"}, "--prompt-weighting global weighs fused"),
        ({"method": "mean-teacher", "prompt_weighting": "vote"}, "--prompt-weighting 'vote' is unknown"),
        ({"method": "unimatch", "feature_dropout": 1.0}, "--feature-dropout 1.0 must be between 0 and 0.95"),
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


def _constant_logits(classes: list[int], strength: float) -> torch.Tensor:
    """``(1, 20, 1, len(classes))`` logits: ``strength`` at each pixel's class, 0 elsewhere."""
    logits = torch.zeros(1, 20, 1, len(classes))
    for pixel, class_id in enumerate(classes):
        logits[0, class_id, 0, pixel] = strength
    return logits


def test_weak_to_strong_loss_is_zero_when_every_view_agrees_with_a_perfect_weak_prediction() -> None:
    weak = torch.softmax(_constant_logits([4, 0], 40.0), dim=1)
    targets, mask = pseudo_labels(weak, None, torch.zeros(1, 1, 2, dtype=torch.int64),
                                  torch.zeros(1, 20, dtype=torch.bool), "teacher", confidence_threshold=0.95)
    assert targets.tolist() == [[[4, 0]]] and mask.all()
    agreeing = _constant_logits([4, 0], 40.0)
    assert float(unimatch_loss([agreeing, agreeing], agreeing, targets, mask)) < 1e-12


def test_weak_to_strong_loss_weighs_the_views_a_quarter_a_quarter_and_a_half() -> None:
    targets = torch.tensor([[[4, 0]]])
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    uniform = torch.zeros(1, 20, 1, 2)  # CE ln 20 at every pixel
    right = _constant_logits([4, 0], 40.0)  # CE 0
    wrong = _constant_logits([7, 7], math.log(19.0))  # p(target) = 1 / (19 + 19): CE ln 38
    assert float(consistency_loss(uniform, targets, mask)) == pytest.approx(math.log(20.0))
    assert float(consistency_loss(wrong, targets, mask)) == pytest.approx(math.log(38.0))
    assert float(unimatch_loss([uniform, right], wrong, targets, mask)) == pytest.approx(
        0.25 * math.log(20.0) + 0.5 * math.log(38.0))
    assert float(unimatch_loss([wrong, wrong], right, targets, mask)) == pytest.approx(0.5 * math.log(38.0))


def test_weak_to_strong_loss_ignores_pixels_the_weak_view_is_unsure_of() -> None:
    weak = torch.zeros(1, 20, 1, 2)
    weak[0, 4, 0, 0] = 0.97  # confident class 4
    weak[0, 0, 0, 0] = 0.03
    weak[0, 5, 0, 1] = 0.6  # unsure class 5
    weak[0, 0, 0, 1] = 0.4
    targets, mask = pseudo_labels(weak, None, torch.zeros(1, 1, 2, dtype=torch.int64),
                                  torch.zeros(1, 20, dtype=torch.bool), "teacher", confidence_threshold=0.95)
    assert mask.tolist() == [[[True, False]]]
    uniform = torch.zeros(1, 20, 1, 2)
    # only pixel 0 counts, averaged over both pixels: ln 20 / 2 per view
    assert float(unimatch_loss([uniform, uniform], uniform, targets, mask)) == pytest.approx(math.log(20.0) / 2)
    confident_only_wrong = _constant_logits([4, 9], 40.0)
    assert float(unimatch_loss([confident_only_wrong] * 2, confident_only_wrong, targets, mask)) < 1e-12


def _one_step_losses(trainer: Stage2Trainer) -> dict[str, float]:
    """One step's losses with a teacher that labels every pixel class 7 with certainty."""

    class CertainTeacher(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(images.shape[0], 20, *images.shape[2:])
            logits[:, 7] = 50.0
            return logits

    context = distributed.setup("cpu")
    try:
        trainer.setup(context)
        trainer.teacher = CertainTeacher()
        return trainer.loss(1000)[1]
    finally:
        distributed.teardown(context)


def test_unimatch_labels_with_the_student_and_mean_teacher_with_the_teacher(dataset: Path, tmp_path: Path) -> None:
    mean_teacher = _one_step_losses(Stage2Trainer(_config(dataset, tmp_path / "mt", method="mean-teacher")))
    unimatch = _one_step_losses(Stage2Trainer(_config(dataset, tmp_path / "um", method="unimatch")))
    assert mean_teacher["confident"] == 1.0  # the certain teacher labelled every pixel
    assert unimatch["confident"] < 0.5  # an untrained student is rarely 80 % sure
    assert unimatch["unsupervised"] != mean_teacher["unsupervised"]


def test_unimatch_trains_and_records_its_base(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "unimatch"
    trainer = Stage2Trainer(_config(dataset, out, method="unimatch", max_steps=6))
    events = _run(trainer)
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 6 and all(math.isfinite(e.losses["unsupervised"]) for e in steps)
    assert steps[0].losses["weight"] < steps[-1].losses["weight"]
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["base"], config["pseudo_label"]) == ("unimatch", "unimatch", "teacher")
    assert config["prompt_weighting"] is None and config["prompt_weights"] is None
    history = json.loads((out / "history.json").read_text())
    assert {"dice", "teacher_dice"} <= set(history["validation"][-1])


def test_cps4_on_unimatch_fuses_prompt_maps_computed_once(dataset: Path, tmp_path: Path) -> None:
    vlm = CountingVLM()
    out = tmp_path / "cps4u"
    trainer = Stage2Trainer(
        _config(dataset, out, method="cps4", base="unimatch", vlm=write_stage1_run(tmp_path / "vlm"), max_steps=4),
        vlm_loader=lambda run, device: vlm,
    )
    events = _run(trainer)
    assert "stage 2 cps4 on unimatch" in events[0].message and vlm.calls == 1
    assert all(math.isfinite(e.losses["total"]) for e in events if e.kind == "step")
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["base"], config["pseudo_label"]) == ("cps4", "unimatch", "fused")
    # a stage-1 run saved before class_reliability.json existed: one global weight
    assert config["prompt_weighting"] == "global" and config["prompt_weights"] == [0.25] * 19


def test_resumed_unimatch_run_finishes_and_another_base_is_refused(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cancel = CancelToken()
    for event in iter_train(_config(dataset, out, method="unimatch", max_steps=5), cancel):
        if event.kind == "step" and event.step == 2:
            cancel.cancel()
    resumed = list(iter_train(_config(dataset, out, method="unimatch", max_steps=5, resume=True)))
    assert [e.step for e in resumed if e.kind == "step"] == [3, 4, 5]

    vlm_run = write_stage1_run(tmp_path / "vlm")
    cps4 = tmp_path / "cps4"
    _run(Stage2Trainer(_config(dataset, cps4, method="cps4", base="unimatch", vlm=vlm_run, max_steps=2),
                       vlm_loader=lambda run, device: CountingVLM()))
    with pytest.raises(CPS4Error, match="was started with base 'unimatch', not 'mean-teacher'"):
        Stage2Trainer(_config(dataset, cps4, method="cps4", vlm=vlm_run, max_steps=4, resume=True))


def _stage1_with_reliability(run: Path, dice: list) -> Path:
    write_stage1_run(run)
    (run / "class_reliability.json").write_text(json.dumps({"dice": dice, "score": 0.6, "step": 10, "volumes": 1}))
    return run


def test_fused_pseudo_labels_weigh_class_maps_by_their_stage1_dice(dataset: Path, tmp_path: Path) -> None:
    middle = (RELIABILITY_FLOOR + RELIABILITY_CEILING) / 2
    vlm_run = _stage1_with_reliability(tmp_path / "vlm", [RELIABILITY_CEILING, middle, RELIABILITY_FLOOR] + [None] * 16)
    trainer = Stage2Trainer(_config(dataset, tmp_path / "run", method="cps4", vlm=vlm_run, prompt_weight=0.3,
                                    max_steps=2), vlm_loader=lambda run, device: CountingVLM())
    _run(trainer)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["prompt_weighting"] == "reliability"
    assert config["prompt_weights"][:3] == pytest.approx([0.3, 0.15, 0.0])
    assert config["prompt_weights"][3:] == pytest.approx([0.15] * 16)
    forced = Stage2Trainer(_config(dataset, tmp_path / "global", method="cps4", vlm=vlm_run, prompt_weight=0.3,
                                   prompt_weighting="global"))
    assert forced.prompt_weights == [0.3] * 19

    # a resumed run keeps the weights it recorded, though the stage-1 run changed since
    _stage1_with_reliability(vlm_run, [RELIABILITY_FLOOR] * 19)
    resumed = Stage2Trainer(_config(dataset, tmp_path / "run", method="cps4", vlm=vlm_run, prompt_weight=0.3,
                                    max_steps=4, resume=True))
    assert resumed.prompt_weights == pytest.approx(config["prompt_weights"])
    with pytest.raises(CPS4Error, match="was started with prompt weighting 'reliability', not 'global'"):
        Stage2Trainer(_config(dataset, tmp_path / "run", method="cps4", vlm=vlm_run, prompt_weight=0.3,
                              max_steps=4, resume=True, prompt_weighting="global"))


def test_reliability_weighting_without_the_file_or_with_a_broken_one_is_a_one_line_error(
    dataset: Path, tmp_path: Path
) -> None:
    old_run = write_stage1_run(tmp_path / "old")
    with pytest.raises(CPS4Error, match="needs the stage-1 run's class_reliability.json") as error:
        Stage2Trainer(_config(dataset, tmp_path / "run", method="cps4", vlm=old_run, prompt_weighting="reliability"))
    assert "\n" not in str(error.value)
    broken = _stage1_with_reliability(tmp_path / "broken", [0.5] * 18)
    with pytest.raises(CPS4Error, match="'dice' must list 19"):
        Stage2Trainer(_config(dataset, tmp_path / "run", method="cps4", vlm=broken))


@pytest.mark.parametrize(("weak_zoom", "weak_rotation", "zoom", "degrees"), [
    (None, None, 0.1, 10.0),  # the preset's weak view
    (0.25, 20.0, 0.25, 20.0),
])
def test_the_weak_views_zoom_and_rotation_come_from_the_recipe(
    dataset: Path, tmp_path: Path, weak_zoom: float | None, weak_rotation: float | None, zoom: float, degrees: float
) -> None:
    trainer = Stage2Trainer(_config(dataset, tmp_path / "run", weak_zoom=weak_zoom, weak_rotation=weak_rotation))
    context = distributed.setup("cpu")
    try:
        trainer.setup(context)
    finally:
        distributed.teardown(context)
    assert trainer.augmenter.scale == zoom
    assert trainer.augmenter.rotate_radians == pytest.approx(math.radians(degrees))
    saved = trainer.run_config()["preset"]
    assert (saved["weak_zoom"], saved["weak_rotation"]) == (zoom, degrees)
    assert Preset.from_dict({k: v for k, v in saved.items() if k not in ("weak_zoom", "weak_rotation")}).weak_zoom == 0.1


@pytest.mark.parametrize("labeled_strong", [False, True])
def test_labeled_slices_get_the_strong_view_only_when_the_recipe_asks(
    dataset: Path, tmp_path: Path, labeled_strong: bool
) -> None:
    trainer = Stage2Trainer(_config(dataset, tmp_path / "run", labeled_strong=labeled_strong))
    seen: list[torch.Tensor] = []
    context = distributed.setup("cpu")
    try:
        trainer.setup(context)
        strong = trainer.augmenter.strong
        trainer.augmenter.strong = lambda images: seen.append(images) or strong(images)  # type: ignore[method-assign]
        network_inputs: list[torch.Tensor] = []
        trainer.trained.register_forward_pre_hook(lambda _module, args: network_inputs.append(args[0]))
        trainer.loss(0)
    finally:
        distributed.teardown(context)
    assert trainer.run_config()["preset"]["labeled_strong"] is labeled_strong
    assert len(seen) == (1 if labeled_strong else 0)
    if labeled_strong:  # the network saw the corrupted view, not the weak one
        assert not torch.equal(network_inputs[0], seen[0])


@pytest.mark.parametrize("method", ["mean-teacher", "unimatch"])
def test_cpu_bfloat16_steps_train_and_are_recorded(dataset: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / "bf16"
    trainer = Stage2Trainer(_config(dataset, out, method=method, cpu_bf16=True, labeled_strong=True))
    under_autocast: list[bool] = []
    loss = trainer.loss
    trainer.loss = lambda step: under_autocast.append(torch.is_autocast_enabled("cpu")) or loss(step)  # type: ignore[method-assign]
    events = _run(trainer)
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 6 and all(math.isfinite(e.losses["total"]) for e in steps)
    assert under_autocast == [True] * 6 and not torch.is_autocast_enabled("cpu")
    assert events[-1].kind == "end"
    assert json.loads((out / "config.json").read_text())["settings"]["cpu_bf16"] is True
