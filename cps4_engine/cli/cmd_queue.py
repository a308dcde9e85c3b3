"""``cps4 queue WORKSPACE``: the review queue, most uncertain cases and classes first."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "queue",
        help="print the review queue of a workspace, most uncertain first",
        description=(
            "Rank the workspace's unreviewed cases by the uncertainty stored with their "
            "latest pseudo-label (mean of normalised entropy, share of low-confidence "
            "voxels and, when prompt maps were used, teacher/prompt disagreement), and "
            "within each case its classes still to review."
        ),
    )
    parser.add_argument("workspace", metavar="WORKSPACE", help="workspace folder")
    parser.add_argument("--top", type=int, default=None, metavar="N", help="show only the first N cases")
    parser.add_argument(
        "--classes", type=int, default=3, metavar="K", help="classes listed per case (default 3)"
    )
    parser.set_defaults(func=run)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run(args: argparse.Namespace) -> int:
    from cps4_engine.active.queue import review_queue
    from cps4_engine.active.workspace import Workspace
    from cps4_engine.errors import CPS4Error

    if args.top is not None and args.top < 1:
        raise CPS4Error(f"--top {args.top} must be at least 1")
    workspace = Workspace.open(args.workspace)
    queue = review_queue(workspace)
    if not queue:
        print("review queue is empty: no unreviewed case has a scored pseudo-label yet")
        return 0
    shown = queue[: args.top] if args.top else queue
    width = max([4, *(len(entry.case_id) for entry in shown)])
    print(
        f"{'rank':>4}  {'case':<{width}}  {'state':<14}  {'score':>5}  {'entropy':>7}  "
        f"{'low-conf voxels':>15}  {'disagree':>8}  classes to check (score)"
    )
    for rank, entry in enumerate(shown, start=1):
        u = entry.uncertainty
        classes = ", ".join(
            f"{workspace.scheme.by_id(figures.class_id).short} ({figures.score:.2f}"
            + (", rejected" if status == "rejected" else "") + ")"
            for figures, status in entry.classes[: args.classes]
        )
        print(
            f"{rank:>4}  {entry.case_id:<{width}}  {entry.state:<14}  {u.score:>5.3f}  "
            f"{u.mean_entropy:>7.3f}  {u.low_confidence_voxels:>15d}  {_figure(u.disagreement):>8}  "
            f"{classes or '-'}"
        )
    if len(shown) < len(queue):
        print(f"... {len(queue) - len(shown)} more")
    return 0
