"""``cps4 evaluate PRED GT``: per-case, per-class Dice and HD95, mean ± sd over cases."""

from __future__ import annotations

import argparse
import json

from cps4_engine.errors import CPS4Error


def parse_class_ids(text: str) -> list[int]:
    """``"2,3,4"`` -> ``[2, 3, 4]``.

    Raises:
        CPS4Error: an entry is not a positive integer.
    """
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CPS4Error(f"--classes {text!r}: give comma-separated class ids such as 2,3,4") from None
    if not ids or min(ids) < 1:
        raise CPS4Error(f"--classes {text!r}: give foreground class ids (1 or more)")
    return ids


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score predicted label volumes against ground truth (Dice, HD95, level accuracy)",
        description=(
            "Score predicted label volumes against ground-truth masks in 3D, per case and "
            "per class: Dice and HD95 (mm) by MONAI, averaged over the foreground classes "
            "present in the ground truth, then mean ± sd over cases. PRED and GT are two "
            "files or two folders; folders are matched by case name (Case3_labels.nii.gz "
            "matches mask_case3.nii.gz). A class missing from a prediction scores Dice 0 "
            "and HD95 = the volume's diagonal. Level naming beside Dice: the share of "
            "ground-truth structures whose voxels predicted as foreground carry the right label "
            "by majority, the cases with every level right, and the spine Dice (all foreground "
            "as one class)."
        ),
    )
    parser.add_argument("pred", metavar="PRED", help="predicted label file or folder")
    parser.add_argument("gt", metavar="GT", help="ground-truth label file or folder (or dataset root)")
    parser.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    parser.add_argument("--classes", metavar="IDS", help="score only these class ids, e.g. 2,3,4")
    parser.add_argument(
        "--gt-label-map", metavar="MAP", help="label-map file (or bundled name) renumbering GT into our scheme"
    )
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cps4_engine.device import resolve_device
    from cps4_engine.evaluate import evaluate, format_table
    from cps4_engine.io import write_text_atomic
    from cps4_engine.labels import load_label_map, mrspineseg_scheme
    from cps4_engine.metrics import CaseMetrics

    device = resolve_device(args.device)
    class_ids = parse_class_ids(args.classes) if args.classes else None
    label_map = load_label_map(args.gt_label_map) if args.gt_label_map else None
    names = mrspineseg_scheme().short_names()

    def report_case(case: CaseMetrics) -> None:
        if not args.quiet:
            dice = "n/a" if not case.classes else f"{100 * case.mean_dice:.1f}"
            missed = f"  missed: {', '.join(names.get(c, str(c)) for c in case.missed)}" if case.missed else ""
            named = sum(case.level_named.values())
            levels = f", levels named right {named}/{len(case.level_named)}" if case.level_named else ""
            print(f"{case.case_id}: Dice {dice} % over {len(case.classes)} classes{levels}{missed}", flush=True)

    result = evaluate(args.pred, args.gt, class_ids, label_map, progress=report_case, device=device)
    if not args.quiet:
        print()
    print(format_table(result, names))
    if result.unmatched_gt:
        print(f"({len(result.unmatched_gt)} ground-truth case(s) had no prediction and were not scored)")
    if args.json:
        write_text_atomic(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
