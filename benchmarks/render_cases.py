"""Render the worst test volumes of a stage-2 run: image, truth, prediction without and with the level step.

    python benchmarks/render_cases.py RUN --dataset vb3_l1l5_t1 --train-cases 14 --worst 2 --out DIR
    python benchmarks/render_cases.py RUN --train-cases 0 --worst 0 --cases 02,05 --test-time-shifts 0,-0.1,0.1 --out DIR

Writes DIR/<case>.png (the sagittal slice with the most ground truth; ``--cases`` adds named
cases) and prints each case's
Dice and level naming, so a missed target is read off the failure cases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    from cps4_engine.bench import find_realdata
    from cps4_engine.data import open_dataset
    from cps4_engine.inference import load_segmenter, predict_volume
    from cps4_engine.io import read_volume
    from cps4_engine.labels import mrspineseg_scheme
    from cps4_engine.metrics import case_metrics
    from cps4_engine.options import parse_test_time_shifts
    from cps4_engine.report import save_overlay

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--dataset", default="vb3_l1l5_t1", help="a dataset of the real-data folder")
    parser.add_argument("--data", type=Path, help="a dataset folder elsewhere (e.g. phantoms); overrides --dataset")
    parser.add_argument("--train-cases", type=int, default=14)
    parser.add_argument("--worst", type=int, default=2)
    parser.add_argument("--cases", default="", help="comma-separated case ids rendered besides the worst ones")
    parser.add_argument("--test-time-shifts", default="0", metavar="F,F,…",
                        help="fractions of the slice height (cps4 predict --test-time-shifts)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    shifts = parse_test_time_shifts(args.test_time_shifts)
    torch.set_num_threads(1)
    model = load_segmenter(args.run, "cpu")
    scored = []
    folder = args.data or find_realdata(None) / args.dataset
    extra = {name for name in args.cases.split(",") if name}
    for case in list(open_dataset(folder).cases)[args.train_cases :]:
        image = read_volume(case.image_path)
        truth = read_volume(case.label_path, kind="label")
        raw = predict_volume(model, image, keep_probabilities=False, level_step=False, shifts=shifts).labels
        stepped = predict_volume(model, image, keep_probabilities=False, shifts=shifts).labels
        metrics = case_metrics(stepped, truth.array, truth.spacing, case_id=str(case.case_id))
        scored.append((metrics.mean_dice, case, image, truth, raw, stepped, metrics))
    scheme = mrspineseg_scheme()
    ranked = sorted(scored, key=lambda item: item[0])
    chosen = ranked[: args.worst] + [item for item in ranked[args.worst :] if str(item[1].case_id) in extra]
    for dice, case, image, truth, raw, stepped, metrics in chosen:
        path = save_overlay(
            args.out / f"{case.case_id}.png", image.array, image.affine,
            {"ground truth": truth.array, "prediction": raw, "after the level step": stepped}, scheme,
            title=f"case {case.case_id}: Dice {dice:.3f}, spine Dice {metrics.spine_dice:.3f}",
        )
        per_class = ", ".join(f"{scheme.by_id(c).short} {d:.2f}" for c, d in metrics.dice.items())
        print(f"{case.case_id}: Dice {dice:.3f} ({per_class}); levels {metrics.level_named}; {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
