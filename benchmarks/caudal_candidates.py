"""The lowest vertebra the level step keeps, measured against the truth: is it L5 or the sacrum?

    python benchmarks/caudal_candidates.py RUN --split unlabeled+validation --cache CACHE \\
        [--test-time-shifts 0,-0.1,0.1]

The network labels each volume once without the level step (cached as ``CACHE/<case>.npz``
so later calls skip the network); the step then runs on those labels with
``levels.sacrum_piece`` watched. For each volume it prints one JSON line: the lowest kept
vertebra's gap to the next one in median gaps of all kept vertebrae (``gap``) and of the
gaps above it (``gap_above``), its voxels against the median kept vertebra (``size``) and
against the next one (``size_next``), its extent along the superior axis against the
next one's (``extent_next``), its majority label, the share of its voxels that are the true
L5 (``truth_l5``) or background (``truth_background``, the sacrum on vb3), whether the
step took it for the sacrum, and the volume's Dice and level verdict with the step; then a
last line with the mean Dice and the volumes with every level right. ``--sacrum-size 0``
runs the step as the fourteenth session had it (no size rule), ``--sacrum-gap G`` with
another ``levels.SACRUM_PIECE_GAP``. Choose on validation, training or dev volumes, never
on the test volumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from dev_cases import add_case_arguments, chosen_cases


def main(argv: list[str] | None = None) -> int:
    import torch

    from cps4_engine import levels
    from cps4_engine.inference import load_segmenter, predict_volume
    from cps4_engine.io import read_volume
    from cps4_engine.labels import mrspineseg_scheme
    from cps4_engine.metrics import case_metrics
    from cps4_engine.options import DEFAULT_TEST_TIME_SHIFTS, parse_test_time_shifts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    add_case_arguments(parser)
    parser.add_argument("--cache", type=Path, required=True, help="folder for the labels before the level step")
    parser.add_argument("--test-time-shifts", default=None, metavar="F,F,…")
    parser.add_argument("--sacrum-size", type=float, default=None, help="levels.SACRUM_PIECE_SIZE instead of the engine's")
    parser.add_argument("--sacrum-gap", type=float, default=None, help="levels.SACRUM_PIECE_GAP instead of the engine's")
    args = parser.parse_args(argv)
    if args.sacrum_size is not None:
        levels.SACRUM_PIECE_SIZE = args.sacrum_size
    if args.sacrum_gap is not None:
        levels.SACRUM_PIECE_GAP = args.sacrum_gap
    torch.set_num_threads(1)
    shifts = DEFAULT_TEST_TIME_SHIFTS if args.test_time_shifts is None else parse_test_time_shifts(args.test_time_shifts)
    cases = chosen_cases(args, args.run)
    args.cache.mkdir(parents=True, exist_ok=True)
    scheme = mrspineseg_scheme()
    lowest_lumbar = next(info.id for info in scheme.classes if info.short == levels.LOWEST_LUMBAR_SHORT_NAME)
    engine_rule = levels.sacrum_piece
    seen: list = []

    def watched(levels_kept, lowest):
        seen.append(list(levels_kept))
        return engine_rule(levels_kept, lowest)

    levels.sacrum_piece = watched
    model = None
    dice, right = [], 0
    for case in cases:
        volume = read_volume(case.image_path, kind="image")
        truth = read_volume(case.label_path, kind="label")
        cached = args.cache / f"{case.case_id}.npz"
        if cached.exists():
            raw = np.load(cached)["labels"]
        else:
            model = model or load_segmenter(args.run, "cpu")
            raw = predict_volume(model, volume, keep_probabilities=False, level_step=False, shifts=shifts).labels
            np.savez_compressed(cached, labels=raw)
        seen.clear()
        labels, report = levels.make_levels_consistent(raw, volume.affine, scheme)
        scored = case_metrics(labels, truth.array, truth.spacing, case_id=str(case.case_id))
        line = {"case": str(case.case_id), "dice": round(scored.mean_dice, 4),
                "all_levels_right": scored.all_levels_right, "anchor": report.anchor}
        kept = seen[0] if seen else []
        if len(kept) >= 4:
            gaps = np.diff([s.height_mm for s in kept])
            sizes = [s.size for s in kept]
            extents = [levels._extent(levels._heights(s, raw.shape, volume.affine)) for s in kept[:2]]
            truth_flat = truth.array.reshape(-1)[kept[0].index]
            line.update({
                "gap": round(float(gaps[0] / np.median(gaps)), 3),
                "gap_above": round(float(gaps[0] / np.median(gaps[1:])), 3),
                "size": round(float(sizes[0] / np.median(sizes)), 3),
                "size_next": round(float(sizes[0] / sizes[1]), 3),
                "extent_next": round(float(extents[0] / extents[1]), 3) if extents[1] > 0 else None,
                "majority": kept[0].majority, "next_majority": kept[1].majority,
                "truth_l5": round(float(np.mean(truth_flat == lowest_lumbar)), 3),
                "truth_background": round(float(np.mean(truth_flat == 0)), 3),
                "taken_for_sacrum": report.anchor == "sacrum",
            })
        print(json.dumps(line), flush=True)
        dice.append(scored.mean_dice)
        right += scored.all_levels_right
    print(json.dumps({"volumes": len(cases), "dice": round(float(np.mean(dice)), 4), "cases_all_levels_right": right}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
