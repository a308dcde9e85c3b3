"""Stage-1 trainer on tiny synthetic data: the loss falls, runs resume exactly, bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from cps4_engine.checkpoint import write_run_config
from cps4_engine.errors import CPS4Error
from cps4_engine.events import CancelToken
from cps4_engine.stage1 import Stage1Config, iter_pretrain, pretrain
from cps4_engine.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1") / "data"
    write_synthetic_dataset(root, cases=3, seed=11)
    return root


def _config(dataset, out, **changes) -> Stage1Config:
    settings = dict(data=dataset, out=out, labeled=2, preset="tiny", max_steps=4, device="cpu",
                    text_encoder="tiny", validation=0, seed=0)
    settings.update(changes)
    return Stage1Config(**settings)


def test_tiny_preset_loss_falls_and_run_folder_is_complete(dataset, tmp_path) -> None:
    events = list(iter_pretrain(_config(dataset, tmp_path / "run", max_steps=40, validation=1, validation_every=20, augment=False)))
    kinds = [event.kind for event in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 40 and kinds.count("validation") == 2
    totals = [event.losses["total"] for event in events if event.kind == "step"]
    assert set(events[1].losses) == {"alignment", "token", "pixel", "total"}
    assert np.mean(totals[-10:]) < 0.9 * np.mean(totals[:10])
    assert all(event.eta_s is not None and event.eta_s >= 0 for event in events if event.kind == "step")
    run = tmp_path / "run"
    for name in ("config.json", "model.safetensors", "last.safetensors", "train_state.safetensors", "history.json", "split.json", "text_encoder/config.json"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["stage"] == 1 and len(config["prompts"]) == 20 and config["prompts"][4].startswith("the L3 vertebral body,")
    assert config["preset"]["name"] == "tiny" and config["text_encoder"]["source"] == "tiny" and "torch" in config["versions"]
    history = json.loads((run / "history.json").read_text())
    assert [entry["step"] for entry in history["validation"]] == [20, 40]
    reliability = json.loads((run / "class_reliability.json").read_text())
    best = max(history["validation"], key=lambda entry: entry["dice"])
    assert reliability["step"] == best["step"] and reliability["volumes"] == 1
    assert abs(reliability["score"] - best["dice"]) < 1e-5 and len(reliability["dice"]) == 19
    known = [value for value in reliability["dice"] if value is not None]
    assert known and all(0.0 <= value <= 1.0 for value in known)
    assert abs(reliability["score"] - np.mean(known)) < 1e-5  # one volume: the overall Dice is the mean over its classes


def test_cancel_then_resume_matches_an_uninterrupted_run(dataset, tmp_path) -> None:
    straight = [e.losses["total"] for e in iter_pretrain(_config(dataset, tmp_path / "straight", max_steps=6, augment=False)) if e.kind == "step"]
    cancel = CancelToken()

    def stop_after_three(event) -> None:
        if event.kind == "step" and event.step == 3:
            cancel.cancel()

    interrupted = []
    pretrain(_config(dataset, tmp_path / "resumed", max_steps=6, augment=False), callback=lambda e: (interrupted.append(e), stop_after_three(e)), cancel=cancel)
    assert interrupted[-1].kind == "cancelled" and interrupted[-1].step == 3
    resumed = [e for e in iter_pretrain(_config(dataset, tmp_path / "resumed", max_steps=6, augment=False, resume=True))]
    steps = [e for e in resumed if e.kind == "step"]
    assert [e.step for e in steps] == [4, 5, 6]
    assert np.allclose([e.losses["total"] for e in steps], straight[3:], rtol=1e-5)
    history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [entry["step"] for entry in history["steps"]] == [1, 2, 3, 4, 5, 6]


def test_ablation_switches_drop_their_terms(dataset, tmp_path) -> None:
    events = iter_pretrain(_config(dataset, tmp_path / "run", max_steps=1, token_loss=False, pixel_loss=False))
    step = next(event for event in events if event.kind == "step")
    assert set(step.losses) == {"alignment", "total"}


def test_bad_runs_and_datasets_are_one_line_errors(dataset, tmp_path) -> None:
    pretrain(_config(dataset, tmp_path / "run", max_steps=1))
    with pytest.raises(CPS4Error, match="already holds a run; pass --resume"):
        pretrain(_config(dataset, tmp_path / "run", max_steps=1))
    write_run_config(tmp_path / "stage2", {"stage": 2, "scheme": {"name": "mrspineseg"}})
    with pytest.raises(CPS4Error, match="not a stage-1 run folder"):
        pretrain(_config(dataset, tmp_path / "stage2", resume=True))
    write_run_config(tmp_path / "other", {"stage": 1, "scheme": {"name": "verse"}})
    with pytest.raises(CPS4Error, match="trained for scheme verse, not mrspineseg"):
        pretrain(_config(dataset, tmp_path / "other", resume=True))
    unlabeled = tmp_path / "unlabeled"
    shutil.copytree(dataset / "MR", unlabeled / "MR")
    with pytest.raises(CPS4Error, match="no labeled volume"):
        pretrain(_config(unlabeled, tmp_path / "never"))
    with pytest.raises(CPS4Error, match="--labeled 0"):
        pretrain(_config(dataset, tmp_path / "never", labeled=0))
    with pytest.raises(CPS4Error, match="--token-weight -1.0 must be a finite number >= 0"):
        pretrain(_config(dataset, tmp_path / "never", token_weight=-1.0))
    with pytest.raises(CPS4Error, match="every stage-1 loss weight is 0"):
        pretrain(_config(dataset, tmp_path / "never", alignment_weight=0.0, token_loss=False, pixel_loss=False))
    assert not (tmp_path / "never").exists()


def test_pretrains_on_real_cases_of_the_index_layout(realdata, tmp_path) -> None:
    events = list(iter_pretrain(_config(realdata / "vb3_l1l5_t1", tmp_path / "run", labeled=1, max_steps=2, train_cases=2, validation=1)))
    assert events[-1].kind == "end" and "1 labeled volumes (77 slices), 1 validation" in events[0].message
    assert np.isfinite(events[-1].metrics["dice"])


def test_a_frozen_text_encoder_keeps_its_weights_and_the_run_records_its_choices(dataset, tmp_path) -> None:
    from cps4_engine.checkpoint import load_weights
    from cps4_engine.classmaps import load_vlm
    from cps4_engine.models.text import load_text_encoder

    run = tmp_path / "run"
    list(iter_pretrain(_config(dataset, run, max_steps=3, freeze_text_encoder=True, centre_prompts=False)))
    weights = load_weights(run / "model.safetensors")
    original = load_text_encoder("tiny", embed_dim=16, seed=0).backbone.state_dict()
    for name, value in original.items():
        assert np.array_equal(weights[f"text_encoder.backbone.{name}"].numpy(), value.numpy()), name
    config = json.loads((run / "config.json").read_text())
    assert config["text_encoder"]["frozen"] is True and config["centre_prompts"] is False
    assert load_vlm(run).centre_prompts is False
    resumed = list(iter_pretrain(_config(dataset, run, max_steps=5, resume=True)))
    assert [event.step for event in resumed if event.kind == "step"] == [4, 5]


def test_cpu_bfloat16_steps_train_with_augmentation_and_are_recorded(dataset, tmp_path) -> None:
    out = tmp_path / "bf16"
    events = list(iter_pretrain(_config(dataset, out, max_steps=6, validation=1, validation_every=3, cpu_bf16=True)))
    steps = [event for event in events if event.kind == "step"]
    assert len(steps) == 6 and all(math.isfinite(event.losses["total"]) for event in steps)
    assert events[-1].kind == "end"
    assert json.loads((out / "config.json").read_text())["settings"]["cpu_bf16"] is True
