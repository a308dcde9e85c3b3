"""Fusion of prompt maps into labels and pseudo-labels: one test per documented rule."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cps4_engine.errors import CPS4Error
from cps4_engine.fusion import (
    class_weights,
    combine_with_teacher,
    fuse_class_maps,
    fused_confidence,
    prompt_distribution,
    read_class_reliability,
)


def _prompt_maps(values: dict[int, list[float]], pixels: int) -> torch.Tensor:
    """(19, pixels) maps with the given per-pixel probabilities for some class ids."""
    maps = torch.zeros(19, pixels)
    for class_id, probabilities in values.items():
        maps[class_id - 1] = torch.tensor(probabilities)
    return maps


def test_unclaimed_pixels_are_background() -> None:
    maps = _prompt_maps({3: [0.2, 0.5, 0.51]}, 3)
    assert fuse_class_maps(maps, threshold=0.5).tolist() == [0, 0, 3]


def test_overlap_goes_to_the_most_confident_class() -> None:
    maps = _prompt_maps({2: [0.9, 0.6], 12: [0.7, 0.8]}, 2)
    assert fuse_class_maps(maps).tolist() == [2, 12]


def test_tie_goes_to_the_lower_class_id() -> None:
    maps = _prompt_maps({5: [0.8], 4: [0.8], 17: [0.8]}, 1)
    assert fuse_class_maps(maps).tolist() == [4]


def test_threshold_is_respected() -> None:
    maps = _prompt_maps({7: [0.3, 0.6]}, 2)
    assert fuse_class_maps(maps, threshold=0.25).tolist() == [7, 7]
    assert fuse_class_maps(maps, threshold=0.7).tolist() == [0, 0]


def test_batched_maps_use_class_dim_one() -> None:
    maps = torch.zeros(2, 19, 3, 4)
    maps[0, 0, 1, 2] = 0.9
    maps[1, 18, 2, 3] = 0.7
    labels = fuse_class_maps(maps, class_dim=1)
    assert labels.shape == (2, 3, 4)
    assert labels.dtype == torch.int64
    assert labels[0, 1, 2] == 1 and labels[1, 2, 3] == 19
    assert int((labels > 0).sum()) == 2


def test_wrong_channel_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="19 classes"):
        fuse_class_maps(torch.zeros(20, 4))
    with pytest.raises(ValueError, match="19 classes"):
        fuse_class_maps(torch.zeros(2, 19, 4), class_dim=0)


def test_fused_confidence_is_winner_probability_or_its_complement() -> None:
    maps = _prompt_maps({2: [0.9, 0.2], 3: [0.4, 0.1]}, 2)
    assert torch.allclose(fused_confidence(maps), torch.tensor([0.9, 0.8]))


def test_prompt_distribution_sums_to_one_and_keeps_the_winner() -> None:
    maps = _prompt_maps({2: [0.9, 0.2], 3: [0.4, 0.3]}, 2)
    distribution = prompt_distribution(maps)
    assert distribution.shape == (20, 2)
    assert torch.allclose(distribution.sum(0), torch.ones(2))
    assert torch.allclose(distribution[:, 0][[0, 2, 3]], torch.tensor([0.1, 0.9, 0.0]))
    assert torch.allclose(distribution[:, 1][[0, 2, 3]], torch.tensor([0.7, 0.0, 0.3]))
    assert distribution.argmax(0).tolist() == fuse_class_maps(maps).tolist()


def _teacher(pixels: list[dict[int, float]]) -> torch.Tensor:
    teacher = torch.zeros(20, len(pixels))
    for index, values in enumerate(pixels):
        for class_id, probability in values.items():
            teacher[class_id, index] = probability
    return teacher


def test_teacher_mode_ignores_the_prompts() -> None:
    teacher = _teacher([{0: 0.3, 4: 0.7}, {0: 0.9, 5: 0.1}])
    prompts = _prompt_maps({9: [1.0, 1.0]}, 2)
    result = combine_with_teacher(teacher, prompts, mode="teacher")
    assert result.labels.tolist() == [4, 0]
    assert torch.allclose(result.confidence, torch.tensor([0.7, 0.9]))
    assert torch.equal(result.probabilities, teacher)


def test_prompt_mode_follows_the_fusion_rules() -> None:
    teacher = _teacher([{4: 1.0}, {4: 1.0}])
    prompts = _prompt_maps({9: [0.8, 0.3]}, 2)
    result = combine_with_teacher(teacher, prompts, mode="prompt")
    assert result.labels.tolist() == [9, 0]
    assert torch.allclose(result.confidence, torch.tensor([0.8, 0.7]))
    assert torch.allclose(result.probabilities.sum(0), torch.ones(2))


def test_fused_mode_averages_teacher_and_prompt_distribution() -> None:
    # pixel 0: an unsure teacher (0.4 for class 4) is overruled by a confident prompt (0.9
    # for class 6); pixel 1: a confident teacher outweighs a weak prompt.
    teacher = _teacher([{0: 0.3, 4: 0.4, 6: 0.3}, {0: 0.05, 4: 0.95}])
    prompts = _prompt_maps({6: [0.9, 0.6]}, 2)
    result = combine_with_teacher(teacher, prompts, mode="fused", prompt_weight=0.5)
    assert result.labels.tolist() == [6, 4]
    assert torch.allclose(result.confidence, torch.tensor([0.6, 0.475]))
    assert torch.allclose(result.probabilities.sum(0), torch.ones(2))


def test_fused_mode_with_zero_weight_equals_teacher() -> None:
    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(3, 20, 5, 5), dim=1)
    prompts = torch.rand(3, 19, 5, 5)
    fused = combine_with_teacher(teacher, prompts, mode="fused", prompt_weight=0.0, class_dim=1)
    plain = combine_with_teacher(teacher, prompts, mode="teacher", class_dim=1)
    assert torch.equal(fused.labels, plain.labels)
    assert torch.allclose(fused.confidence, plain.confidence)


def test_combine_rejects_bad_arguments() -> None:
    teacher = torch.full((20, 4), 0.05)
    with pytest.raises(ValueError, match="unknown fusion mode"):
        combine_with_teacher(teacher, torch.zeros(19, 4), mode="vote")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompt_weight"):
        combine_with_teacher(teacher, torch.zeros(19, 4), prompt_weight=1.5)
    with pytest.raises(ValueError, match="differ"):
        combine_with_teacher(teacher, torch.zeros(19, 5))


def test_per_class_weights_use_the_weight_of_the_class_map_speaking_at_each_pixel() -> None:
    # pixel 0: class 6's map speaks (weight 0.5): half teacher, half prompt distribution;
    # pixel 1: class 2's map speaks (weight 0): the teacher alone.
    teacher = _teacher([{0: 0.3, 4: 0.4, 6: 0.3}, {0: 0.05, 4: 0.95}])
    prompts = _prompt_maps({6: [0.9, 0.0], 2: [0.0, 0.7]}, 2)
    weights = torch.zeros(19)
    weights[6 - 1] = 0.5
    result = combine_with_teacher(teacher, prompts, mode="fused", prompt_weight=weights)
    assert result.labels.tolist() == [6, 4]
    assert torch.allclose(result.confidence, torch.tensor([0.6, 0.95]))
    assert torch.allclose(result.probabilities[:, 0][[0, 4, 6]], torch.tensor([0.2, 0.2, 0.6]))
    assert torch.equal(result.probabilities[:, 1], teacher[:, 1])


def test_equal_per_class_weights_equal_the_global_weight() -> None:
    torch.manual_seed(1)
    teacher = torch.softmax(torch.randn(2, 20, 4, 4), dim=1)
    prompts = torch.rand(2, 19, 4, 4)
    one = combine_with_teacher(teacher, prompts, prompt_weight=0.25, class_dim=1)
    each = combine_with_teacher(teacher, prompts, prompt_weight=torch.full((19,), 0.25), class_dim=1)
    assert torch.equal(one.labels, each.labels) and torch.equal(one.probabilities, each.probabilities)


def test_per_class_weights_of_another_shape_or_range_are_rejected() -> None:
    teacher = torch.full((20, 4), 0.05)
    with pytest.raises(ValueError, match="shape"):
        combine_with_teacher(teacher, torch.zeros(19, 4), prompt_weight=torch.zeros(20))
    with pytest.raises(ValueError, match="prompt_weight"):
        combine_with_teacher(teacher, torch.zeros(19, 4), prompt_weight=torch.full((19,), 1.5))


def test_global_weighting_gives_every_class_the_prompt_weight() -> None:
    assert class_weights("global", 0.25, None) == [0.25] * 19
    assert class_weights("global", 0.4, [0.1] * 19) == [0.4] * 19


def test_reliability_weighting_ramps_from_the_floor_to_the_ceiling() -> None:
    # floor 0.3 -> 0, ceiling 0.8 and above -> the full weight, linear between.
    dice = [0.3, 0.8, 0.55, 0.9, 0.1, 0.425] + [None] * 13
    weights = class_weights("reliability", 0.4, dice)
    assert weights[:6] == pytest.approx([0.0, 0.4, 0.2, 0.4, 0.0, 0.1])
    # classes without a Dice get the mean weight of those with one: (0 + .4 + .2 + .4 + 0 + .1) / 6
    assert weights[6:] == pytest.approx([1.1 / 6] * 13)


def test_reliability_weighting_without_any_measured_class_is_the_global_weight() -> None:
    assert class_weights("reliability", 0.25, [None] * 19) == [0.25] * 19


def test_class_weights_reject_unknown_modes_and_missing_values() -> None:
    with pytest.raises(ValueError, match="unknown prompt weighting"):
        class_weights("vote", 0.25, None)
    with pytest.raises(ValueError, match="needs 19"):
        class_weights("reliability", 0.25, None)


def _write_reliability(run: Path, record: object) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / "class_reliability.json"
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


def test_class_reliability_is_read_with_nulls_and_missing_files_are_none(tmp_path: Path) -> None:
    assert read_class_reliability(tmp_path) is None
    dice = [0.5, None] + [0.75] * 17
    _write_reliability(tmp_path, {"dice": dice, "score": 0.7, "step": 40, "volumes": 2})
    assert read_class_reliability(tmp_path) == dice


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("{not json", "unreadable class reliability"),
        ([0.5] * 19, "must be an object"),
        ({"dice": [0.5] * 18, "step": 1, "volumes": 1}, "'dice' must list 19"),
        ({"dice": [0.5] * 18 + [1.5], "step": 1, "volumes": 1}, "'dice[18]' is 1.5"),
        ({"dice": ["high"] + [0.5] * 18, "step": 1, "volumes": 1}, "'dice[0]'"),
        ({"dice": [True] + [0.5] * 18, "step": 1, "volumes": 1}, "'dice[0]' is true"),
        ('{"dice": [NaN' + ', 0.5' * 18 + '], "step": 1, "volumes": 1}', "'dice[0]' is NaN"),
        ({"dice": [0.5] * 19, "volumes": 1}, "'step' is null"),
        ({"dice": [0.5] * 19, "step": 1, "volumes": -1}, "'volumes' is -1"),
    ],
)
def test_malformed_class_reliability_is_a_one_line_error(tmp_path: Path, record: object, message: str) -> None:
    path = _write_reliability(tmp_path, record)
    with pytest.raises(CPS4Error, match=re.escape(message)) as error:
        read_class_reliability(tmp_path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
