"""Fusion of prompt maps into labels and pseudo-labels: one test per documented rule."""

from __future__ import annotations

import pytest
import torch

from cps4_engine.fusion import (
    combine_with_teacher,
    fuse_class_maps,
    fused_confidence,
    prompt_distribution,
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
