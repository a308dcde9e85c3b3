"""Diagnostics behind the explanations in BENCHMARKS.md.

Three subcommands, each printing one markdown table:

- ``prompts [RUN ...] [--text-encoder minilm]``: how far apart the 20 class prompts are,
  for the old prompts (``"a sagittal T2-weighted MR image of the {name}"``, the default
  until the anatomical descriptions) and the new defaults
  (:mod:`cps4_engine.labels`: ``"the L3 vertebral body, the third lumbar vertebra, below L2
  and above L4"``): mean and largest pairwise cosine of the pooled prompt embeddings, raw
  and centred (minus the mean over the 20, as the model's heads see them), the closest
  pair of each, and the mean norm of the centred embeddings (0 means every prompt
  collapsed onto one vector). Always measured: the untrained text encoder (its
  backbone's mean-pooled states, and projected to the ``tiny`` preset's width by a random
  projection, seed 0); then each stage-1 run folder given, with its trained encoder and
  projection (the prompts it was trained with are marked).
- ``step-time DATA [--steps 30] [--rounds 2]``: stage-1 seconds per step with the text
  backbone fixed against fine-tuned, the two alternated ``--rounds`` times in one process
  (median step of each run; the smallest median of each setting is reported), so the
  ratio holds on a shared machine.
- ``confident BENCH ...``: the share of unlabeled pixels that passed the pseudo-label
  confidence mask (``confident`` in each stage-2 run's ``history.json``), averaged over
  the second half of training, per (labeled, method), mean ± sd over seeds.

Examples::

    python benchmarks/stage1_diagnostics.py prompts --text-encoder minilm
    python benchmarks/stage1_diagnostics.py prompts RUN1   # the untrained rows, then RUN1's
    python benchmarks/stage1_diagnostics.py prompts OUT/runs/vb3_both_minilm_s0 OUT/runs/vb3_both_minilm_finetuned_s0
    python benchmarks/stage1_diagnostics.py step-time ../shared/realdata/vb3_l1l5_t1 --train-cases 14
    python benchmarks/stage1_diagnostics.py confident BENCH_VB3 BENCH_SYNTHETIC
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


# The default prompt template before the anatomical descriptions (the "before" rows).
OLD_PROMPT_TEMPLATE = "a sagittal T2-weighted MR image of the {name}"


def prompt_geometry(pooled: torch.Tensor, centred: torch.Tensor, names: list[str]) -> dict[str, object]:
    """Pairwise cosines of ``pooled`` and ``centred`` prompt embeddings ``(P, D)``: mean,
    largest and the pair (by ``names``, one per row) that has it, and the mean norm of the
    centred embeddings."""
    off_diagonal = ~torch.eye(pooled.shape[0], dtype=torch.bool)
    row: dict[str, object] = {"centred_norm": float(centred.norm(dim=1).mean())}
    for name, embeddings in (("raw", pooled), ("centred", centred)):
        unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
        cosines = unit @ unit.T
        row[f"{name}_mean_cosine"] = float(cosines[off_diagonal].mean())
        first, second = divmod(int(cosines.masked_fill(~off_diagonal, -2.0).argmax()), pooled.shape[0])
        row[f"{name}_max_cosine"] = float(cosines[first, second])
        row[f"{name}_closest"] = f"{names[first]} / {names[second]}"
    return row


def _prompt_sets() -> dict[str, list[str]]:
    from cps4_engine.labels import mrspineseg_scheme

    scheme = mrspineseg_scheme()
    return {"old (name, T2-weighted)": scheme.class_prompts(OLD_PROMPT_TEMPLATE), "new (anatomical)": scheme.class_prompts()}


def command_prompts(args: argparse.Namespace) -> None:
    from cps4_engine.classmaps import load_vlm
    from cps4_engine.labels import mrspineseg_scheme
    from cps4_engine.models.text import load_text_encoder
    from cps4_engine.presets import get_preset

    names = [info.short for info in mrspineseg_scheme().classes]
    preset = get_preset("tiny")
    untrained = load_text_encoder(args.text_encoder, embed_dim=preset.embed_dim, max_length=preset.text_max_length, seed=0).eval()
    rows: list[tuple[str, str, torch.Tensor]] = []
    with torch.no_grad():
        for label, prompts in _prompt_sets().items():
            tokenized = untrained.tokenize(prompts)
            states = untrained.backbone(**tokenized).last_hidden_state
            weights = tokenized["attention_mask"].unsqueeze(-1).to(states.dtype)
            rows.append((f"untrained {args.text_encoder}, backbone", label, (states * weights).sum(1) / weights.sum(1)))
            rows.append((f"untrained {args.text_encoder}, random projection to {preset.embed_dim}", label,
                         untrained.encode(prompts).pooled))
        for run in args.runs:
            vlm = load_vlm(run).eval()
            for label, prompts in _prompt_sets().items():
                marked = label + (" (trained with)" if prompts == vlm.prompts else "")
                rows.append((f"trained {run}", marked, vlm.encode_prompts(prompts).pooled))
            if vlm.prompts not in _prompt_sets().values():
                rows.append((f"trained {run}", "its own (trained with)", vlm.encode_prompts().pooled))
    print("| encoder | prompts | raw mean cos | raw max cos (closest pair) | centred mean cos | "
          "centred max cos (closest pair) | centred norm |")
    print("|---|---|---|---|---|---|---|")
    for encoder, label, pooled in rows:
        row = prompt_geometry(pooled, pooled - pooled.mean(dim=0, keepdim=True), names)
        print(f"| {encoder} | {label} | {row['raw_mean_cosine']:.3f} | {row['raw_max_cosine']:.3f} ({row['raw_closest']}) | "
              f"{row['centred_mean_cosine']:.3f} | {row['centred_max_cosine']:.3f} ({row['centred_closest']}) | "
              f"{row['centred_norm']:.4f} |")
    if not args.runs:
        print("\nafter training: give stage-1 run folders")


def _median_step_seconds(data: str, freeze: bool, steps: int, train_cases: int | None, text_encoder: str) -> float:
    from cps4_engine.stage1 import Stage1Config, iter_pretrain

    out = Path(tempfile.mkdtemp(prefix="cps4-step-time-")) / "run"
    config = Stage1Config(data=data, out=out, preset="tiny", max_steps=steps, validation=0, validation_every=steps + 1,
                          text_encoder=text_encoder, train_cases=train_cases, device="cpu", freeze_text_encoder=freeze)
    stamps = [time.perf_counter() for event in iter_pretrain(config) if event.kind == "step"]
    shutil.rmtree(out.parent, ignore_errors=True)
    return statistics.median(after - before for before, after in zip(stamps, stamps[1:]))


def command_step_time(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    medians: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for freeze in (True, False):
            medians[freeze].append(_median_step_seconds(args.data, freeze, args.steps, args.train_cases, args.text_encoder))
    fixed, tuned = min(medians[True]), min(medians[False])
    print("| text backbone | median s/step (each round) | best |")
    print("|---|---|---|")
    for label, freeze in (("fixed", True), ("fine-tuned", False)):
        print(f"| {label} | {', '.join(f'{value:.3f}' for value in medians[freeze])} | {min(medians[freeze]):.3f} |")
    print(f"\nfine-tuned / fixed: {tuned / fixed:.2f}x ({args.text_encoder}, tiny preset, {args.threads} thread(s), {args.steps} steps)")


def command_confident(args: argparse.Namespace) -> None:
    print("| benchmark | labeled | method | confident share, second half (mean ± sd over seeds) | runs |")
    print("|---|---|---|---|---|")
    for bench in args.benches:
        groups: dict[tuple[str, str], list[float]] = {}
        for history_path in sorted(Path(bench).glob("runs/train_*/history.json")):
            steps = [entry["losses"]["confident"] for entry in json.loads(history_path.read_text())["steps"]
                     if "confident" in entry.get("losses", {})]
            if not steps:
                continue
            name = history_path.parent.name
            labeled, method = name.split("_labeled")[1].split("_", 1)
            groups.setdefault((labeled, method), []).append(statistics.mean(steps[len(steps) // 2 :]))
        for (labeled, method), values in sorted(groups.items()):
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"| {Path(bench).name} | {labeled} | {method} | {statistics.mean(values):.3f} ± {spread:.3f} | {len(values)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prompts = commands.add_parser("prompts", help="pairwise cosines of the class-prompt embeddings")
    prompts.add_argument("runs", nargs="*", type=Path, help="stage-1 run folders, measured after the untrained encoder")
    prompts.add_argument("--text-encoder", default="minilm", help="the untrained encoder measured (default minilm)")
    prompts.set_defaults(func=command_prompts)
    step_time = commands.add_parser("step-time", help="stage-1 step time, text backbone fixed vs fine-tuned")
    step_time.add_argument("data", help="dataset folder")
    step_time.add_argument("--train-cases", type=int, help="first N cases are training volumes")
    step_time.add_argument("--text-encoder", default="minilm")
    step_time.add_argument("--steps", type=int, default=30)
    step_time.add_argument("--rounds", type=int, default=2)
    step_time.add_argument("--threads", type=int, default=1)
    step_time.set_defaults(func=command_step_time)
    confident = commands.add_parser("confident", help="share of pixels passing the pseudo-label confidence mask")
    confident.add_argument("benches", nargs="+", type=Path, help="`cps4 bench` output folders")
    confident.set_defaults(func=command_confident)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
