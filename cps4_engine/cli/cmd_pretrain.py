"""``cps4 pretrain``: stage 1, class-prompt vision-language pretraining.

Runs under ``torchrun`` unchanged (``torchrun --nproc_per_node N -m cps4_engine pretrain …``):
each process trains on its own share of the labeled slices, gradients are averaged, and
only rank 0 prints and writes. Ctrl-C stops at the next step and saves the state that
``--resume`` continues.
"""

from __future__ import annotations

import argparse
from typing import Any

from cps4_engine.cli._options import add_training_run_options


def register(subparsers: Any) -> None:
    """Add the ``pretrain`` command."""
    parser = subparsers.add_parser(
        "pretrain",
        help="stage 1: pretrain the class-prompt vision-language model",
        description=(
            "Stage 1 of CPS4: train an image encoder and a text encoder so that each class "
            "prompt ('the L3 vertebral body, the third lumbar vertebra, below L2 and above L4') "
            "matches its own spine unit, with token- and pixel-level attention losses. Uses the "
            "labeled volumes of DATA. Writes RUN/config.json (with the prompts), model.safetensors "
            "(best on validation), last.safetensors, train_state.safetensors, text_encoder/, "
            "history.json, split.json. Runs under torchrun (torchrun --nproc_per_node N -m "
            "cps4_engine pretrain ...); only rank 0 writes."
        ),
    )
    add_training_run_options(parser, batch_size_help="slices per step (default: the preset's)",
                             seed_help="picks labeled volumes, initialises the networks")
    parser.add_argument("--learning-rate", type=float, help="AdamW learning rate (default: the preset's)")
    parser.add_argument("--text-encoder", metavar="ID",
                        help="tiny, minilm, a Hugging Face model folder or hub id "
                             "(default: the pretrained MiniLM when installed, else tiny)")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="fine-tune the text backbone at a tenth of the learning rate (default: keep it "
                             "fixed, train only its projection, and encode the prompts once; fine-tuning "
                             "diverged in 2 of 3 seeds in our vb3 benchmark)")
    parser.add_argument("--no-prompt-centring", action="store_true",
                        help="ablation: compare pixels with the raw pooled prompt embeddings instead of "
                             "their deviation from the class prompts' mean")
    parser.add_argument("--prompt-template", metavar="TEXT",
                        help="class prompt template: {description} becomes each class's anatomical "
                             "description ('the L3 vertebral body, the third lumbar vertebra, below L2 "
                             "and above L4'), {name} its name ('L3 vertebra'); at least one of them "
                             "(default: '{description}'; e.g. 'a T1 image of the {name}')")
    parser.add_argument("--no-token-loss", action="store_true", help="ablation: drop the token-level attention loss")
    parser.add_argument("--no-pixel-loss", action="store_true", help="ablation: drop the pixel-level attention loss")
    parser.add_argument("--token-weight", type=float, default=1.0, help="weight of the token-level attention loss (default 1)")
    parser.add_argument("--pixel-weight", type=float, default=1.0, help="weight of the pixel-level attention loss (default 1)")
    parser.add_argument("--alignment-weight", type=float, default=1.0,
                        help="weight of the dense prompt-pixel alignment (default 1)")
    parser.add_argument("--contrastive-weight", type=float, default=0.0,
                        help="weight of the image-text contrastive term (default 0: off)")
    parser.add_argument("--no-augment", action="store_true", help="no geometric augmentation")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Pretrain and print progress; returns 0 (done) or 130 (cancelled)."""
    from cps4_engine.cli._progress import print_training_progress
    from cps4_engine.events import CancelToken
    from cps4_engine.stage1 import Stage1Config, iter_pretrain

    config = Stage1Config(
        data=args.data, out=args.out, labeled=args.labeled, preset=args.preset, max_steps=args.max_steps,
        device=args.device, text_encoder=args.text_encoder, seed=args.seed, resume=args.resume,
        token_loss=not args.no_token_loss, pixel_loss=not args.no_pixel_loss,
        token_weight=args.token_weight, pixel_weight=args.pixel_weight, alignment_weight=args.alignment_weight,
        contrastive_weight=args.contrastive_weight, prompt_template=args.prompt_template,
        train_cases=args.train_cases, validation=args.validation, batch_size=args.batch_size,
        learning_rate=args.learning_rate, augment=not args.no_augment, amp=not args.no_amp, cpu_bf16=args.cpu_bf16,
        freeze_text_encoder=not args.train_text_encoder, centre_prompts=not args.no_prompt_centring,
    )
    cancel = CancelToken()
    return print_training_progress(iter_pretrain(config, cancel), cancel, "stage 1")
