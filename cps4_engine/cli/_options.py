"""Command-line options that ``cps4 pretrain`` and ``cps4 train`` share.

The module name does not start with ``cmd_``, so the command discovery in
:mod:`cps4_engine.cli` does not take it for a sub-command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cps4_engine.options import DEFAULT_DEVICE, DEFAULT_PRESET, DEFAULT_VALIDATION, DEVICES, PRESETS


def count_or_fraction(text: str) -> int | float:
    """Parse ``--labeled``: an integer count (``2``) or a fraction (``0.05``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a fraction") from None


def positive_int(text: str) -> int:
    """Parse a count that must be 1 or more (``--max-steps``, ``--batch-size``): 0 or a
    negative number would otherwise silently mean "the preset's"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def add_training_run_options(parser: argparse.ArgumentParser, *, batch_size_help: str, seed_help: str) -> None:
    """Add the dataset, split, size, device and run-folder options of a training command.

    Args:
        parser: the sub-command's parser.
        batch_size_help: help text of ``--batch-size`` (what one step's slices are).
        seed_help: help text of ``--seed`` (what the seed initialises).
    """
    parser.add_argument("data", type=Path, metavar="DATA", help="dataset folder (any supported layout)")
    parser.add_argument("--labeled", type=count_or_fraction, required=True, metavar="K",
                        help="labeled training volumes: a count (2) or a fraction (0.05)")
    parser.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder to write")
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help=f"size preset: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    parser.add_argument("--max-steps", type=positive_int, help="optimiser steps (default: the preset's)")
    parser.add_argument("--batch-size", type=positive_int, help=batch_size_help)
    parser.add_argument("--device", default=DEFAULT_DEVICE,
                        help=f"{', '.join(DEVICES)} or cuda:N (default {DEFAULT_DEVICE})")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--validation", type=count_or_fraction, default=DEFAULT_VALIDATION,
                        help="validation volumes from the training volumes: count or fraction (default 0.1)")
    parser.add_argument("--train-cases", type=int,
                        help="only the first N cases are training volumes; the rest are never seen")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="bfloat16 mixed precision of the training steps on the CPU (fast on CPUs with "
                             "AVX512-BF16 or AMX, slower elsewhere; see BENCHMARKS.md)")
