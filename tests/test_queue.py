"""Uncertainty measures and the review-queue ranking on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from cps4_engine.active.queue import (
    CaseUncertainty,
    case_uncertainty,
    normalised_entropy,
    rank_cases,
    rank_classes,
)
from cps4_engine.errors import CPS4Error

SHAPE = (4, 8, 8)


def prediction(blocks: dict[int, float], shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Softmax-like (20, *shape): background certain except in one block per class.

    Class ``c`` fills rows ``2c-2:2c`` of axis 1 with probability ``p`` for itself and the
    rest spread evenly over the other 19 classes.
    """
    probs = np.zeros((20, *shape), dtype=np.float32)
    probs[0] = 1.0
    for class_id, p in blocks.items():
        region = (slice(None), slice(2 * class_id - 2, 2 * class_id), slice(None))
        probs[(slice(None), *region)] = (1.0 - p) / 19
        probs[(class_id, *region)] = p
    return probs


def test_normalised_entropy_spans_zero_to_one() -> None:
    certain = np.zeros((20, 2))
    certain[3] = 1.0
    uniform = np.full((20, 2), 1 / 20)
    np.testing.assert_allclose(normalised_entropy(certain), 0.0, atol=1e-6)
    np.testing.assert_allclose(normalised_entropy(uniform), 1.0, atol=1e-6)


def test_case_figures_match_the_construction() -> None:
    result = case_uncertainty(prediction({1: 0.95, 2: 0.6}), confidence_threshold=0.8)
    assert result.region_voxels == 2 * 4 * 8 * 2
    assert result.low_confidence_voxels == 4 * 8 * 2, "only class 2's block is below 0.8"
    assert result.low_confidence_fraction == pytest.approx(0.5)
    assert result.disagreement is None
    assert set(result.classes) == {1, 2}
    assert result.classes[2].low_confidence_voxels == result.classes[2].voxels == 64
    assert result.classes[1].low_confidence_voxels == 0
    assert result.classes[2].mean_entropy > result.classes[1].mean_entropy > 0
    assert result.score == pytest.approx((result.mean_entropy + 0.5) / 2)


def test_cases_rank_from_unsure_to_confident() -> None:
    uncertainties = {
        "confident": case_uncertainty(prediction({1: 0.97, 2: 0.97})),
        "unsure": case_uncertainty(prediction({1: 0.4, 2: 0.5})),
        "medium": case_uncertainty(prediction({1: 0.97, 2: 0.6})),
    }
    assert [case for case, _ in rank_cases(uncertainties)] == ["unsure", "medium", "confident"]


def test_classes_rank_within_a_case() -> None:
    result = case_uncertainty(prediction({1: 0.9, 2: 0.45, 3: 0.7}))
    assert [c.class_id for c in rank_classes(result)] == [2, 3, 1]


def test_prompt_disagreement_raises_the_rank() -> None:
    probs = prediction({1: 0.9, 2: 0.9})
    agreeing = probs[1:].copy()
    disagreeing = agreeing.copy()
    disagreeing[1] = 0.0  # the prompt map of class 2 sees nothing where the teacher does
    disagreeing[2, :, 4:6] = 1.0  # and claims class 3 where the teacher says class 2
    agree = case_uncertainty(probs, agreeing)
    disagree = case_uncertainty(probs, disagreeing)
    assert agree.disagreement == pytest.approx(0.0, abs=1e-6)
    assert disagree.classes[2].disagreement == pytest.approx(0.9, abs=1e-5)
    assert disagree.classes[3].voxels == 0 and disagree.classes[3].disagreement > 0.9
    ranking = rank_cases({"agree": agree, "disagree": disagree})
    assert [case for case, _ in ranking] == ["disagree", "agree"]
    assert rank_classes(disagree)[0].class_id in (2, 3)
    assert rank_classes(disagree)[-1].class_id == 1


def test_uncertainty_round_trips_through_json_ready_dict() -> None:
    result = case_uncertainty(prediction({1: 0.9, 4: 0.5}), prediction({1: 0.9})[1:])
    again = CaseUncertainty.from_dict(result.to_dict())
    assert again == result


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(CPS4Error, match="20 classes"):
        case_uncertainty(np.zeros((19, *SHAPE), dtype=np.float32))
    with pytest.raises(CPS4Error, match="do not match"):
        case_uncertainty(prediction({1: 0.9}), np.zeros((19, 2, 2, 2), dtype=np.float32))
