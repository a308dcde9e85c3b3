"""Simulated annotator: does reviewing the most uncertain cases first pay off?

The hidden ground truth stands in for the annotator. For each dataset and seed:

1. a workspace holds the protocol's training volumes (the seed's labeled volumes imported
   as human labels, the rest unlabeled) and its test volumes as held-out cases;
2. round 0 trains stage 2 on the labeled volumes, pseudo-labels the others and scores
   the test volumes (Dice, MONAI);
3. then, each round, the annotator "corrects" ``k`` pseudo-labelled volumes — replaces
   them with the truth, complete — chosen either in **uncertainty** order (the review
   queue, most uncertain first) or in **random** order (seeded), and the next round
   fine-tunes from the previous round's weights.

Both orders start from the same round-0 workspace. Output in ``--out``: ``results.json``
(every point), ``active_loop.md`` (mean ± sd Dice over seeds by number of corrected
volumes), ``active_loop.png`` (Dice against corrected volumes, one panel per dataset).

Datasets (BENCHMARK_PROTOCOL.md): ``synthetic`` — ``cps4 synth DATA --cases 60 --seed
2026``, first 40 training and last 20 test volumes, 2 labeled; ``vb3`` —
``../shared/realdata/vb3_l1l5_t1``, first 14 training and last 6 test, 1 labeled.

Example (the full run, on a GPU machine)::

    python benchmarks/active_loop.py --out results/active_loop --device cuda \
        --preset cpu --max-steps 600 --rounds 4 --k 2 --seeds 0 1 2 --jobs 6

``--smoke`` shrinks everything (6 synthetic cases, tiny preset, 2 steps, 1 round) to
check the pipeline in a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from cps4_engine.options import METHODS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ORDERS = ("uncertainty", "random")
PROTOCOL = {
    "synthetic": {"train": 40, "labeled": 2},
    "vb3": {"train": 14, "labeled": 1},
}
SMOKE_PROTOCOL = {"synthetic": {"train": 4, "labeled": 1}, "vb3": {"train": 4, "labeled": 1}}


@dataclass
class Job:
    """One dataset and seed: round 0 and the loop in both orders."""

    dataset: str
    data: str
    train: int
    labeled: int
    seed: int
    rounds: int
    k: int
    preset: str
    max_steps: int | None
    method: str
    vlm: str | None
    device: str
    work: str
    case_limit: int | None


def _annotate(workspace: Any, case_ids: list[str], truth: dict[str, Path]) -> None:
    """The simulated annotator: the case's true mask, every class corrected, complete."""
    from cps4_engine.io import read_volume

    for case_id in case_ids:
        labels = read_volume(truth[case_id], kind="label").array
        classes = [int(c) for c in np.unique(labels) if c != 0]
        workspace.save_human_labels(
            case_id, labels, statuses={c: "corrected" for c in classes}, complete=True
        )


def _pick(workspace: Any, order: str, k: int, rng: random.Random) -> list[str]:
    from cps4_engine.active.queue import review_queue

    if order == "uncertainty":
        return [entry.case_id for entry in review_queue(workspace)[:k]]
    pending = sorted(workspace.unreviewed())
    return rng.sample(pending, min(k, len(pending)))


def run_job(job: Job) -> list[dict[str, Any]]:
    """Run one dataset/seed; returns one record per (order, round)."""
    os.environ.setdefault("CPS4_TORCH_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["CPS4_TORCH_THREADS"]))
    from cps4_engine.active.rounds import RoundConfig, retrain_round
    from cps4_engine.active.workspace import Workspace
    from cps4_engine.data import open_dataset, split_cases
    from cps4_engine.labels import mrspineseg_scheme

    cases = list(open_dataset(job.data).cases)
    if job.case_limit is not None:
        cases = cases[: job.case_limit]
    train, test = cases[: job.train], cases[job.train :]
    split = split_cases(train, labeled=job.labeled, seed=job.seed, validation=0)
    labeled_ids = [case.case_id for case in split.labeled]
    truth = {case.case_id: Path(case.label_path) for case in cases}
    config = RoundConfig(
        method=job.method, vlm=job.vlm, preset=job.preset, max_steps=job.max_steps,
        device=job.device, seed=job.seed,
    )
    base = Path(job.work) / f"{job.dataset}_seed{job.seed}"
    if base.exists():
        shutil.rmtree(base)
    start = Workspace.create(
        base / "round0", train + test, mrspineseg_scheme(), source=job.data,
        heldout=[case.case_id for case in test], import_labels=labeled_ids,
    )
    first = retrain_round(start, config)
    if first is None:
        raise RuntimeError(f"{job.dataset} seed {job.seed}: round 0 was cancelled")
    results = []
    for order in ORDERS:
        folder = base / order
        shutil.copytree(base / "round0", folder, symlinks=True)
        workspace = Workspace.open(folder)
        rng = random.Random(job.seed)
        corrected = 0
        results.append(_point(job, order, 0, corrected, first["metrics"]))
        for round_number in range(1, job.rounds + 1):
            chosen = _pick(workspace, order, job.k, rng)
            if not chosen:
                break
            _annotate(workspace, chosen, truth)
            corrected += len(chosen)
            record = retrain_round(workspace, config)
            results.append(_point(job, order, round_number, corrected, record["metrics"], chosen))
    return results


def _point(
    job: Job, order: str, round_number: int, corrected: int, metrics: dict[str, Any],
    chosen: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "dataset": job.dataset, "seed": job.seed, "order": order, "round": round_number,
        "corrected": corrected, "dice": metrics.get("mean_dice"), "chosen": chosen or [],
    }


def summarise(points: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, tuple[float, float, int]]]]:
    """dataset → order → corrected volumes → (mean Dice, sd over seeds, seeds)."""
    table: dict[str, dict[str, dict[int, list[float]]]] = {}
    for point in points:
        if point["dice"] is None:
            continue
        table.setdefault(point["dataset"], {}).setdefault(point["order"], {}).setdefault(
            point["corrected"], []
        ).append(float(point["dice"]))
    return {
        dataset: {
            order: {n: (float(np.mean(v)), float(np.std(v)), len(v)) for n, v in sorted(by_n.items())}
            for order, by_n in orders.items()
        }
        for dataset, orders in table.items()
    }


def write_report(points: list[dict[str, Any]], out: Path, command: str) -> None:
    """``results.json``, ``active_loop.md`` and ``active_loop.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from cps4_engine.io import write_text_atomic

    summary = summarise(points)
    write_text_atomic(out / "results.json", json.dumps({"command": command, "points": points}, indent=1))
    lines = [f"Command: `{command}`", ""]
    for dataset, orders in summary.items():
        counts = sorted({n for by_n in orders.values() for n in by_n})
        lines += [f"**{dataset}** — held-out Dice (mean ± sd over seeds) by corrected volumes", ""]
        lines.append("| order | " + " | ".join(str(n) for n in counts) + " |")
        lines.append("|---|" + "---|" * len(counts))
        for order in ORDERS:
            by_n = orders.get(order, {})
            cells = [f"{by_n[n][0]:.3f} ± {by_n[n][1]:.3f}" if n in by_n else "–" for n in counts]
            lines.append(f"| {order} | " + " | ".join(cells) + " |")
        lines.append("")
    write_text_atomic(out / "active_loop.md", "\n".join(lines))

    figure, axes = plt.subplots(1, max(1, len(summary)), figsize=(4.5 * max(1, len(summary)), 3.4), squeeze=False)
    for axis, (dataset, orders) in zip(axes[0], summary.items()):
        for order, color in zip(ORDERS, ("tab:red", "tab:gray")):
            by_n = orders.get(order, {})
            if not by_n:
                continue
            xs = list(by_n)
            means = np.array([by_n[n][0] for n in xs])
            sds = np.array([by_n[n][1] for n in xs])
            axis.plot(xs, means, "o-", color=color, label=f"{order} order")
            axis.fill_between(xs, means - sds, means + sds, color=color, alpha=0.15)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(dataset)
        axis.set_xlabel("corrected volumes")
        axis.set_ylabel("test Dice")
        axis.set_ylim(0, 1)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "active_loop.png", dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json, active_loop.md/png")
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "vb3"], choices=sorted(PROTOCOL))
    parser.add_argument("--synthetic-data", help="an existing `cps4 synth ... --cases 60 --seed 2026` folder")
    parser.add_argument("--realdata", default=os.environ.get("CPS4_REALDATA", str(PROJECT_ROOT.parent / "shared" / "realdata")))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--max-steps", type=int, default=None, help="stage-2 steps per round")
    parser.add_argument("--method", default="mean-teacher", choices=METHODS)
    parser.add_argument("--vlm", help="stage-1 run folder (for --method cps4)")
    parser.add_argument("--rounds", type=int, default=4, help="correction rounds after round 0")
    parser.add_argument("--k", type=int, default=2, help="volumes corrected per round")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    parser.add_argument("--work", help="scratch folder for workspaces (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny everything, to check the pipeline")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cps4_engine.synthetic import write_synthetic_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cps4-active-"))
    protocol = SMOKE_PROTOCOL if args.smoke else PROTOCOL
    case_limit = 6 if args.smoke else None
    if args.smoke:
        args.preset, args.max_steps, args.rounds, args.k = "tiny", args.max_steps or 2, min(args.rounds, 1), 1
    data = {}
    if "synthetic" in args.datasets:
        if args.synthetic_data:
            data["synthetic"] = args.synthetic_data
        else:
            folder = work / "synthetic"
            if not folder.exists():
                write_synthetic_dataset(folder, case_limit or 60, 2026)
            data["synthetic"] = str(folder)
    if "vb3" in args.datasets:
        folder = Path(args.realdata) / "vb3_l1l5_t1"
        if not folder.is_dir():
            print(f"skipping vb3: {folder} not found", file=sys.stderr)
        else:
            data["vb3"] = str(folder)
    jobs = [
        Job(dataset, path, protocol[dataset]["train"], protocol[dataset]["labeled"], seed,
            args.rounds, args.k, args.preset, args.max_steps, args.method, args.vlm, args.device,
            str(work), case_limit)
        for dataset, path in data.items()
        for seed in args.seeds
    ]
    command = "python benchmarks/active_loop.py " + " ".join(argv if argv is not None else sys.argv[1:])
    points: list[dict[str, Any]] = []
    # The report is rewritten after every finished job, so a run stopped early still leaves
    # the seeds and datasets it finished.
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            for result in pool.map(run_job, jobs):
                points.extend(result)
                write_report(points, out, command)
    else:
        for job in jobs:
            points.extend(run_job(job))
            write_report(points, out, command)
    print((out / "active_loop.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
