"""Per-case, per-class Dice and HD95 through MONAI, and their summary over cases.

The protocol (``../shared/BENCHMARK_PROTOCOL.md``): Dice per class in 3D per case, in the
image's own voxel grid, averaged over the foreground classes present in the ground truth;
then mean ± sd over cases. HD95 in millimetres the same way, using the voxel spacing.

Rules for the corner cases:

- A class present in the ground truth but absent from the prediction scores Dice 0 and
  HD95 = the diagonal of the volume in mm (the largest distance possible inside it), so a
  missed class is penalised rather than dropped from the mean. Such classes are listed
  in :attr:`CaseMetrics.missed`.
- A class absent from the ground truth is not scored (Dice and HD95 NaN, left out of the
  means), even when the prediction contains it; such predicted classes are listed in
  :attr:`CaseMetrics.extra`.
- With a partial ground truth (``painted`` given), only the painted classes are scored:
  elsewhere the truth is unknown.

Level naming is scored beside Dice, because a spine found but named one level off scores
a low Dice for a reason Dice alone does not show:

- *level accuracy*: a scored ground-truth structure (class) is named right when, among
  its voxels that the prediction calls foreground, the most frequent predicted class is
  its own; a structure with no voxel predicted foreground is not named right. The share
  of structures named right is reported per case and, pooled over every structure of
  every case, in the summary, with the number of cases whose every structure is named
  right.
- *spine Dice*: Dice of all foreground classes taken as one (finding the spine, whatever
  the names). NaN with a partial ground truth, whose background is unknown.

A perfect mask shifted by one level scores spine Dice 1 and level accuracy 0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


@dataclass
class CaseMetrics:
    """Dice and HD95 of one case.

    Attributes:
        case_id: the case's name.
        classes: the class ids scored (foreground ids present in the ground truth, limited
            to ``class_ids`` and ``painted`` when given), ascending.
        dice: class id → Dice in [0, 1].
        hd95: class id → 95th percentile Hausdorff distance in mm.
        mean_dice: mean Dice over ``classes`` (NaN when none).
        mean_hd95: mean HD95 over ``classes`` in mm (NaN when none).
        missed: scored classes the prediction does not contain at all.
        extra: foreground classes in the prediction that the ground truth lacks.
        level_named: class id → whether the structure carries its own label by majority
            among its voxels predicted as foreground (see the module doc).
        spine_dice: Dice of all foreground as one class (NaN for a partial ground truth
            or an empty one).
    """

    case_id: str
    classes: tuple[int, ...]
    dice: dict[int, float]
    hd95: dict[int, float]
    mean_dice: float
    mean_hd95: float
    missed: tuple[int, ...] = ()
    extra: tuple[int, ...] = ()
    level_named: dict[int, bool] = field(default_factory=dict)
    spine_dice: float = math.nan

    @property
    def level_accuracy(self) -> float:
        """Share of scored structures named right, in [0, 1] (NaN when none is scored)."""
        if not self.level_named:
            return math.nan
        return sum(self.level_named.values()) / len(self.level_named)

    @property
    def all_levels_right(self) -> bool:
        """Every scored structure is named right (False when none is scored)."""
        return bool(self.level_named) and all(self.level_named.values())

    def to_dict(self) -> dict:
        """A JSON-ready dict (class ids as strings, NaN as None)."""
        data = asdict(self)
        data["dice"] = {str(k): _json_float(v) for k, v in self.dice.items()}
        data["hd95"] = {str(k): _json_float(v) for k, v in self.hd95.items()}
        data["mean_dice"] = _json_float(self.mean_dice)
        data["mean_hd95"] = _json_float(self.mean_hd95)
        data["classes"] = list(self.classes)
        data["missed"] = list(self.missed)
        data["extra"] = list(self.extra)
        data["level_named"] = {str(k): bool(v) for k, v in self.level_named.items()}
        data["level_accuracy"] = _json_float(self.level_accuracy)
        data["all_levels_right"] = self.all_levels_right
        data["spine_dice"] = _json_float(self.spine_dice)
        return data


@dataclass
class ClassSummary:
    """One class over the cases that contain it: mean and sample sd, ``n`` cases."""

    n: int
    mean_dice: float
    sd_dice: float
    mean_hd95: float
    sd_hd95: float


@dataclass
class Summary:
    """Mean ± sd over cases of the per-case means, and per class.

    Attributes:
        n_cases: cases with at least one scored class.
        mean_dice, sd_dice: mean and sample sd (ddof 1; 0 for one case) of per-case mean
            Dice.
        mean_hd95, sd_hd95: the same for per-case mean HD95 in mm.
        per_class: class id → :class:`ClassSummary` over the cases scoring that class.
        level_accuracy: share of all scored structures, pooled over cases, named right.
        cases_all_levels_right: cases whose every scored structure is named right.
        mean_spine_dice, sd_spine_dice: mean and sample sd of the per-case spine Dice
            (cases with a complete ground truth).
    """

    n_cases: int
    mean_dice: float
    sd_dice: float
    mean_hd95: float
    sd_hd95: float
    per_class: dict[int, ClassSummary] = field(default_factory=dict)
    level_accuracy: float = math.nan
    cases_all_levels_right: int = 0
    mean_spine_dice: float = math.nan
    sd_spine_dice: float = math.nan

    def to_dict(self) -> dict:
        """A JSON-ready dict (class ids as strings, NaN as None)."""
        return {
            "n_cases": self.n_cases,
            "mean_dice": _json_float(self.mean_dice),
            "sd_dice": _json_float(self.sd_dice),
            "mean_hd95": _json_float(self.mean_hd95),
            "sd_hd95": _json_float(self.sd_hd95),
            "level_accuracy": _json_float(self.level_accuracy),
            "cases_all_levels_right": self.cases_all_levels_right,
            "mean_spine_dice": _json_float(self.mean_spine_dice),
            "sd_spine_dice": _json_float(self.sd_spine_dice),
            "per_class": {
                str(class_id): {key: _json_float(value) for key, value in asdict(entry).items()}
                for class_id, entry in self.per_class.items()
            },
        }


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _as_numpy_labels(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise ValueError(f"{name} must hold integer class ids")
        array = rounded
    return np.ascontiguousarray(array, dtype=np.int64)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return float(np.mean(finite)), sd


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    class_ids: Iterable[int] | None = None,
    painted: Iterable[int] | None = None,
    case_id: str = "",
    device: torch.device | str = "cpu",
) -> CaseMetrics:
    """Per-class Dice and HD95 of one predicted label volume against its ground truth.

    Args:
        pred: integer class ids, ``(*shape)`` (3D per the protocol; any dimension works).
        gt: integer class ids, the same shape.
        spacing: voxel size in mm along each axis of ``shape``.
        class_ids: restrict scoring to these foreground ids (default: all present in gt).
        painted: for a partial ground truth, the classes the annotator painted; only they
            are scored.
        case_id: a name carried into the result.
        device: where the one-hot masks and Dice are computed (HD95's distance
            transforms run where MONAI runs them).

    Returns:
        :class:`CaseMetrics`; see the module doc for missed and unknown classes.

    Raises:
        ValueError: shapes differ, spacing has the wrong length or is not positive, or
            the arrays are not integer-valued.
    """
    pred_array = _as_numpy_labels(pred, "pred")
    gt_array = _as_numpy_labels(gt, "gt")
    if pred_array.shape != gt_array.shape:
        raise ValueError(f"pred shape {pred_array.shape} differs from gt shape {gt_array.shape}")
    spacing_mm = [float(s) for s in spacing]
    if len(spacing_mm) != gt_array.ndim or min(spacing_mm) <= 0:
        raise ValueError(f"spacing {spacing_mm} must give one positive size per axis of {gt_array.shape}")

    gt_present = {int(c) for c in np.unique(gt_array) if c > 0}
    pred_present = {int(c) for c in np.unique(pred_array) if c > 0}
    scored = gt_present
    if class_ids is not None:
        scored = scored & {int(c) for c in class_ids}
    if painted is not None:
        scored = scored & {int(c) for c in painted}
    classes = tuple(sorted(scored))
    extra = tuple(sorted(pred_present - gt_present))
    spine = _spine_dice(pred_array, gt_array) if painted is None else math.nan
    if not classes:
        return CaseMetrics(case_id, (), {}, {}, math.nan, math.nan, (), extra, {}, spine)

    class_index = torch.as_tensor(classes, device=device).view(1, -1, *([1] * gt_array.ndim))
    pred_onehot = torch.from_numpy(pred_array).to(device)[None, None] == class_index
    gt_onehot = torch.from_numpy(gt_array).to(device)[None, None] == class_index
    dice = compute_dice(pred_onehot, gt_onehot, include_background=True)[0]
    with warnings.catch_warnings():
        # MONAI warns about empty predictions and a deprecated argument it passes itself;
        # empty predictions are handled below with the documented fallback.
        warnings.filterwarnings("ignore", message=".*is all 0.*")
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        hd95 = compute_hausdorff_distance(
            pred_onehot, gt_onehot, include_background=True, percentile=95, spacing=spacing_mm
        )[0]
    diagonal_mm = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(gt_array.shape, spacing_mm))))
    missed = tuple(c for c in classes if c not in pred_present)
    dice, hd95 = dice.cpu(), hd95.cpu()
    dice_by_class = {c: float(dice[i]) for i, c in enumerate(classes)}
    hd95_by_class = {
        c: diagonal_mm if c in missed else float(hd95[i]) for i, c in enumerate(classes)
    }
    return CaseMetrics(
        case_id=case_id,
        classes=classes,
        dice=dice_by_class,
        hd95=hd95_by_class,
        mean_dice=float(np.mean(list(dice_by_class.values()))),
        mean_hd95=float(np.mean(list(hd95_by_class.values()))),
        missed=missed,
        extra=extra,
        level_named=level_naming(pred_array, gt_array, classes),
        spine_dice=spine,
    )


def level_naming(
    pred: np.ndarray, gt: np.ndarray, class_ids: Iterable[int]
) -> dict[int, bool]:
    """Whether each ground-truth structure carries its own label by majority.

    Args:
        pred: integer class ids, any shape.
        gt: integer class ids, the same shape.
        class_ids: the ground-truth classes to judge.

    Returns:
        class id → True when, among the class's ground-truth voxels that ``pred`` calls
        foreground, the most frequent predicted class is that class (ties go against
        it); False when none of its voxels is predicted foreground.
    """
    named: dict[int, bool] = {}
    for class_id in class_ids:
        predicted = pred[(gt == class_id) & (pred > 0)]
        if predicted.size == 0:
            named[int(class_id)] = False
            continue
        counts = np.bincount(predicted)
        own = counts[class_id] if class_id < counts.size else 0
        others = np.delete(counts, class_id) if class_id < counts.size else counts
        named[int(class_id)] = bool(own > others.max(initial=0))
    return named


def _spine_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """MONAI Dice of all foreground as one class; NaN when the ground truth has none."""
    if not (gt > 0).any():
        return math.nan
    pred_fg = torch.from_numpy(pred > 0)[None, None]
    gt_fg = torch.from_numpy(gt > 0)[None, None]
    return float(compute_dice(pred_fg, gt_fg, include_background=True)[0, 0])


def summarize(cases: Sequence[CaseMetrics]) -> Summary:
    """Mean ± sd over cases, overall and per class.

    Args:
        cases: per-case results from :func:`case_metrics`.

    Returns:
        :class:`Summary`; cases with no scored class are left out (NaN means when none
        remain).
    """
    scored_cases = [case for case in cases if case.classes]
    mean_dice, sd_dice = _mean_sd([case.mean_dice for case in scored_cases])
    mean_hd95, sd_hd95 = _mean_sd([case.mean_hd95 for case in scored_cases])
    per_class: dict[int, ClassSummary] = {}
    for class_id in sorted({c for case in scored_cases for c in case.classes}):
        dices = [case.dice[class_id] for case in scored_cases if class_id in case.dice]
        distances = [case.hd95[class_id] for case in scored_cases if class_id in case.hd95]
        class_mean_dice, class_sd_dice = _mean_sd(dices)
        class_mean_hd95, class_sd_hd95 = _mean_sd(distances)
        per_class[class_id] = ClassSummary(
            len(dices), class_mean_dice, class_sd_dice, class_mean_hd95, class_sd_hd95
        )
    named = [right for case in scored_cases for right in case.level_named.values()]
    mean_spine, sd_spine = _mean_sd([case.spine_dice for case in scored_cases])
    return Summary(
        len(scored_cases), mean_dice, sd_dice, mean_hd95, sd_hd95, per_class,
        level_accuracy=sum(named) / len(named) if named else math.nan,
        cases_all_levels_right=sum(case.all_levels_right for case in scored_cases),
        mean_spine_dice=mean_spine, sd_spine_dice=sd_spine,
    )
