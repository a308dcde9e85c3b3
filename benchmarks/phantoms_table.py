"""The method table of stage-2 runs and their paired per-seed differences against each base.

    python benchmarks/phantoms_table.py OUT [--scores scores_PHANTOMS.json]

Reads every ``OUT/<dataset>_<variant>_<method>_l<labeled>_s<seed>/result.json`` written by
``stage2_recipe.py``; with ``--scores``, the test figures come instead from that file in each
run folder (``score_run.py`` re-scoring the same network, e.g. after a change of the level
step). Prints, per labeled count: each method's Dice, level accuracy and spine Dice by seed,
and CPS4's paired differences against its base (and the bases' against mean teacher).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PAIRS = (
    ("cps4-on-mean-teacher", "mean-teacher"),
    ("cps4-on-unimatch", "unimatch"),
    ("unimatch", "mean-teacher"),
    ("mean-teacher", "supervised"),
)


def _figures(folder: Path, scores: str | None) -> dict:
    result = json.loads((folder / "result.json").read_text())
    test = json.loads((folder / "run" / scores).read_text()) if scores else result["with_level_step"]
    return {
        "method": result["method"], "labeled": result["labeled"], "seed": result["seed"],
        "dice": test["dice"], "level_accuracy": test["level_accuracy"], "spine_dice": test["spine_dice"],
        "all_right": test["cases_all_levels_right"], "cases": len(test["cases"]),
        "pseudo": result.get("pseudo_labels"), "seconds": result["train_seconds"],
    }


def table(out: Path, scores: str | None) -> str:
    runs = [_figures(f.parent, scores) for f in sorted(out.glob("*/result.json"))]
    by_key = {(r["method"], r["labeled"], r["seed"]): r for r in runs}
    lines = []
    for labeled in sorted({r["labeled"] for r in runs}):
        seeds = sorted({r["seed"] for r in runs if r["labeled"] == labeled})
        lines += [f"\n{labeled} labeled, seeds {', '.join(map(str, seeds))}\n",
                  "| method | Dice by seed | mean | level acc. | spine Dice | levels all right | pseudo-label Dice teacher / maps / fused | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for method in ("supervised", "mean-teacher", "unimatch", "cps4-on-mean-teacher", "cps4-on-unimatch"):
            rows = [by_key[(method, labeled, s)] for s in seeds if (method, labeled, s) in by_key]
            if not rows:
                continue
            mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
            pseudo = " · ".join(
                " / ".join(format(r["pseudo"][k], ".3f") for k in ("teacher", "prompt", "fused") if k in r["pseudo"])
                for r in rows if r["pseudo"]
            ) or "–"
            joined = lambda key, form: " / ".join(format(r[key], form) for r in rows)  # noqa: E731
            lines.append(
                f"| {method} | {joined('dice', '.3f')} | {mean('dice'):.3f} | {mean('level_accuracy'):.3f} | "
                f"{mean('spine_dice'):.3f} | {joined('all_right', 'd')} of {rows[0]['cases']} | {pseudo} | "
                f"{joined('seconds', '.0f')} |"
            )
        lines.append("\nPaired differences in test Dice points, seed by seed:\n")
        for method, base in PAIRS:
            diffs = [100 * (by_key[(method, labeled, s)]["dice"] - by_key[(base, labeled, s)]["dice"])
                     for s in seeds if (method, labeled, s) in by_key and (base, labeled, s) in by_key]
            if diffs:
                lines.append(f"- {method} − {base}: {', '.join(f'{d:+.1f}' for d in diffs)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--scores", help="a scores file in each run folder, written by score_run.py")
    args = parser.parse_args(argv)
    print(table(args.out, args.scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
