"""Stage-2 recipe ablation and learning curve on the dev vb3 protocol (CPU).

One run per ``--variant``: a supervised (or mean-teacher) stage-2 run on the first 14 vb3
volumes (validation carved from them), scored on the last 6 with Dice, level accuracy and
spine Dice, with and without the 3D level step. Variants switch one recipe choice off
against the default recipe (``cps4_engine.presets.Recipe``), so each choice is kept or
dropped by its own paired difference.

Example (one job per core, one thread each)::

    python benchmarks/stage2_recipe.py --out .bench/recipe --variant default --seed 0 \\
        --labeled 13 --method supervised --threads 1

Each run writes ``OUT/<variant>_<method>_l<labeled>_s<seed>/result.json``; ``--table``
prints the Markdown table of every result under ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np



def _variants() -> dict[str, dict]:
    return {
        "default": {},
        "no-fov-shift": {"fov_shift": 0.05},
        "no-context": {"context_slices": 0},
        "squeezed": {"keep_aspect": False, "slice_size": (128, 64)},
        "no-schedule": {"schedule": "constant"},
        "res128": {"slice_size": (128, 128)},
        "strong-labeled": {"labeled_strong": True},
        "weak-labeled": {"labeled_strong": False},
        "cpu-bf16": {"cpu_bf16": True},
        "zoom25": {"weak_zoom": 0.25},
        "rot20": {"weak_rotation": 20.0},
    }


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from cps4_engine.bench import _score_test_volumes, find_realdata
    from cps4_engine.data import open_dataset
    from cps4_engine.stage2 import Stage2Config, train

    torch.set_num_threads(args.threads)
    if args.data is None:
        realdata = find_realdata(None)
        if realdata is None:
            raise SystemExit("stage2_recipe.py: no real data (../shared/realdata or $CPS4_REALDATA)")
        args.data = realdata / args.dataset
    dataset = open_dataset(args.data)
    cases = list(dataset.cases)
    test = [
        {"case_id": str(c.case_id), "image": str(c.image_path), "label": str(c.label_path)}
        for c in cases[args.train_cases :]
    ]
    method = args.method if args.base is None else f"{args.method}-on-{args.base}"
    if args.prompt_weight is not None:
        method += f"-w{args.prompt_weight:g}"
    name = f"{args.dataset}_{args.variant}_{method}_l{args.labeled}_s{args.seed}"
    if args.dataset == "vb3_l1l5_t1":
        name = name.removeprefix("vb3_l1l5_t1_")
    out = Path(args.out) / name
    overrides = _variants()[args.variant]
    began = time.perf_counter()
    train(Stage2Config(
        data=args.data, out=out / "run", labeled=args.labeled, method=args.method,
        preset=args.preset, max_steps=args.max_steps, train_cases=args.train_cases, seed=args.seed,
        device="cpu", validation=args.validation, validation_every=args.validation_every,
        vlm=args.vlm, base=args.base, **overrides,
        **({} if args.prompt_weight is None else {"prompt_weight": args.prompt_weight}),
    ))
    seconds = time.perf_counter() - began
    result = {"variant": args.variant, "method": method, "labeled": args.labeled, "seed": args.seed,
              "dataset": args.dataset, "train_seconds": seconds, "threads": args.threads}
    for levels in (True, False):
        scored = _score_test_volumes(out / "run", test, "cpu", level_step=levels)
        key = "with_level_step" if levels else "without_level_step"
        result[key] = {k: scored[k] for k in ("dice", "level_accuracy", "cases_all_levels_right", "spine_dice")}
        result[key]["cases"] = scored["cases"]
    if args.method != "supervised":
        from cps4_engine.bench import pseudo_label_quality

        result["pseudo_labels"] = pseudo_label_quality(out / "run", args.vlm, "cpu")
    history = json.loads((out / "run" / "history.json").read_text())
    result["curve"] = [(e["step"], e.get("dice"), e.get("teacher_dice")) for e in history["validation"]]
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def rescore(path: Path, threads: int) -> None:
    """Score a finished run's test volumes again, with and without the level step."""
    import torch

    from cps4_engine.bench import _score_test_volumes, find_realdata
    from cps4_engine.data import open_dataset

    torch.set_num_threads(threads)
    result = json.loads(path.read_text())
    run = path.parent / "run"
    settings = json.loads((run / "config.json").read_text())["settings"]
    cases = list(open_dataset(settings["data"]).cases)[settings["train_cases"] :]
    test = [{"case_id": str(c.case_id), "image": str(c.image_path), "label": str(c.label_path)} for c in cases]
    for levels, key in ((True, "with_level_step"), (False, "without_level_step")):
        scored = _score_test_volumes(run, test, "cpu", level_step=levels)
        result[key] = {k: scored[k] for k in ("dice", "level_accuracy", "cases_all_levels_right", "spine_dice")}
        result[key]["cases"] = scored["cases"]
    path.write_text(json.dumps(result, indent=1))
    print(path.parent.name, {k: round(v, 3) for k, v in result["with_level_step"].items() if k != "cases"})


def table(out: Path) -> str:
    rows: dict[tuple, list] = {}
    for path in sorted(out.glob("*/result.json")):
        r = json.loads(path.read_text())
        rows.setdefault((r["dataset"], r["variant"], r["method"], r["labeled"]), []).append(r)
    lines = ["| dataset | variant | method | labeled | seeds | Dice | level acc. | all levels right | spine Dice | Dice w/o level step | level acc. w/o | pseudo-label Dice teacher / maps / fused | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (dataset, variant, method, labeled), results in rows.items():
        def stat(key: str, sub: str) -> str:
            values = [r[sub][key] for r in results]
            return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"
        right = "+".join(str(r["with_level_step"]["cases_all_levels_right"]) for r in results)
        seconds = np.mean([r["train_seconds"] for r in results])
        pseudo = " / ".join(
            f"{np.mean([r['pseudo_labels'][source] for r in results]):.3f}"
            for source in ("teacher", "prompt", "fused") if all(source in r.get("pseudo_labels", {}) for r in results)
        )
        lines.append(
            f"| {dataset} | {variant} | {method} | {labeled} | {','.join(str(r['seed']) for r in results)} "
            f"| {stat('dice', 'with_level_step')} | {stat('level_accuracy', 'with_level_step')} | {right} "
            f"| {stat('spine_dice', 'with_level_step')} | {stat('dice', 'without_level_step')} "
            f"| {stat('level_accuracy', 'without_level_step')} | {pseudo or '–'} | {seconds:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", choices=sorted(_variants()), default="default")
    parser.add_argument("--method", default="supervised")
    parser.add_argument("--labeled", type=int, default=13)
    parser.add_argument("--base", default=None, help="semi-supervised base of --method cps4 (mean-teacher, unimatch)")
    parser.add_argument("--vlm", type=Path, default=None, help="stage-1 run folder (--method cps4)")
    parser.add_argument("--prompt-weight", type=float, default=None,
                        help="cap of the class maps' weight in fused pseudo-labels (default: the engine's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="vb3_l1l5_t1", help="a set of the real data, or a name for --data")
    parser.add_argument("--data", type=Path, default=None, help="a dataset folder instead of the real data")
    parser.add_argument("--train-cases", type=int, default=14)
    parser.add_argument("--validation", type=int, default=1)
    parser.add_argument("--validation-every", type=int, default=None)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print the table of the results under --out")
    parser.add_argument("--rescore", action="store_true",
                        help="score every finished run under --out again with the current code (e.g. after "
                             "a change of the level step) and rewrite its result.json")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    if args.rescore:
        for path in sorted(args.out.glob("*/result.json")):
            rescore(path, args.threads)
        return 0
    result = run_one(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve",)} | {
        "with_level_step": {k: v for k, v in result["with_level_step"].items() if k != "cases"},
        "without_level_step": {k: v for k, v in result["without_level_step"].items() if k != "cases"},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
