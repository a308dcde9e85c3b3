"""A stage-1 run keeps the prompts it was trained with: in config.json, on resume, at load."""

from __future__ import annotations

import json

import pytest

from cps4_engine.classmaps import load_vlm
from cps4_engine.errors import CPS4Error
from cps4_engine.labels import mrspineseg_scheme
from cps4_engine.stage1 import Stage1Config, Stage1Trainer, iter_pretrain
from cps4_engine.synthetic import write_synthetic_dataset

OLD_PROMPTS = mrspineseg_scheme().class_prompts("a sagittal T2-weighted MR image of the {name}")


def _config(data, out, **changes) -> Stage1Config:
    settings = dict(data=data, out=out, labeled=1, preset="tiny", max_steps=1, device="cpu",
                    text_encoder="tiny", validation=0, seed=0, augment=False)
    settings.update(changes)
    return Stage1Config(**settings)


def test_a_run_is_loaded_and_resumed_with_its_recorded_prompts(tmp_path) -> None:
    data = tmp_path / "data"
    write_synthetic_dataset(data, cases=2, seed=5)
    run = tmp_path / "run"
    list(iter_pretrain(_config(data, run)))
    config = json.loads((run / "config.json").read_text())
    assert config["prompts"] == mrspineseg_scheme().class_prompts() and config["prompt_template"] == "{description}"
    assert config["scheme"]["classes"][4]["description"] == config["prompts"][4]

    # A run made when the defaults were other prompts: loading and resuming keep them.
    config["prompts"] = OLD_PROMPTS
    (run / "config.json").write_text(json.dumps(config))
    assert load_vlm(run).prompts == OLD_PROMPTS
    resumed = Stage1Trainer(_config(data, run, max_steps=2, resume=True))
    assert resumed.prompts == OLD_PROMPTS
    assert [event.step for event in resumed.events() if event.kind == "step"] == [2]
    assert json.loads((run / "config.json").read_text())["prompts"] == OLD_PROMPTS

    with pytest.raises(CPS4Error, match="was started with prompt_template None, not 'the {name}'"):
        Stage1Trainer(_config(data, run, max_steps=3, resume=True, prompt_template="the {name}"))


def test_a_custom_template_is_recorded_and_a_bad_one_is_one_line(tmp_path) -> None:
    data = tmp_path / "data"
    write_synthetic_dataset(data, cases=2, seed=5)
    run = tmp_path / "run"
    list(iter_pretrain(_config(data, run, prompt_template="a T1 image of the {name}")))
    config = json.loads((run / "config.json").read_text())
    assert config["prompts"][0] == "a T1 image of the background" and config["prompts"][4] == "a T1 image of the L3 vertebra"
    assert config["prompt_template"] == "a T1 image of the {name}"
    assert load_vlm(run).prompts == config["prompts"]
    with pytest.raises(CPS4Error, match="prompt template 'a T1 image' has no placeholder") as info:
        Stage1Trainer(_config(data, tmp_path / "never", prompt_template="a T1 image"))
    assert "\n" not in str(info.value) and not (tmp_path / "never").exists()
