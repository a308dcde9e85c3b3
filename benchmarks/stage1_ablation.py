"""Stage-1 ablation: Dice of the fused class maps on held-out volumes.

For every dataset, seed and loss variant (both attention losses, no token loss, no pixel
loss, neither) this pretrains stage 1 on the training volumes (2 labeled, the seed picks
them), then fuses the class maps of every test volume (``fusion.fuse_class_maps``) in the
volume's own geometry and scores them with ``metrics.case_metrics`` (3D Dice per class,
mean over the classes present, mean over cases). Comparisons rerun the "both" variant
with the tiny randomly initialised text encoder (pretrained against random text), with
uncentred prompt embeddings (``--centring compare``) and with the text backbone trained
the other way (``--fine-tuning-comparison``: fine-tuned against fixed).

Protocol (BENCHMARK_PROTOCOL.md):
- ``synthetic``: ``cps4 synth DATA --cases 60 --seed 2026``; cases in file-name order,
  the first 40 train, the last 20 test;
- ``vb3``: ``../shared/realdata/vb3_l1l5_t1`` in ``index.json`` order, the first 14 train,
  the last 6 test; scored on its classes (L1-L5 vertebral bodies).

Full run (GPU machine)::

    python benchmarks/stage1_ablation.py --device cuda --preset cpu --jobs 8 --out bench/stage1 \
        --centring compare --fine-tuning-comparison

CPU run of BENCHMARKS.md (15 min on 2 cores)::

    python benchmarks/stage1_ablation.py --device cpu --preset tiny --max-steps 600 \
        --validation-every 300 --text-encoder minilm --centring compare --jobs 2 --out OUT

Smoke run (CPU, a minute)::

    python benchmarks/stage1_ablation.py --preset tiny --max-steps 5 --seeds 0 \\
        --variants both --datasets synthetic --synthetic-cases 4 --train-cases 3 --out /tmp/s1

``--throughput-steps N`` also times N training steps of a preset (``--throughput-preset``,
default ``paper``) on random slices, with and without mixed precision, and reports
slices per second (``--datasets none`` times only that).

Finished runs under ``OUT/runs`` are reused and unfinished ones resumed, so an interrupted
benchmark continues where it stopped. Writes ``results.json`` (every run, per-case Dice,
the summary, the paired differences, throughput, the command and machine) and
``results.md`` (mean +- sd over seeds, and each configuration minus the reference "both"
seed by seed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = {"both": (True, True), "no-token": (False, True), "no-pixel": (True, False), "neither": (False, False)}
PROJECT_ROOT = Path(__file__).resolve().parents[1]
TIE_TOLERANCE = 1e-4  # Dice differences below 0.01 points count as ties, not wins


@dataclass
class RunSpec:
    """One pretraining + evaluation.

    Attributes:
        dataset: dataset name (``synthetic`` or ``vb3``).
        data: dataset folder.
        train_cases: the first N cases (dataset order) are training volumes; the rest test.
        test_limit: evaluate at most this many test volumes (None: all).
        variant: key of :data:`VARIANTS`.
        text_encoder: text encoder spec (None: the default pretrained MiniLM).
        seed: the run's seed.
        preset: size preset.
        max_steps: steps (None: the preset's).
        device: torch device name.
        out: the run folder.
        threads: torch CPU threads of the worker.
        labeled: labeled training volumes.
        validation_every: steps between validations (None: the preset's).
        freeze_text: keep the text backbone fixed (``Stage1Config.freeze_text_encoder``);
            False fine-tunes it.
        centre_prompts: centre the pooled prompt embeddings (``Stage1Config.centre_prompts``).
        attention_weight: weight of each attention loss that the variant keeps.
        validation: validation volumes carved from the training volumes; the same count as
            the stage-2 runs that use this stage 1, so the seed draws the same labeled pair.
    """

    dataset: str
    data: str
    train_cases: int
    test_limit: int | None
    variant: str
    text_encoder: str | None
    seed: int
    preset: str
    max_steps: int | None
    device: str
    out: str
    threads: int
    labeled: int = 2
    validation_every: int | None = None
    freeze_text: bool = True
    centre_prompts: bool = True
    attention_weight: float = 1.0
    validation: int = 2
    cpu_bf16: bool = False

    @property
    def text_label(self) -> str:
        name = "tiny (random)" if self.text_encoder == "tiny" else "MiniLM (pretrained)" if self.text_encoder in (None, "minilm") else self.text_encoder
        return f"{name}, {'frozen' if self.freeze_text else 'fine-tuned'}"

    @property
    def variant_label(self) -> str:
        label = self.variant if self.attention_weight == 1.0 else f"{self.variant}, attention weight {self.attention_weight:g}"
        return label if self.centre_prompts else f"{label}, prompts not centred"


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Pretrain and evaluate one configuration (runs in a worker process)."""
    import torch

    from cps4_engine.classmaps import load_vlm, volume_class_maps
    from cps4_engine.data import open_dataset
    from cps4_engine.fusion import fuse_class_maps
    from cps4_engine.io import read_volume
    from cps4_engine.metrics import case_metrics
    from cps4_engine.stage1 import Stage1Config, pretrain, read_history

    torch.set_num_threads(spec.threads)
    token, pixel = VARIANTS[spec.variant]
    began = time.perf_counter()
    config = Stage1Config(
        data=spec.data, out=spec.out, labeled=spec.labeled, preset=spec.preset, max_steps=spec.max_steps,
        device=spec.device, text_encoder=spec.text_encoder, seed=spec.seed, token_loss=token, pixel_loss=pixel,
        train_cases=spec.train_cases, validation_every=spec.validation_every,
        freeze_text_encoder=spec.freeze_text, centre_prompts=spec.centre_prompts,
        token_weight=spec.attention_weight, pixel_weight=spec.attention_weight, validation=spec.validation,
        cpu_bf16=spec.cpu_bf16,
    )
    if (Path(spec.out) / "config.json").is_file():
        planned = json.loads((Path(spec.out) / "config.json").read_text())["max_steps"]
        done = read_history(spec.out)["steps"]
        if not done or done[-1]["step"] < planned:
            config.resume = True
            pretrain(config)
    else:
        pretrain(config)
    trained = time.perf_counter()
    vlm = load_vlm(spec.out, spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    test_cases = list(open_dataset(spec.data).cases)[spec.train_cases :][: spec.test_limit]
    cases = []
    for case in test_cases:
        volume = read_volume(case.image_path)
        truth = read_volume(case.label_path, kind="label")
        maps = volume_class_maps(vlm, volume)
        predicted = fuse_class_maps(torch.from_numpy(maps.probabilities), class_dim=0).numpy()
        result = case_metrics(predicted, truth.array, volume.spacing, case_id=str(case.case_id))
        cases.append({"case": str(case.case_id), "dice": result.mean_dice, "per_class": {str(k): v for k, v in result.dice.items()}})
    dice = [entry["dice"] for entry in cases if np.isfinite(entry["dice"])]
    return {
        **asdict(spec),
        "text": spec.text_label,
        "variant_label": spec.variant_label,
        "mean_dice": float(np.mean(dice)) if dice else float("nan"),
        "cases": cases,
        "train_seconds": trained - began,
        "evaluate_seconds": time.perf_counter() - trained,
    }


def measure_throughput(preset_name: str, device_name: str, steps: int, amp: bool, text_encoder: str | None) -> dict[str, Any]:
    """Training slices per second of a preset on random slices (after 3 warm-up steps).

    Args:
        preset_name: the preset to time.
        device_name: torch device name.
        steps: timed optimiser steps.
        amp: mixed precision (bfloat16 where supported, else float16), CUDA only.
        text_encoder: text encoder spec.

    Returns:
        ``preset``, ``amp``, ``batch_size``, ``steps``, ``slices_per_second`` and, on CUDA,
        ``peak_memory_gib``.
    """
    import torch

    from cps4_engine.device import resolve_device
    from cps4_engine.labels import mrspineseg_scheme
    from cps4_engine.losses import Stage1Loss, one_hot_targets
    from cps4_engine.models.image_encoder import build_image_encoder
    from cps4_engine.models.text import load_text_encoder
    from cps4_engine.models.vlm import VLM
    from cps4_engine.presets import get_preset
    from cps4_engine.stage1 import Stage1Config, class_prompts

    device = resolve_device(device_name)
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    text = load_text_encoder(text_encoder, embed_dim=preset.embed_dim, max_length=preset.text_max_length)
    model = VLM(build_image_encoder(preset), text, class_prompts(mrspineseg_scheme()), preset).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.learning_rate)
    use_amp = amp and device.type == "cuda"
    dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    criterion = Stage1Loss(Stage1Config(data="", out="").loss_weights())
    images = torch.rand(preset.batch_size, 1, *preset.slice_size, device=device)
    labels = torch.randint(0, 20, (preset.batch_size, *preset.slice_size), device=device)
    targets = one_hot_targets(labels, 20)
    validity = torch.ones_like(targets, dtype=torch.bool)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            output = model(images)
        loss = criterion(output, targets, validity)["total"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    result: dict[str, Any] = {"preset": preset_name, "amp": use_amp, "batch_size": preset.batch_size, "steps": steps,
                              "slices_per_second": steps * preset.batch_size / seconds}
    if device.type == "cuda":
        result["amp_dtype"] = str(dtype).replace("torch.", "") if use_amp else "float32"
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean +- sample sd over seeds of each (dataset, variant, text encoder)."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for result in results:
        groups.setdefault((result["dataset"], result["variant_label"], result["text"]), []).append(result["mean_dice"])
    rows = []
    for (dataset, variant, text), values in sorted(groups.items()):
        array = np.asarray(values, dtype=float)
        rows.append({
            "dataset": dataset, "variant": variant, "text": text, "seeds": len(values),
            "mean": float(np.nanmean(array)), "sd": float(np.nanstd(array, ddof=1)) if len(values) > 1 else 0.0,
        })
    return rows


def paired_differences(results: list[dict[str, Any]], reference: tuple[str, str]) -> list[dict[str, Any]]:
    """Each configuration's Dice minus the reference's, seed by seed.

    A seed picks the labeled volumes and the initialisation, and between-seed spread is
    large with 2 labeled volumes, so a difference measured within each seed says more
    than two means ± sd side by side.

    Args:
        results: the runs (``run_one`` outputs).
        reference: ``(variant_label, text)`` of the configuration to subtract.

    Returns:
        One row per (dataset, variant_label, text) other than the reference:
        ``seeds`` (seeds both ran), ``mean`` and ``sd`` of the differences, ``wins``
        (seeds where the configuration beat the reference by more than
        :data:`TIE_TOLERANCE`).
    """
    by_key = {(r["dataset"], r["variant_label"], r["text"], r["seed"]): r["mean_dice"] for r in results}
    rows = []
    for dataset, variant, text in sorted({(r["dataset"], r["variant_label"], r["text"]) for r in results}):
        if (variant, text) == reference:
            continue
        differences = [
            by_key[(dataset, variant, text, seed)] - by_key[(dataset, *reference, seed)]
            for (name, label, encoder, seed) in sorted(by_key)
            if (name, label, encoder) == (dataset, variant, text) and (dataset, *reference, seed) in by_key
        ]
        if not differences:
            continue
        array = np.asarray(differences, dtype=float)
        rows.append({
            "dataset": dataset, "variant": variant, "text": text, "seeds": len(differences),
            "mean": float(array.mean()), "sd": float(array.std(ddof=1)) if len(differences) > 1 else 0.0,
            "wins": int((array > TIE_TOLERANCE).sum()),
        })
    return rows


def markdown(rows: list[dict[str, Any]], command: str, machine: str, paired: list[dict[str, Any]] | None = None,
             reference: tuple[str, str] | None = None) -> str:
    """The summary (and the paired differences) as markdown tables, with the command and machine."""
    lines = [
        "| dataset | losses | text encoder | seeds | fused class-map Dice (mean ± sd) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['dataset']} | {row['variant']} | {row['text']} | {row['seeds']} | {100 * row['mean']:.2f} ± {100 * row['sd']:.2f} % |")
    if paired and reference:
        lines += [
            "",
            f"Paired by seed, minus '{reference[0]}' with {reference[1]}:",
            "",
            "| dataset | losses | text encoder | seeds | Dice difference (mean ± sd, points) | seeds better |",
            "|---|---|---|---|---|---|",
        ]
        for row in paired:
            lines.append(
                f"| {row['dataset']} | {row['variant']} | {row['text']} | {row['seeds']} | "
                f"{100 * row['mean']:+.2f} ± {100 * row['sd']:.2f} | {row['wins']} of {row['seeds']} |"
            )
    return "\n".join(lines) + f"\n\nCommand: `{command}`  \nMachine: {machine}\n"


def _machine(device: str) -> str:
    import torch

    name = platform.processor() or platform.machine()
    if device != "cpu" and torch.cuda.is_available():
        name = f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{name}; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder (runs go to OUT/runs)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--preset", default="cpu", help="tiny, cpu or paper")
    parser.add_argument("--max-steps", type=int, help="steps per run (default: the preset's)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated of " + ", ".join(VARIANTS))
    parser.add_argument("--datasets", default="synthetic,vb3", help="comma-separated of synthetic, vb3")
    parser.add_argument("--text-encoder", default=None, help="text encoder of the ablation (default: pretrained MiniLM)")
    parser.add_argument("--no-text-comparison", action="store_true", help="skip the random-text-encoder rerun of 'both'")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="every run fine-tunes its text backbone (default: fixed, only the projection trains)")
    parser.add_argument("--attention-weight", type=float, default=1.0,
                        help="weight of the token- and pixel-level attention losses where a variant keeps them (default 1)")
    parser.add_argument("--fine-tuning-comparison", action="store_true",
                        help="add a rerun of 'both' with the text backbone trained the other way (fixed <-> fine-tuned)")
    parser.add_argument("--centring", choices=("on", "off", "compare"), default="on",
                        help="centre the pooled prompt embeddings; 'compare' adds an uncentred rerun of 'both'")
    parser.add_argument("--synthetic", type=Path, help="synthetic dataset folder (default: OUT/synthetic, generated if missing)")
    parser.add_argument("--synthetic-cases", type=int, default=60, help="cases to generate (protocol: 60)")
    parser.add_argument("--train-cases", type=int, help="override the training-case count of every dataset (smoke runs)")
    parser.add_argument("--test-limit", type=int, help="evaluate at most this many test volumes per run (smoke runs)")
    parser.add_argument("--realdata", type=Path, default=Path(os.environ.get("CPS4_REALDATA", PROJECT_ROOT.parent / "shared" / "realdata")))
    parser.add_argument("--validation-every", type=int, help="steps between validations (default: the preset's)")
    parser.add_argument("--labeled", type=int, default=2,
                        help="labeled training volumes, drawn by the seed as in the stage-2 runs (default 2)")
    parser.add_argument("--validation", type=int, default=2,
                        help="validation volumes carved from the training volumes (as the stage-2 runs: 2)")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run in parallel worker processes")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="bfloat16 autocast of the training steps on the CPU (run folders end in _bf16_sSEED)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per run (default: the cores shared among the jobs)")
    parser.add_argument("--throughput-steps", type=int, default=0, help="also time N training steps with and without AMP")
    parser.add_argument("--throughput-preset", default="paper", help="preset whose throughput is timed (default paper)")
    args = parser.parse_args(argv)

    from cps4_engine.synthetic import write_synthetic_dataset

    args.out.mkdir(parents=True, exist_ok=True)
    datasets: list[tuple[str, Path, int]] = []
    for name in args.datasets.split(","):
        if name == "none":
            continue
        if name == "synthetic":
            folder = args.synthetic or args.out / "synthetic"
            if not (folder / "MR").is_dir():
                write_synthetic_dataset(folder, args.synthetic_cases, 2026)
            datasets.append((name, folder, args.train_cases or 40))
        elif name == "vb3":
            folder = args.realdata / "vb3_l1l5_t1"
            if not folder.is_dir():
                print(f"skipping vb3: {folder} not found", file=sys.stderr)
                continue
            datasets.append((name, folder, args.train_cases or 14))
        else:
            parser.error(f"unknown dataset {name!r}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    specs: list[RunSpec] = []
    for name, folder, train in datasets:
        for seed in seeds:
            centred, frozen = args.centring != "off", not args.train_text_encoder
            runs = [(variant, args.text_encoder, centred, frozen) for variant in variants]
            if not args.no_text_comparison and args.text_encoder != "tiny":
                runs.append(("both", "tiny", centred, frozen))
            if args.centring == "compare":
                runs.append(("both", args.text_encoder, False, frozen))
            if args.fine_tuning_comparison:
                runs.append(("both", args.text_encoder, centred, not frozen))
            for variant, text, centre, freeze in runs:
                text_tag = "tiny" if text == "tiny" else "default" if text is None else Path(text).name
                weight_tag = "" if args.attention_weight == 1.0 else f"_w{args.attention_weight:g}"
                labeled_tag = "" if args.labeled == 2 else f"_l{args.labeled}"
                precision_tag = "_bf16" if args.cpu_bf16 else ""
                tag = (f"{name}_{variant}{weight_tag}_{text_tag}{'' if freeze else '_finetuned'}{'' if centre else '_raw'}"
                       f"{labeled_tag}{precision_tag}_s{seed}")
                specs.append(RunSpec(name, str(folder), train, args.test_limit, variant, text, seed, args.preset,
                                     args.max_steps, args.device, str(args.out / "runs" / tag), threads,
                                     labeled=args.labeled, validation_every=args.validation_every, freeze_text=freeze,
                                     centre_prompts=centre, attention_weight=args.attention_weight,
                                     validation=args.validation, cpu_bf16=args.cpu_bf16))
    print(f"{len(specs)} runs, {args.jobs} at a time, {threads} CPU threads each", flush=True)
    results = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            for result in pool.map(run_one, specs):
                results.append(result)
                print(f"{result['dataset']} {result['variant_label']} {result['text']} seed {result['seed']}: Dice {result['mean_dice']:.4f}", flush=True)
    else:
        for spec in specs:
            result = run_one(spec)
            results.append(result)
            print(f"{result['dataset']} {result['variant_label']} {result['text']} seed {result['seed']}: Dice {result['mean_dice']:.4f}", flush=True)
    throughput = [
        measure_throughput(args.throughput_preset, args.device, args.throughput_steps, amp, args.text_encoder)
        for amp in (False, True)
    ] if args.throughput_steps > 0 else []
    for entry in throughput:
        print(f"throughput {entry['preset']} amp={entry['amp']}: {entry['slices_per_second']:.1f} slices/s", flush=True)
    command = "python " + " ".join(shlex.quote(part) for part in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    machine = _machine(args.device)
    rows = summarise(results)
    prototype = RunSpec("", "", 0, None, "both", args.text_encoder, 0, "", None, "", "", 1,
                        freeze_text=not args.train_text_encoder, centre_prompts=args.centring != "off",
                        attention_weight=args.attention_weight)
    reference = (prototype.variant_label, prototype.text_label)
    paired = paired_differences(results, reference)
    payload = {"command": command, "machine": machine, "summary": rows, "paired_differences": paired,
               "reference": list(reference), "throughput": throughput, "runs": results}
    (args.out / "results.json").write_text(json.dumps(payload, indent=2, default=lambda value: None) + "\n")
    table = markdown(rows, command, machine, paired, reference)
    if throughput:
        table += "\n| preset | mixed precision | batch | training slices/s |\n|---|---|---|---|\n" + "".join(
            f"| {e['preset']} | {e.get('amp_dtype', 'off') if e['amp'] else 'off'} | {e['batch_size']} | {e['slices_per_second']:.1f} |\n"
            for e in throughput
        )
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
