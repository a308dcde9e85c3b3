"""``cps4 train``: stage 2, semi-supervised segmentation (supervised, mean teacher, UniMatch, CPS4).

Runs under ``torchrun`` unchanged (``torchrun --nproc_per_node N -m cps4_engine train …``);
only rank 0 prints and writes. Ctrl-C stops at the next step and saves a checkpoint that
``--resume`` continues.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cps4_engine.cli._options import add_training_run_options
from cps4_engine.options import (
    BASES,
    DEFAULT_BASE,
    DEFAULT_FEATURE_DROPOUT,
    DEFAULT_METHOD,
    METHODS,
    PROMPT_WEIGHTINGS,
    PSEUDO_LABELS,
)
from cps4_engine.presets import DEFAULT_PROMPT_WEIGHT


def register(subparsers: Any) -> None:
    """Add the ``train`` command."""
    parser = subparsers.add_parser(
        "train",
        help="stage 2: train the segmenter (supervised, mean-teacher, unimatch or cps4)",
        description=(
            "Stage 2 of CPS4: train a 2D segmentation network on DATA with a few labeled "
            "volumes, from the unlabeled rest through a mean teacher or UniMatch-style "
            "weak-to-strong consistency and, for cps4, the class-prompt maps of a stage-1 run "
            "(--vlm) on either base (--base). Writes RUN/config.json, "
            "model.safetensors (best on validation), last.safetensors, history.json, split.json."
        ),
    )
    add_training_run_options(parser, batch_size_help="labeled slices per step (default: the preset's)",
                             seed_help="picks labeled volumes, initialises the network")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                        help="supervised only, mean teacher or unimatch without prompts, or CPS4 (default)")
    parser.add_argument("--base", choices=BASES, default=None,
                        help=f"the semi-supervised base cps4 trains on (default {DEFAULT_BASE})")
    parser.add_argument("--vlm", type=Path, metavar="RUN", help="stage-1 run folder (cps4 pretrain); cps4 needs it")
    parser.add_argument("--pseudo-label", choices=PSEUDO_LABELS, default=None,
                        help="cps4 pseudo-labels from the teacher, the prompt maps, or both (default fused)")
    parser.add_argument("--confidence-threshold", type=float, default=0.8,
                        help="ignore pseudo-labeled pixels less confident than this (default 0.8)")
    parser.add_argument("--prompt-weight", type=float, default=DEFAULT_PROMPT_WEIGHT,
                        help="weight of the class-prompt maps in fused pseudo-labels, 0-1; with reliability "
                             "weighting the weight of a fully reliable map (default %(default)s)")
    parser.add_argument("--prompt-weighting", choices=PROMPT_WEIGHTINGS, default=None,
                        help="each class map's weight in fused pseudo-labels: global (--prompt-weight for "
                             "all) or reliability (--prompt-weight scaled by the map's stage-1 validation "
                             "Dice; see cps4_engine.fusion); default reliability when the stage-1 run has "
                             "class_reliability.json, else global")
    parser.add_argument("--feature-dropout", type=float, default=DEFAULT_FEATURE_DROPOUT,
                        help="channel dropout of unimatch's feature-perturbed view (default %(default)s)")
    parser.add_argument("--prompt-threshold", type=float, default=0.5,
                        help="a class-prompt map claims a pixel above this probability (default 0.5)")
    parser.add_argument("--ema-decay", type=float, default=0.99, help="teacher EMA decay (default 0.99)")
    parser.add_argument("--unsupervised-weight", type=float, default=1.0,
                        help="weight of the unlabeled loss after ramp-up (default 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train and print progress; returns 0 (done), 130 (cancelled)."""
    from cps4_engine.cli._progress import print_training_progress
    from cps4_engine.events import CancelToken
    from cps4_engine.stage2 import Stage2Config, iter_train

    config = Stage2Config(
        data=args.data, out=args.out, labeled=args.labeled, method=args.method, base=args.base, vlm=args.vlm,
        pseudo_label=args.pseudo_label, confidence_threshold=args.confidence_threshold,
        prompt_weight=args.prompt_weight, prompt_weighting=args.prompt_weighting,
        feature_dropout=args.feature_dropout, prompt_threshold=args.prompt_threshold,
        ema_decay=args.ema_decay, unsupervised_weight=args.unsupervised_weight,
        preset=args.preset, max_steps=args.max_steps, batch_size=args.batch_size,
        validation=args.validation, train_cases=args.train_cases, device=args.device,
        seed=args.seed, resume=args.resume, amp=not args.no_amp, cpu_bf16=args.cpu_bf16,
    )
    cancel = CancelToken()
    return print_training_progress(iter_train(config, cancel), cancel, "stage 2",
                                   shown_losses=("total", "dice", "unsupervised"))
