"""Variants of the 3D level step scored on one network's predictions, each predicted once.

    python benchmarks/level_step_variants.py RUN --data PHANTOMS_DEV --cases 0:20
    python benchmarks/level_step_variants.py RUN --dataset vb3_l1l5_t1 --split unlabeled+validation

The network labels each volume once without the level step; every variant then runs the
step on those labels: the tenth session's rules (a long body measured against the median
extent of the whole spine at 1.6 times, bodies the view cuts kept down to 5 % of the
median), the edge share lowered to 2 %, and the current rule (measured against its
neighbours) at several factors. Prints one JSON object: mean Dice, level accuracy and
volumes with every level right per variant, and the volumes each variant changes against
the first. Choose on validation, training or dev volumes, never on the test volumes.
These variants leave out the twelfth session's rules (``levels.caudal_remnant``,
``levels.sacrum_piece``, ``levels.join_side_pieces``), as those sessions had it.

    python benchmarks/level_step_variants.py RUN --split unlabeled+validation --sacrum-gaps 0.7,0.8,0.85

runs instead the step without them, with the remnant rule only, with both caudal rules,
the sacrum piece's gap (``levels.SACRUM_PIECE_GAP``) at each value, and the engine's step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from dev_cases import add_case_arguments, chosen_cases


def _whole_spine_median(structure, bodies, extent) -> float:
    """The tenth session's reference of ``split_long_bodies``: the median extent of every
    body of the spine (the sacrum left out), the structure itself included."""
    return float(np.median([extent[id(body)] for body in bodies]))


def _pieces_as_levels(levels_kept, pieces, shape, affine) -> list:
    """The eleventh session's handling of ``levels.join_side_pieces``: a structure the view
    cuts is a level of its own wherever it lies."""
    return sorted([*levels_kept, *pieces], key=lambda structure: structure.height_mm)


def main(argv: list[str] | None = None) -> int:
    import torch

    from cps4_engine import levels
    from cps4_engine.inference import load_segmenter, predict_volume
    from cps4_engine.io import read_volume
    from cps4_engine.labels import mrspineseg_scheme
    from cps4_engine.metrics import case_metrics, summarize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    add_case_arguments(parser)
    parser.add_argument("--factors", default="1.6,1.75,2.0", help="long-body factors of the current rule")
    parser.add_argument("--sacrum-gaps", default="",
                        help="instead: the step without this session's rules, with the remnant rule only, with both "
                             "caudal rules at each of these sacrum-piece gaps (e.g. 0.7,0.8,0.85), and as the engine has it")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_segmenter(args.run, "cpu")
    cases = chosen_cases(args, args.run)
    variants: dict[str, dict[str, object]]
    separate = {"join_side_pieces": _pieces_as_levels}
    neither = {"caudal_remnant": lambda *_: None, "sacrum_piece": lambda *_: None, **separate}
    if args.sacrum_gaps:
        variants = {"eleventh session (no caudal rules, side pieces separate)": neither,
                    "caudal remnant only": {"sacrum_piece": lambda *_: None, **separate}}
        for gap in (float(g) for g in args.sacrum_gaps.split(",")):
            variants[f"caudal remnant, sacrum piece below {gap:g} gaps"] = {"SACRUM_PIECE_GAP": gap, **separate}
        variants["the engine's step (side pieces joined too)"] = {}
    else:
        variants = {
            "tenth session (whole-spine median x1.6, edge 5 %)": {
                **neither, "_reference_extent": _whole_spine_median, "LONG_BODY_EXTENT": 1.6, "EDGE_MIN_FRACTION": 0.05},
            "tenth session, edge 2 %": {
                **neither, "_reference_extent": _whole_spine_median, "LONG_BODY_EXTENT": 1.6, "EDGE_MIN_FRACTION": 0.02},
        }
        for factor in (float(f) for f in args.factors.split(",")):
            variants[f"neighbours x{factor:g}, edge 2 %"] = {**neither, "LONG_BODY_EXTENT": factor, "EDGE_MIN_FRACTION": 0.02}
    defaults = {name: getattr(levels, name) for variant in variants.values() for name in variant}
    scores: dict[str, list] = {name: [] for name in variants}
    scheme = mrspineseg_scheme()
    for case in cases:
        volume = read_volume(case.image_path, kind="image")
        truth = read_volume(case.label_path, kind="label")
        raw = predict_volume(model, volume, keep_probabilities=False, level_step=False).labels
        for name, overrides in variants.items():
            for attribute, value in {**defaults, **overrides}.items():
                setattr(levels, attribute, value)
            labels, _ = levels.make_levels_consistent(raw, volume.affine, scheme)
            scores[name].append(case_metrics(labels, truth.array, truth.spacing, case_id=str(case.case_id)))
    first_name = next(iter(variants))
    report = {"run": str(args.run), "volumes": len(cases), "variants": {}}
    for name, scored in scores.items():
        summary = summarize(scored)
        changed = [f"{s.case_id}:{s.mean_dice - b.mean_dice:+.3f}"
                   for s, b in zip(scored, scores[first_name]) if abs(s.mean_dice - b.mean_dice) > 1e-9]
        report["variants"][name] = {"dice": round(summary.mean_dice, 4),
                                    "level_accuracy": round(summary.level_accuracy, 4),
                                    "cases_all_levels_right": summary.cases_all_levels_right,
                                    "changed": changed}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
