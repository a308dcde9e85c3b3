"""The volumes a level-step study runs on: a slice of a dataset's cases, or groups of a run's split.

Shared by ``caudal_candidates.py`` and ``level_step_variants.py`` (imported from this folder,
which Python puts first on the path when a script here runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_case_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dataset``/``--data`` and one of ``--cases FIRST:LAST`` or ``--split GROUPS``."""
    parser.add_argument("--dataset", default="vb3_l1l5_t1", help="a dataset of the real-data folder")
    parser.add_argument("--data", type=Path, help="a dataset folder elsewhere (e.g. phantoms); overrides --dataset")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cases", help="FIRST:LAST, a slice of the dataset's cases")
    where.add_argument("--split", help="groups of the run's split.json joined by +, e.g. unlabeled+validation")


def chosen_cases(args: argparse.Namespace, run: Path) -> list:
    """The cases ``args`` names (:func:`add_case_arguments`), for the stage-2 run ``run``."""
    from cps4_engine.bench import find_realdata
    from cps4_engine.data import Split, open_dataset

    if args.split:
        split = Split.load(run / "split.json")
        return [case for group in args.split.split("+") for case in getattr(split, group)]
    first, last = (int(n) for n in args.cases.split(":"))
    return list(open_dataset(args.data or find_realdata(None) / args.dataset).cases)[first:last]
