"""Evaluate predicted label volumes against ground-truth masks (``cps4 evaluate``).

Predictions and ground truth are files or folders. Folders are matched by case key: the
file name without ``.nii``/``.nii.gz``, lower-cased, without the prefixes ``mask_``,
``label_``, ``labels_``, ``seg_`` and any trailing run of the suffixes ``_labels``,
``_label``, ``_mask``, ``_seg``, ``_pred``, ``_img``, ``_image`` and the nnU-Net channel
suffix ``_0000``. So ``Case3_labels.nii.gz`` (written by ``cps4 predict`` for
``MR/Case3.nii.gz``) matches ``Mask/mask_case3.nii.gz``, ``spine_001_0000_labels.nii.gz``
matches ``labelsTr/spine_001.nii.gz`` and ``case11_img_labels.nii.gz`` matches
``case11_seg.nii.gz``. A ground-truth folder that holds no NIfTI file itself but a
``Mask/``, ``labelsTr/`` or ``labels/`` folder is read from there; where images and masks
share a folder, the file named like a mask (``mask_``/``seg_`` prefix or ``_seg``,
``_mask``, ``_label(s)`` suffix) is the ground truth.

A prediction folder holding ``*_labels.nii[.gz]`` files (``cps4 predict`` output) is read
for those only, so the confidence and probability volumes beside them are left out.
Every prediction must find its ground truth; ground-truth cases without a prediction are
not scored (and counted in :attr:`Evaluation.unmatched_gt`). A partial mask (a
``<mask>.cps4.json`` sidecar with ``"complete": false``) is scored on its painted classes
only. Metrics follow :mod:`cps4_engine.metrics`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from cps4_engine.data import read_label_status
from cps4_engine.errors import CPS4Error
from cps4_engine.io import is_nifti_path, nifti_stem, read_volume
from cps4_engine.labels import LabelMap
from cps4_engine.geometry import check_same_grid
from cps4_engine.layouts import MRSPINESEG_MASKS, NNUNET_FOLDERS, case_key, case_name
from cps4_engine.metrics import CaseMetrics, Summary, case_metrics, summarize

# Where a dataset root keeps its masks: MRSpineSeg's, nnU-Net's, and a plain "labels" folder.
GT_SUBFOLDERS = (MRSPINESEG_MASKS, *(labels for _, labels in NNUNET_FOLDERS), "labels")
_LABEL_NAME = re.compile(r"(^(mask|labels?|seg)_)|(_(labels?|mask|seg)$)", re.IGNORECASE)


@dataclass
class CasePair:
    """A prediction and its ground truth.

    Attributes:
        case_id: the ground truth's case name (:func:`case_name`).
        pred_path: predicted label volume.
        gt_path: ground-truth label volume.
        painted: classes painted in a partial mask, or None for a complete mask.
    """

    case_id: str
    pred_path: Path
    gt_path: Path
    painted: tuple[int, ...] | None = None


@dataclass
class Evaluation:
    """Per-case metrics, their summary, and the ground truth left without prediction."""

    cases: list[CaseMetrics]
    summary: Summary
    unmatched_gt: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``summary``, ``cases`` and ``unmatched_gt``."""
        return {
            "summary": self.summary.to_dict(),
            "cases": [case.to_dict() for case in self.cases],
            "unmatched_gt": list(self.unmatched_gt),
        }


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_path(p))


def _gt_files(gt: Path) -> list[Path]:
    files = _nifti_files(gt)
    if files:
        return files
    for name in GT_SUBFOLDERS:
        if (gt / name).is_dir() and _nifti_files(gt / name):
            return _nifti_files(gt / name)
    raise CPS4Error(
        f"no ground-truth NIfTI files here (nor in {', '.join(GT_SUBFOLDERS)}/)", path=gt
    )


def _looks_like_labels(path: Path) -> bool:
    return bool(_LABEL_NAME.search(nifti_stem(path).lower()))


def _keyed(files: Iterable[Path], what: str, prefer_labels: bool = False) -> dict[str, Path]:
    grouped: dict[str, list[Path]] = {}
    for path in files:
        grouped.setdefault(case_key(path), []).append(path)
    keyed: dict[str, Path] = {}
    for key, paths in grouped.items():
        if len(paths) > 1 and prefer_labels:
            paths = [path for path in paths if _looks_like_labels(path)] or paths
        if len(paths) > 1:
            raise CPS4Error(
                f"{what} files {paths[0].name} and {paths[1].name} name the same case {key!r}",
                path=paths[0].parent,
            )
        keyed[key] = paths[0]
    return keyed


def match_cases(pred: str | Path, gt: str | Path) -> tuple[list[CasePair], list[str]]:
    """Pair predictions with ground truth (rules in the module doc).

    Args:
        pred: a predicted label file or a folder of them.
        gt: a ground-truth label file or a folder (or dataset root) of them.

    Returns:
        The pairs in ground-truth file order, and the ids of ground-truth cases that have
        no prediction.

    Raises:
        CPS4Error: a path is missing, a file and a folder are mixed, a folder has no
            NIfTI files, a prediction has no ground truth, or two files name one case.
    """
    pred, gt = Path(pred), Path(gt)
    for path, what in ((pred, "prediction"), (gt, "ground truth")):
        if not path.exists():
            raise CPS4Error(f"{what} not found", path=path)
    if pred.is_file() and gt.is_file():
        return [CasePair(case_name(gt), pred, gt, read_label_status(gt))], []
    if pred.is_file() != gt.is_file():
        raise CPS4Error("give two files or two folders, not a file and a folder", path=pred if pred.is_file() else gt)
    pred_files = _nifti_files(pred)
    label_outputs = [path for path in pred_files if nifti_stem(path).lower().endswith("_labels")]
    pred_files = label_outputs or pred_files
    if not pred_files:
        raise CPS4Error("no predicted NIfTI files (.nii, .nii.gz) in this folder", path=pred)
    preds = _keyed(pred_files, "prediction")
    gts = _keyed(_gt_files(gt), "ground-truth", prefer_labels=True)
    orphans = sorted(key for key in preds if key not in gts)
    if orphans:
        shown = ", ".join(preds[key].name for key in orphans[:3]) + (", ..." if len(orphans) > 3 else "")
        raise CPS4Error(f"{len(orphans)} prediction(s) have no ground truth in {gt} ({shown})", path=pred)
    pairs = [
        CasePair(case_name(path), preds[key], path, read_label_status(path))
        for key, path in gts.items()
        if key in preds
    ]
    unmatched = [case_name(path) for key, path in gts.items() if key not in preds]
    return pairs, unmatched


def evaluate_pairs(
    pairs: Sequence[CasePair],
    class_ids: Iterable[int] | None = None,
    gt_label_map: LabelMap | None = None,
    progress: Callable[[CaseMetrics], None] | None = None,
    device: torch.device | str = "cpu",
) -> list[CaseMetrics]:
    """Score each pair in 3D in the ground truth's voxel grid.

    Args:
        pairs: from :func:`match_cases`.
        class_ids: score only these foreground ids (default: all present in each GT).
        gt_label_map: renumbers ground truth from another scheme into ours.
        progress: called with each case's result as it is done.
        device: where the metrics are computed.

    Returns:
        One :class:`CaseMetrics` per pair, in order.

    Raises:
        CPS4Error: a file cannot be read or the prediction's grid differs from the GT's.
    """
    wanted = None if class_ids is None else tuple(class_ids)
    results = []
    for pair in pairs:
        gt_volume = read_volume(pair.gt_path, kind="label")
        pred_volume = read_volume(pair.pred_path, kind="label")
        check_same_grid(gt_volume, pred_volume, what="prediction", reference_what="ground truth")
        gt_array = gt_volume.array
        if gt_label_map is not None:
            gt_array = gt_label_map.apply(gt_array, path=pair.gt_path)
        result = case_metrics(
            pred_volume.array,
            gt_array,
            gt_volume.spacing,
            class_ids=wanted,
            painted=pair.painted,
            case_id=pair.case_id,
            device=device,
        )
        if progress is not None:
            progress(result)
        results.append(result)
    return results


def evaluate(
    pred: str | Path,
    gt: str | Path,
    class_ids: Iterable[int] | None = None,
    gt_label_map: LabelMap | None = None,
    progress: Callable[[CaseMetrics], None] | None = None,
    device: torch.device | str = "cpu",
) -> Evaluation:
    """Match, score and summarise (``cps4 evaluate`` without the printing).

    Args:
        pred: predicted label file or folder.
        gt: ground-truth label file or folder.
        class_ids: score only these foreground ids.
        gt_label_map: renumbers ground truth from another scheme into ours.
        progress: called with each case's result as it is done.
        device: where the metrics are computed.

    Returns:
        :class:`Evaluation`.

    Raises:
        CPS4Error: see :func:`match_cases` and :func:`evaluate_pairs`.
    """
    pairs, unmatched = match_cases(pred, gt)
    cases = evaluate_pairs(pairs, class_ids, gt_label_map, progress, device)
    return Evaluation(cases, summarize(cases), unmatched)


def _mean_sd_text(mean: float, sd: float, scale: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def format_table(
    evaluation: Evaluation, class_names: dict[int, str] | None = None, markdown: bool = False
) -> str:
    """Per-class and overall Dice (%) and HD95 (mm) as mean ± sd over cases.

    Args:
        evaluation: the result of :func:`evaluate`.
        class_names: class id -> name for the rows (ids are shown when missing).
        markdown: a Markdown table instead of aligned plain text.

    Returns:
        The table; its last row, ``mean``, is the mean ± sd over cases of the per-case
        means over classes. Below it, the level naming: structures named right (level
        accuracy), cases with every level right, and the spine Dice (all foreground as one).
    """
    names = class_names or {}
    header = ("class", "cases", "Dice %", "HD95 mm")
    summary = evaluation.summary
    rows = [
        (
            names.get(class_id, str(class_id)),
            str(entry.n),
            _mean_sd_text(entry.mean_dice, entry.sd_dice, 100.0, 1),
            _mean_sd_text(entry.mean_hd95, entry.sd_hd95, 1.0, 2),
        )
        for class_id, entry in summary.per_class.items()
    ]
    rows.append(
        (
            "mean",
            str(summary.n_cases),
            _mean_sd_text(summary.mean_dice, summary.sd_dice, 100.0, 1),
            _mean_sd_text(summary.mean_hd95, summary.sd_hd95, 1.0, 2),
        )
    )
    levels = level_summary(summary)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(line.rstrip() for line in lines) + "\n\n" + levels
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("-" * width for width in widths)
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)), rule]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows[:-1]]
    lines += [rule, "  ".join(cell.ljust(width) for cell, width in zip(rows[-1], widths)), "", levels]
    return "\n".join(line.rstrip() for line in lines)


def level_summary(summary: Summary) -> str:
    """One line on level naming: level accuracy, cases with every level right, spine Dice."""
    if math.isnan(summary.level_accuracy):
        return "levels: nothing scored"
    return (
        f"levels named right: {100 * summary.level_accuracy:.1f} % of structures; every level right in "
        f"{summary.cases_all_levels_right} of {summary.n_cases} cases; spine Dice (all foreground as one) "
        f"{_mean_sd_text(summary.mean_spine_dice, summary.sd_spine_dice, 100.0, 1)} %"
    )
