"""``cps4 synth OUT --cases N --seed S``: write a synthetic MRSpineSeg-layout dataset."""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write synthetic sagittal T2-like spine phantoms (MRSpineSeg layout)",
        description=(
            "Write N synthetic sagittal T2-like lumbar spine volumes with masks in the "
            "MRSpineSeg layout and label scheme: OUT/MR/Case{N}.nii.gz and "
            "OUT/Mask/mask_case{N}.nii.gz. The same --cases and --seed always give "
            "byte-identical files. Cases vary in visible levels, field of view, curvature, "
            "sizes, intensities, bias field, noise, slice count and thickness."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="output folder (empty, new, or an earlier synth output)")
    parser.add_argument("--cases", type=int, default=4, help="number of volumes (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    parser.add_argument(
        "--device", default="cpu", help="auto, cpu, cuda or mps; generation always runs on the CPU (default: cpu)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cps4_engine.device import resolve_device
    from cps4_engine.synthetic import write_synthetic_dataset

    resolve_device(args.device)
    start = time.perf_counter()
    written = write_synthetic_dataset(args.out, cases=args.cases, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(written)} synthetic cases (seed {args.seed}) to {args.out} in {elapsed:.1f} s")
    return 0
