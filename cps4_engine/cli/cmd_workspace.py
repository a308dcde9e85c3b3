"""``cps4 workspace init|status|export``: the refinement workspace from the command line."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "workspace",
        help="create, inspect or export a refinement workspace",
        description=(
            "A refinement workspace keeps the cases under review, every label version, and "
            "per class who made it (machine round, accepted, corrected, rejected)."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    init = actions.add_parser("init", help="make a workspace from a dataset")
    init.add_argument("dir", metavar="DIR", help="workspace folder to create")
    init.add_argument("--data", required=True, metavar="DATA", help="dataset folder (any supported layout)")
    init.add_argument(
        "--heldout", nargs="+", default=[], metavar="CASE",
        help="labeled case ids kept out of training to measure each round",
    )
    init.add_argument(
        "--no-import", action="store_true",
        help="do not import the dataset's masks as human labels (held-out masks are still imported)",
    )
    init.set_defaults(func=run_init)

    status = actions.add_parser("status", help="cases, review states and rounds of a workspace")
    status.add_argument("dir", metavar="DIR", help="workspace folder")
    status.set_defaults(func=run_status)

    export = actions.add_parser(
        "export", help="write the final label volumes in MRSpineSeg layout (MR/, Mask/)"
    )
    export.add_argument("dir", metavar="DIR", help="workspace folder")
    export.add_argument("--out", required=True, metavar="OUT", help="folder to write")
    export.add_argument(
        "--reviewed-only", action="store_true",
        help="leave out classes nobody reviewed (they become background, masks marked partial)",
    )
    export.set_defaults(func=run_export)


def run_init(args: argparse.Namespace) -> int:
    from cps4_engine.active.workspace import Workspace
    from cps4_engine.data import open_dataset
    from cps4_engine.labels import mrspineseg_scheme

    dataset = open_dataset(args.data)
    workspace = Workspace.create(
        args.dir, list(dataset.cases), mrspineseg_scheme(), source=str(dataset.root),
        heldout=args.heldout, import_labels=not args.no_import,
    )
    states = [workspace.state(case_id) for case_id in workspace.case_ids()]
    print(
        f"workspace {workspace.root}: {len(states)} cases from {dataset.root} ({dataset.layout}); "
        f"{states.count('reviewed')} labeled, {states.count('unlabeled')} unlabeled, "
        f"{states.count('held out')} held out"
    )
    return 0


def run_status(args: argparse.Namespace) -> int:
    from cps4_engine.active.workspace import Workspace

    workspace = Workspace.open(args.dir)
    if workspace.recovered:
        print("warning: workspace.json was unreadable; loaded workspace.json.prev")
    ids = workspace.case_ids()
    print(f"workspace {workspace.root}: {len(ids)} cases, round {workspace.current_round}")
    width = max([4, *(len(case_id) for case_id in ids)])
    print(f"{'case':<{width}}  {'state':<14}  {'version':<7}  classes")
    for case_id in ids:
        versions = workspace.versions(case_id)
        version = f"v{versions[-1]['version']:04d}" if versions else "-"
        classes = ", ".join(
            f"{workspace.scheme.by_id(class_id).short} {status.status}"
            + (f" r{status.round}" if status.round is not None else "")
            for class_id, status in workspace.class_statuses(case_id).items()
        )
        print(f"{case_id:<{width}}  {workspace.state(case_id):<14}  {version:<7}  {classes or '-'}")
    for record in workspace.rounds:
        metrics = record.get("metrics", {})
        dice = metrics.get("mean_dice")
        figure = f"held-out Dice {dice:.3f}" if isinstance(dice, (int, float)) else "no held-out metrics"
        levels = metrics.get("level_accuracy")
        if isinstance(levels, (int, float)):
            figure += f", levels named right {100 * levels:.0f} %"
        print(
            f"round {record['round']}: trained on {len(record.get('trained_on', []))} labeled cases, "
            f"{figure} ({record.get('run', '')})"
        )
    return 0


def run_export(args: argparse.Namespace) -> int:
    from cps4_engine.active.workspace import Workspace

    workspace = Workspace.open(args.dir)
    written = workspace.export(args.out, include_machine=not args.reviewed_only)
    print(f"exported {len(written)} label volumes to {args.out}")
    return 0
