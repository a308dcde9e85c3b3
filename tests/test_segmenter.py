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


def _monai_unet(config: dict) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=config["in_channels"], out_channels=config["out_channels"],
                channels=tuple(config["channels"]), strides=tuple(config["strides"]),
                num_res_units=config["num_res_units"], norm=config["norm"], dropout=config["dropout"])


def test_weights_of_a_plain_monai_unet_load_and_give_the_same_logits() -> None:
    config = segmenter_config(get_preset("cpu"))
    torch.manual_seed(0)
    plain = _monai_unet(config)
    ours = build_segmenter(config)
    assert list(ours.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(plain.state_dict())
    images = torch.rand(2, config["in_channels"], *config["slice_size"])
    assert torch.equal(ours(images), plain(images))


def test_feature_dropout_perturbs_only_the_last_rows_in_train_mode() -> None:
    config = segmenter_config(get_preset("tiny"))
    torch.manual_seed(0)
    model = build_segmenter(config).train()
    images = torch.rand(3, 1, *config["slice_size"])
    plain = model(images)
    perturbed = model(images, perturbed_rows=2, feature_dropout=0.5)
    assert torch.equal(perturbed[0], plain[0])
    assert all(float((perturbed[row] - plain[row]).abs().max()) > 1e-3 for row in (1, 2))
    assert torch.equal(model(images, perturbed_rows=2, feature_dropout=0.0), plain)
    model.eval()
    assert torch.equal(model(images, perturbed_rows=3), plain)


def test_perturbed_rows_outside_the_batch_are_refused() -> None:
    model = build_segmenter(get_preset("tiny"))
    images = torch.rand(2, 1, *get_preset("tiny").slice_size)
    with pytest.raises(ValueError, match="perturbed_rows"):
        model(images, perturbed_rows=3)
