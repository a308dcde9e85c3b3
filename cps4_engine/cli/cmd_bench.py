"""``cps4 bench``: the stage-2 benchmark table (supervised, mean teacher, UniMatch, CPS4 on either, ceiling)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from cps4_engine.cli._options import positive_int
from cps4_engine.presets import DEFAULT_PROMPT_WEIGHT


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def register(subparsers: Any) -> None:
    """Add the ``bench`` command."""
    parser = subparsers.add_parser(
        "bench",
        help="run the stage-2 benchmark and write bench.json and bench.md",
        description=(
            "Supervised, mean-teacher, unimatch, and CPS4 on mean teacher (cps4) and on UniMatch "
            "(cps4-unimatch) at each protocol's labeled counts (--methods picks some), full "
            "supervision as the ceiling, over several seeds; Dice/HD95 on the test volumes, "
            "pseudo-label Dice (teacher vs fused) on the unlabeled training volumes, CPS4 / "
            "mean-teacher step-time ratio, predict time and peak memory per volume. "
            "Protocols: synthetic (60 cases, seed 2026: 40 train / 20 test, 2 and 4 labeled) "
            "and vb3_l1l5_t1 (14 train / 6 test, 1 and 2 labeled)."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("bench"), help="output folder (default ./bench)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    parser.add_argument("--preset", default="cpu", help="size preset of both stages (default cpu)")
    parser.add_argument("--max-steps", type=positive_int, help="stage-2 steps per run (default: the preset's)")
    parser.add_argument("--vlm-steps", type=positive_int, help="stage-1 steps per pretraining (default: the preset's)")
    parser.add_argument("--seeds", type=_int_list, default=(0, 1, 2), help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--datasets", type=_name_list, default=("synthetic", "vb3_l1l5_t1"),
                        help="comma-separated protocols (default synthetic,vb3_l1l5_t1)")
    # No default list here: the methods live in cps4_engine.bench, which imports torch.
    parser.add_argument("--methods", type=_name_list,
                        help="comma-separated methods, e.g. unimatch,cps4-unimatch (default: all)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--realdata", type=Path, help="real-data folder (default $CPS4_REALDATA or ../shared/realdata)")
    parser.add_argument("--timing-steps", type=int, default=30,
                        help="steps of each method in the step-time comparison (default 30)")
    parser.add_argument("--text-encoder", help="stage-1 text encoder (default: the pretrained MiniLM when installed)")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="stage 1 fine-tunes the text backbone (default: fixed, only its projection trains)")
    parser.add_argument("--prompt-weight", type=float, default=DEFAULT_PROMPT_WEIGHT,
                        help="weight of the class-prompt maps in CPS4's fused pseudo-labels (default %(default)s)")
    parser.add_argument("--no-full-supervision", action="store_true", help="skip the full-supervision ceiling")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print where the tables went."""
    from cps4_engine.bench import BENCH_METHODS, PROTOCOLS, BenchSettings, run_bench
    from cps4_engine.errors import CPS4Error

    unknown = [name for name in args.datasets if name not in PROTOCOLS]
    if unknown:
        raise CPS4Error(f"--datasets {','.join(unknown)} unknown; choose from {', '.join(PROTOCOLS)}")
    methods = tuple(BENCH_METHODS) if args.methods is None else args.methods
    unknown = [name for name in methods if name not in BENCH_METHODS]
    if unknown:
        raise CPS4Error(f"--methods {','.join(unknown)} unknown; choose from {', '.join(BENCH_METHODS)}")
    if not methods:
        raise CPS4Error("--methods lists no method")
    if not args.seeds:
        raise CPS4Error("--seeds lists no seed")
    settings = BenchSettings(
        out=args.out, device=args.device, preset=args.preset, max_steps=args.max_steps,
        vlm_steps=args.vlm_steps, seeds=args.seeds, methods=methods,
        protocols=tuple(PROTOCOLS[name] for name in args.datasets), jobs=args.jobs,
        realdata=args.realdata, timing_steps=args.timing_steps,
        full_supervision=not args.no_full_supervision, text_encoder=args.text_encoder,
        freeze_text_encoder=not args.train_text_encoder,
        prompt_weight=args.prompt_weight,
        command=" ".join(["cps4"] + [shlex.quote(a) for a in sys.argv[1:]]),
    )
    run_bench(settings)
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")
    return 0
