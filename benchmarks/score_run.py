"""Score a stage-2 run on the test volumes of a dataset: Dice, level accuracy, spine Dice.

    python benchmarks/score_run.py RUN --dataset vb3_l1l5_t1 --train-cases 14 [--no-level-step]
    python benchmarks/score_run.py RUN --data PHANTOMS_DEV --train-cases 0   # cps4 synth ... --seed 2027
    python benchmarks/score_run.py RUN --split unlabeled+validation   # dev volumes, to choose on
    python benchmarks/score_run.py RUN --split unlabeled+validation --test-time-shifts 0,-0.1,0.1   # test-time shifts

Re-scores a trained network with the current prediction (e.g. after a change of the 3D
level step). Prints one JSON line; the per-case results go to
RUN/test_scores[_no_level_step].json, RUN/scores_<data folder>[_no_level_step].json
with ``--data``, or RUN/scores_<groups>[_no_level_step].json with ``--split`` (volumes of the
run's own split.json, e.g. its unlabeled and validation volumes, which a supervised run
never trained on). Test-time shifts other than the default add ``_shifts_<F_F…>`` to the
name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    from cps4_engine.bench import _score_test_volumes, find_realdata
    from cps4_engine.data import Split, open_dataset
    from cps4_engine.options import DEFAULT_TEST_TIME_SHIFTS, parse_test_time_shifts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--dataset", default="vb3_l1l5_t1")
    parser.add_argument("--data", type=Path, help="a dataset folder elsewhere (e.g. phantoms); overrides --dataset")
    parser.add_argument("--train-cases", type=int, default=14, help="cases before the test cases")
    parser.add_argument("--split", help="groups of the run's split.json joined by +, instead of the test volumes")
    parser.add_argument("--no-level-step", dest="level_step", action="store_false")
    parser.add_argument("--test-time-shifts", default=None, metavar="F,F,…",
                        help="fractions of the slice height (default: the prediction default)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    shifts = DEFAULT_TEST_TIME_SHIFTS if args.test_time_shifts is None else parse_test_time_shifts(args.test_time_shifts)
    torch.set_num_threads(args.threads)
    folder = args.data or find_realdata(None) / args.dataset
    if args.split:
        split = Split.load(args.run / "split.json")
        groups = args.split.split("+")
        unknown = [g for g in groups if g not in ("labeled", "unlabeled", "validation", "test")]
        if unknown:
            parser.error(f"--split {args.split}: {', '.join(unknown)} is not a group of {args.run / 'split.json'}")
        cases = [case for group in groups for case in getattr(split, group)]
    else:
        cases = list(open_dataset(folder).cases)[args.train_cases :]
    test = [{"case_id": str(c.case_id), "image": str(c.image_path), "label": str(c.label_path)} for c in cases]
    scored = _score_test_volumes(args.run, test, "cpu", level_step=args.level_step, shifts=shifts)
    stem = f"scores_{args.data.name}" if args.data else "test_scores"
    if args.split:
        stem = f"scores_{args.split.replace('+', '_')}"
    if tuple(shifts) != DEFAULT_TEST_TIME_SHIFTS:
        stem += "_shifts_" + "_".join(f"{shift:g}" for shift in shifts)
    name = f"{stem}.json" if args.level_step else f"{stem}_no_level_step.json"
    (args.run / name).write_text(json.dumps(scored, indent=1))
    print(json.dumps({"run": str(args.run), "level_step": args.level_step, "test_time_shifts": list(shifts),
                      **{k: scored[k] for k in ("dice", "level_accuracy", "cases_all_levels_right", "spine_dice")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
