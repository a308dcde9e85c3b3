"""Uncertainty of pseudo-labels and the review queue ranked by it.

Annotators have time for a few cases per round; the queue puts first the cases, and
within a case the classes, where the model is least sure. Three measures, each in [0, 1]:

- **entropy**: Shannon entropy of the model's class distribution at each voxel divided by
  ``log(20)`` (so 1 is a uniform guess), averaged over the voxels considered;
- **low confidence**: the share of the voxels considered whose winning probability is
  below ``confidence_threshold`` (the number of such voxels is kept too, as an area);
- **disagreement** (only when the stage-1 prompt maps are given): the mean absolute
  difference between the teacher's probability of a class and the class's prompt map,
  over the voxels where either of them says the class is there.

Voxels considered: for a class, the voxels predicted as that class (and, for
disagreement, those its prompt map claims); for a case, the *spine region*, the voxels
where the model gives at least ``foreground_floor`` to foreground (``1 - p(background)``),
so that the empty background of a scan does not dilute the figures.

**Combined score** = the mean of the available measures (entropy, low-confidence share,
and disagreement when prompt maps exist), in [0, 1]; higher means review sooner. Cases
and classes are ranked by it, ties broken by case id / class id.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from cps4_engine.errors import CPS4Error

if TYPE_CHECKING:
    from cps4_engine.active.workspace import Workspace

NUM_CLASSES = 20


@dataclass
class ClassUncertainty:
    """How unsure the model is about one class of one case.

    Attributes:
        class_id: the class (1..19).
        voxels: voxels predicted as this class.
        mean_entropy: normalised entropy averaged over those voxels, in [0, 1].
        low_confidence_voxels: those voxels whose winning probability is below threshold.
        disagreement: teacher vs prompt-map disagreement in [0, 1], or None without
            prompt maps.
        score: the combined score (module doc), in [0, 1].
    """

    class_id: int
    voxels: int
    mean_entropy: float
    low_confidence_voxels: int
    disagreement: float | None
    score: float

    @property
    def low_confidence_fraction(self) -> float:
        """Share of the class's voxels with low confidence, in [0, 1]."""
        return self.low_confidence_voxels / self.voxels if self.voxels else 0.0


@dataclass
class CaseUncertainty:
    """How unsure the model is about one case.

    Attributes:
        region_voxels: voxels of the spine region (module doc).
        mean_entropy: normalised entropy averaged over the spine region, in [0, 1].
        low_confidence_voxels: spine-region voxels whose winning probability is below
            threshold (an area, in voxels).
        disagreement: voxel-weighted mean of the classes' disagreement, or None.
        score: the combined score (module doc), in [0, 1].
        classes: per-class figures by class id.
    """

    region_voxels: int
    mean_entropy: float
    low_confidence_voxels: int
    disagreement: float | None
    score: float
    classes: dict[int, ClassUncertainty] = field(default_factory=dict)

    @property
    def low_confidence_fraction(self) -> float:
        """Share of the spine region with low confidence, in [0, 1]."""
        return self.low_confidence_voxels / self.region_voxels if self.region_voxels else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (class ids as strings)."""
        data = asdict(self)
        data["classes"] = {str(k): asdict(v) for k, v in self.classes.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CaseUncertainty":
        """Inverse of :meth:`to_dict`."""
        classes = {int(k): ClassUncertainty(**v) for k, v in data.get("classes", {}).items()}
        fields = {k: v for k, v in data.items() if k != "classes"}
        return cls(**fields, classes=classes)


def _combined_score(entropy: float, low_fraction: float, disagreement: float | None) -> float:
    terms = [entropy, low_fraction] + ([disagreement] if disagreement is not None else [])
    return float(np.mean(terms))


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Voxel-wise Shannon entropy divided by ``log(C)``.

    Args:
        probabilities: float ``(C, *spatial)``, summing to 1 over axis 0.

    Returns:
        float32 ``(*spatial)`` in [0, 1].
    """
    p = np.clip(probabilities.astype(np.float32, copy=False), 1e-12, 1.0)
    return (-(p * np.log(p)).sum(axis=0) / np.log(probabilities.shape[0])).astype(np.float32)


def case_uncertainty(
    probabilities: np.ndarray,
    prompt_probabilities: np.ndarray | None = None,
    confidence_threshold: float = 0.8,
    foreground_floor: float = 0.1,
) -> CaseUncertainty:
    """Measure the uncertainty of one case's prediction (see the module doc).

    Args:
        probabilities: float ``(20, *spatial)`` softmax of the segmenter (teacher),
            background at channel 0.
        prompt_probabilities: float ``(19, *spatial)`` stage-1 class maps (class ``c`` at
            channel ``c - 1``), or None.
        confidence_threshold: a voxel whose winning probability is below it has low
            confidence.
        foreground_floor: minimum foreground probability of a spine-region voxel.

    Returns:
        A :class:`CaseUncertainty` with per-class figures for every class predicted
        somewhere or, with prompt maps, claimed by its prompt map.

    Raises:
        CPS4Error: arrays of the wrong number of classes or of different shapes.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim < 2 or probabilities.shape[0] != NUM_CLASSES:
        raise CPS4Error(
            f"probabilities must have {NUM_CLASSES} classes on axis 0, got {probabilities.shape}"
        )
    if prompt_probabilities is not None:
        prompt_probabilities = np.asarray(prompt_probabilities, dtype=np.float32)
        if prompt_probabilities.shape != (NUM_CLASSES - 1, *probabilities.shape[1:]):
            raise CPS4Error(
                f"prompt maps of shape {prompt_probabilities.shape} do not match "
                f"probabilities of shape {probabilities.shape}"
            )
    entropy = normalised_entropy(probabilities)
    predicted = probabilities.argmax(axis=0)
    low_confidence = probabilities.max(axis=0) < confidence_threshold
    region = (1.0 - probabilities[0]) >= foreground_floor

    classes: dict[int, ClassUncertainty] = {}
    weighted_disagreement = 0.0
    disagreement_voxels = 0
    for class_id in range(1, NUM_CLASSES):
        mask = predicted == class_id
        voxels = int(mask.sum())
        disagreement = None
        if prompt_probabilities is not None:
            prompt_map = prompt_probabilities[class_id - 1]
            claimed = mask | (prompt_map > 0.5)
            claimed_voxels = int(claimed.sum())
            if claimed_voxels:
                difference = np.abs(probabilities[class_id][claimed] - prompt_map[claimed])
                disagreement = float(difference.mean())
                weighted_disagreement += disagreement * claimed_voxels
                disagreement_voxels += claimed_voxels
            elif not voxels:
                continue
        elif not voxels:
            continue
        class_entropy = float(entropy[mask].mean()) if voxels else 0.0
        class_low = int((low_confidence & mask).sum())
        classes[class_id] = ClassUncertainty(
            class_id=class_id,
            voxels=voxels,
            mean_entropy=class_entropy,
            low_confidence_voxels=class_low,
            disagreement=disagreement,
            score=_combined_score(class_entropy, class_low / voxels if voxels else 0.0, disagreement),
        )

    region_voxels = int(region.sum())
    mean_entropy = float(entropy[region].mean()) if region_voxels else 0.0
    low_voxels = int((low_confidence & region).sum())
    case_disagreement = None
    if prompt_probabilities is not None:
        case_disagreement = weighted_disagreement / disagreement_voxels if disagreement_voxels else 0.0
    low_fraction = low_voxels / region_voxels if region_voxels else 0.0
    return CaseUncertainty(
        region_voxels=region_voxels,
        mean_entropy=mean_entropy,
        low_confidence_voxels=low_voxels,
        disagreement=case_disagreement,
        score=_combined_score(mean_entropy, low_fraction, case_disagreement),
        classes=classes,
    )


def rank_cases(uncertainties: Mapping[str, CaseUncertainty]) -> list[tuple[str, CaseUncertainty]]:
    """Cases from the most to the least uncertain (score, then case id).

    Args:
        uncertainties: case id → its uncertainty.

    Returns:
        ``(case_id, uncertainty)`` pairs, most uncertain first.
    """
    return sorted(uncertainties.items(), key=lambda item: (-item[1].score, item[0]))


def rank_classes(uncertainty: CaseUncertainty) -> list[ClassUncertainty]:
    """The classes of one case from the most to the least uncertain (score, then id)."""
    return sorted(uncertainty.classes.values(), key=lambda c: (-c.score, c.class_id))


@dataclass
class QueueEntry:
    """One case of the review queue.

    Attributes:
        case_id: the case.
        state: its review state (``Workspace.state``).
        uncertainty: the stored uncertainty of its latest pseudo-label.
        classes: its classes still to review (status ``machine`` or ``rejected``), most
            uncertain first, each with its status.
    """

    case_id: str
    state: str
    uncertainty: CaseUncertainty
    classes: list[tuple[ClassUncertainty, str]]


def review_queue(workspace: "Workspace") -> list[QueueEntry]:
    """The workspace's cases still to review, most uncertain first.

    A case enters the queue when it is a training case, its mask is not complete and a
    round stored the uncertainty of its pseudo-label (:meth:`Workspace.add_prediction`).
    Within a case only classes nobody accepted or corrected are listed.
    """
    entries = {}
    for case_id in workspace.unreviewed():
        uncertainty = workspace.uncertainty(case_id)
        if uncertainty is not None:
            entries[case_id] = uncertainty
    queue = []
    for case_id, uncertainty in rank_cases(entries):
        statuses = workspace.class_statuses(case_id)
        pending = [
            (figures, statuses[figures.class_id].status if figures.class_id in statuses else "machine")
            for figures in rank_classes(uncertainty)
            if figures.class_id not in statuses or not statuses[figures.class_id].is_human
        ]
        queue.append(QueueEntry(case_id, workspace.state(case_id), uncertainty, pending))
    return queue
