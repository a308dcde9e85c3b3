"""Validation Dice against stage-2 steps, from the history.json of one or more runs (a PNG).

    python benchmarks/learning_curve.py --out docs/images/stage2_learning_curve.png \\
        .bench/curve/default_supervised_l12_s0/run:"3000 steps" .bench/recipe/default_supervised_l12_s0/run:"1500 steps"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="RUN[:label]")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for spec in args.runs:
        run, _, label = spec.partition(":")
        history = json.loads((Path(run) / "history.json").read_text())
        steps = [entry["step"] for entry in history["validation"]]
        axis.plot(steps, [entry["dice"] for entry in history["validation"]], marker="o", label=label or run)
        print(label or run, [(s, round(e["dice"], 3)) for s, e in zip(steps, history["validation"])])
    axis.set_xlabel("stage-2 optimiser steps")
    axis.set_ylabel("validation Dice (2 volumes)")
    axis.set_ylim(0.4, 0.95)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
