"""The stage-2 segmenter: shapes, rebuild from JSON, bad configs."""

from __future__ import annotations

import json

import pytest
import torch

from cps4_engine.errors import CPS4Error
from cps4_engine.models.segmenter import build_segmenter, segmenter_config
from cps4_engine.presets import get_preset


def test_tiny_preset_maps_slices_to_twenty_class_logits() -> None:
    model = build_segmenter(get_preset("tiny"))
    height, width = get_preset("tiny").slice_size
    logits = model(torch.rand(2, 1, height, width))
    assert logits.shape == (2, 20, height, width)


def test_config_survives_json_and_rebuilds_identical_network() -> None:
    config = segmenter_config(get_preset("tiny"))
    restored = json.loads(json.dumps(config))
    torch.manual_seed(0)
    first = build_segmenter(config)
    second = build_segmenter(restored)
    second.load_state_dict(first.state_dict())
    first.eval()
    second.eval()
    images = torch.rand(1, 1, *config["slice_size"])
    assert torch.equal(first(images), second(images))
    assert config["out_channels"] == 20 and config["in_channels"] == 1
    assert len(config["strides"]) == len(config["channels"]) - 1


def test_unknown_network_is_a_one_line_error() -> None:
    config = segmenter_config(get_preset("tiny"))
    config["network"] = "resnet"
    with pytest.raises(CPS4Error, match="resnet"):
        build_segmenter(config)


def test_missing_field_is_a_one_line_error() -> None:
    config = segmenter_config(get_preset("tiny"))
    del config["channels"]
    with pytest.raises(CPS4Error, match="channels"):
        build_segmenter(config)
