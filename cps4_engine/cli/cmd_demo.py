"""``cps4 demo``: synthetic data -> stage 1 -> stage 2 -> predict -> evaluate -> report."""

from __future__ import annotations

import argparse

from cps4_engine.cli._options import positive_int
from cps4_engine.options import PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole CPS4 pipeline on synthetic phantoms and write a report",
        description=(
            "Generate synthetic spine phantoms, pretrain stage 1 (class prompts), train "
            "stage 2 (CPS4) with a few labeled volumes, predict the held-out test volumes, "
            "evaluate them and write report/report.md with the Dice table, an overlay PNG "
            "and training curves. Default settings take about 10 minutes on a 2-core CPU, "
            "--quick about 2."
        ),
    )
    parser.add_argument(
        "--out", metavar="DIR", help="empty or new output folder (default: cps4-demo/run-<date>-<time>)"
    )
    parser.add_argument("--quick", action="store_true", help="small models and few steps (about 2 minutes)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    parser.add_argument("--seed", type=int, help="seed of the phantoms, the labeled pick and the networks")
    sizes = parser.add_argument_group("sizes (override the default or --quick settings)")
    sizes.add_argument("--cases", type=positive_int, help="synthetic volumes to generate")
    sizes.add_argument("--train-cases", type=positive_int, help="the first N volumes train, the rest are test volumes")
    sizes.add_argument("--labeled", type=positive_int, help="labeled training volumes")
    sizes.add_argument("--preset", choices=PRESETS, help="model size preset")
    sizes.add_argument("--stage1-steps", type=positive_int, help="stage-1 optimiser steps")
    sizes.add_argument("--stage2-steps", type=positive_int, help="stage-2 optimiser steps")
    sizes.add_argument("--text-encoder", help="stage-1 text encoder: 'tiny', a model folder or a hub id")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from cps4_engine.demo import DEFAULT_SETTINGS, QUICK_SETTINGS, default_out_dir, run_demo

    settings = QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS
    overrides = {
        name: getattr(args, name)
        for name in ("seed", "cases", "train_cases", "labeled", "preset", "stage1_steps", "stage2_steps", "text_encoder")
        if getattr(args, name) is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    out = args.out or default_out_dir()
    run_demo(out, settings, device=args.device, echo=lambda line: print(line, flush=True))
    return 0
