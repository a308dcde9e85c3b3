"""The whole CPS4 pipeline on synthetic spine phantoms, ending in a report (``cps4 demo``).

Steps: synthesise phantoms (:mod:`cps4_engine.synthetic`) -> stage 1, class-prompt
vision-language pretraining (:mod:`cps4_engine.stage1`) -> stage 2, CPS4 semi-supervised
segmentation with the stage-1 prompt maps (:mod:`cps4_engine.stage2`) -> predict the
held-out test volumes (:mod:`cps4_engine.inference`) -> evaluate them
(:mod:`cps4_engine.evaluate`) -> a report folder.

Cases are used in the dataset's order: the first ``train_cases`` train (``labeled`` of
them with masks, the rest unlabeled), the rest are test volumes that training never sees.

The output folder::

    data/         the synthetic dataset (MRSpineSeg layout)
    stage1/       stage-1 run
    stage2/       stage-2 run
    predictions/  <case>_labels.nii.gz and <case>_confidence.nii.gz per test volume
    report/       report.md, metrics.json, overlay.png, curves.png
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cps4_engine.device import resolve_device
from cps4_engine.errors import CPS4Error
from cps4_engine.evaluate import Evaluation, evaluate, format_table, level_summary
from cps4_engine.events import TrainEvent
from cps4_engine.inference import load_segmenter, output_paths, predict_files
from cps4_engine.io import read_volume, write_text_atomic
from cps4_engine.labels import mrspineseg_scheme
from cps4_engine.report import TrainingCurves, save_overlay, save_training_curves

REPORT_NAME = "report.md"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run.

    Attributes:
        cases: synthetic volumes to generate.
        train_cases: the first this many are training volumes; the rest are test volumes.
        labeled: training volumes that keep their masks.
        seed: seeds the phantoms, the labeled pick and the networks.
        preset: model size preset for both stages (``tiny``, ``cpu``, ``paper``).
        stage1_steps: stage-1 optimiser steps.
        stage2_steps: stage-2 optimiser steps.
        text_encoder: stage-1 text encoder spec (None: the pretrained MiniLM when
            installed; ``"tiny"``: a small random one).
    """

    cases: int
    train_cases: int
    labeled: int
    seed: int = 2026
    preset: str = "cpu"
    stage1_steps: int = 400
    stage2_steps: int = 750
    text_encoder: str | None = None


# The budgets are 10 (default) and 2 (quick) minutes on a 2-core CPU; README.md gives the
# measured times. The default uses the pretrained MiniLM text encoder, kept fixed so that a
# stage-1 step costs little more than the image encoder's, and the cpu preset's 112x112
# slices; quick uses the small random text encoder and the tiny preset's 64x32 slices.
DEFAULT_SETTINGS = DemoSettings(
    cases=16, train_cases=12, labeled=3, preset="cpu", stage1_steps=400, stage2_steps=750, text_encoder=None
)
QUICK_SETTINGS = DemoSettings(
    cases=8, train_cases=6, labeled=2, preset="tiny", stage1_steps=60, stage2_steps=150, text_encoder="tiny"
)


@dataclass
class DemoResult:
    """Where a demo run put its results, and its headline numbers.

    Attributes:
        out: the output folder.
        report: ``report/report.md``.
        mean_dice: mean over test cases of the per-case mean Dice, in [0, 1].
        sd_dice: its sample sd over cases.
        seconds: wall-clock seconds per step of the pipeline.
    """

    out: Path
    report: Path
    mean_dice: float
    sd_dice: float
    seconds: dict[str, float]


class _Progress:
    """Prints a trainer's events sparsely (about ten step lines per run) and records curves."""

    def __init__(self, name: str, echo: Callable[[str], None]) -> None:
        self.curves = TrainingCurves(name)
        self.echo = echo
        self.last_printed = 0

    def __call__(self, event: TrainEvent) -> None:
        self.curves.record(event)
        if event.kind == "step":
            every = max(1, event.max_steps // 10)
            if event.step - self.last_printed >= every or event.step == event.max_steps:
                self.last_printed = event.step
                loss = event.losses.get("total", float("nan"))
                eta = f", {event.eta_s:.0f} s left" if event.eta_s is not None else ""
                self.echo(f"  {self.curves.name} step {event.step}/{event.max_steps}: loss {loss:.3f}{eta}")
        elif event.message and event.kind in ("validation", "cancelled"):
            self.echo(f"  {self.curves.name}: {event.message}")


def _check_settings(settings: DemoSettings) -> None:
    if settings.train_cases < 2 or settings.cases - settings.train_cases < 1:
        raise CPS4Error(
            f"demo needs at least 2 training and 1 test case; got {settings.cases} cases with "
            f"{settings.train_cases} for training"
        )
    if not 1 <= settings.labeled < settings.train_cases:
        raise CPS4Error(
            f"demo needs between 1 and {settings.train_cases - 1} labeled volumes (some must stay "
            f"unlabeled); got {settings.labeled}"
        )
    if settings.stage1_steps < 1 or settings.stage2_steps < 1:
        raise CPS4Error("demo step counts must be at least 1")


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CPS4Error("output path is a file, expected a folder", path=out)
    if out.is_dir() and any(out.iterdir()):
        raise CPS4Error("output folder is not empty; choose another --out (nothing was overwritten)", path=out)
    out.mkdir(parents=True, exist_ok=True)


def default_out_dir() -> Path:
    """``cps4-demo/run-YYYYmmdd-HHMMSS`` in the current folder (a fresh one per run)."""
    return Path("cps4-demo") / time.strftime("run-%Y%m%d-%H%M%S")


def run_demo(
    out: str | Path,
    settings: DemoSettings = DEFAULT_SETTINGS,
    device: str = "auto",
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole pipeline and write the report (see the module doc).

    Args:
        out: an empty or new output folder.
        settings: sizes and step counts.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        echo: receives one progress line at a time.

    Returns:
        :class:`DemoResult`.

    Raises:
        CPS4Error: inconsistent settings, a non-empty output folder, or an unavailable
            device; raised before any work.
    """
    _check_settings(settings)
    resolved = resolve_device(device)
    out = Path(out)
    _prepare_out(out)
    # the pipeline's heavy modules load only once the settings are known to be good
    from cps4_engine.data import open_dataset
    from cps4_engine.stage1 import Stage1Config, pretrain
    from cps4_engine.stage2 import Stage2Config, train
    from cps4_engine.synthetic import write_synthetic_dataset

    data, stage1_dir, stage2_dir = out / "data", out / "stage1", out / "stage2"
    predictions, report_dir = out / "predictions", out / "report"
    seconds: dict[str, float] = {}
    test_count = settings.cases - settings.train_cases

    began = time.perf_counter()
    echo(f"[1/5] synthesising {settings.cases} spine phantoms (seed {settings.seed}) -> {data}")
    write_synthetic_dataset(data, settings.cases, settings.seed)
    seconds["synthesise"] = time.perf_counter() - began

    began = time.perf_counter()
    echo(
        f"[2/5] stage 1: class-prompt pretraining, {settings.labeled} labeled of "
        f"{settings.train_cases} training volumes, {settings.stage1_steps} steps on {resolved}"
    )
    stage1_progress = _Progress("stage 1", echo)
    pretrain(
        Stage1Config(
            data=data,
            out=stage1_dir,
            labeled=settings.labeled,
            preset=settings.preset,
            max_steps=settings.stage1_steps,
            train_cases=settings.train_cases,
            text_encoder=settings.text_encoder,
            device=device,
            seed=settings.seed,
        ),
        callback=stage1_progress,
    )
    seconds["stage 1"] = time.perf_counter() - began

    began = time.perf_counter()
    echo(f"[3/5] stage 2: CPS4 semi-supervised segmentation, {settings.stage2_steps} steps")
    stage2_progress = _Progress("stage 2", echo)
    train(
        Stage2Config(
            data=data,
            out=stage2_dir,
            labeled=settings.labeled,
            method="cps4",
            vlm=stage1_dir,
            preset=settings.preset,
            max_steps=settings.stage2_steps,
            train_cases=settings.train_cases,
            device=device,
            seed=settings.seed,
        ),
        callback=stage2_progress,
    )
    seconds["stage 2"] = time.perf_counter() - began

    began = time.perf_counter()
    test_cases = list(open_dataset(data).cases)[settings.train_cases :]
    echo(f"[4/5] predicting the {test_count} held-out test volumes -> {predictions}")
    model = load_segmenter(stage2_dir, resolved)
    predict_files(model, [case.image_path for case in test_cases], predictions)
    seconds["predict"] = time.perf_counter() - began

    began = time.perf_counter()
    echo("[5/5] evaluating and writing the report")
    gt_folder = Path(test_cases[0].label_path).parent
    evaluation = evaluate(predictions, gt_folder)
    seconds["evaluate"] = time.perf_counter() - began
    report = write_report(
        report_dir,
        evaluation,
        test_cases,
        predictions,
        [stage1_progress.curves, stage2_progress.curves],
        settings,
        resolved,
        seconds,
    )
    echo(f"report: {report}")
    echo(
        f"mean Dice over {evaluation.summary.n_cases} test volumes: "
        f"{100 * evaluation.summary.mean_dice:.1f} ± {100 * evaluation.summary.sd_dice:.1f} %; "
        f"{level_summary(evaluation.summary)}"
    )
    return DemoResult(out, report, evaluation.summary.mean_dice, evaluation.summary.sd_dice, seconds)


def write_report(
    report_dir: Path,
    evaluation: Evaluation,
    test_cases: Sequence[Any],
    predictions: Path,
    curves: list[TrainingCurves],
    settings: DemoSettings,
    device: torch.device,
    seconds: dict[str, float],
) -> Path:
    """Write ``report.md``, ``metrics.json``, ``overlay.png`` and ``curves.png``.

    Args:
        report_dir: the folder to fill.
        evaluation: the test-set evaluation.
        test_cases: the test :class:`~cps4_engine.data.Case` objects, in order.
        predictions: the folder of ``<case>_labels.nii.gz`` files.
        curves: recorded training curves of both stages.
        settings: the demo's settings (recorded in the report).
        device: the device that ran it.
        seconds: wall-clock seconds per pipeline step.

    Returns:
        The path of ``report.md``.
    """
    scheme = mrspineseg_scheme()
    report_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        report_dir / "metrics.json",
        json.dumps({**evaluation.to_dict(), "settings": asdict(settings), "seconds": seconds}, indent=2) + "\n",
    )
    shown = test_cases[0]
    image = read_volume(shown.image_path)
    truth = read_volume(shown.label_path, kind="label")
    predicted = read_volume(output_paths(Path(shown.image_path), predictions)[0], kind="label")
    save_overlay(
        report_dir / "overlay.png",
        image.array,
        image.affine,
        {"ground truth": truth.array, "CPS4 prediction": predicted.array},
        scheme,
        title=f"{shown.case_id}: test volume, sagittal slice",
    )
    save_training_curves(report_dir / "curves.png", curves)

    summary = evaluation.summary
    case_rows = "\n".join(
        f"| {case.case_id} | {len(case.classes)} | {100 * case.mean_dice:.1f} | "
        f"{sum(case.level_named.values())}/{len(case.level_named)} | {case.mean_hd95:.2f} |"
        for case in evaluation.cases
    )
    timing = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    lines = [
        "# CPS4 demo report",
        "",
        f"Synthetic spine phantoms, {settings.cases} volumes (seed {settings.seed}): the first "
        f"{settings.train_cases} train ({settings.labeled} labeled, {settings.train_cases - settings.labeled} "
        f"unlabeled), the last {settings.cases - settings.train_cases} are held-out test volumes. "
        f"Stage 1 ({settings.stage1_steps} steps, text encoder "
        f"{settings.text_encoder or 'the default (pretrained MiniLM when installed)'}) and stage 2 "
        f"(CPS4, {settings.stage2_steps} steps) with the `{settings.preset}` preset on {device}.",
        "",
        f"**Mean Dice on the test volumes: {100 * summary.mean_dice:.1f} ± {100 * summary.sd_dice:.1f} %** "
        f"(mean ± sd over {summary.n_cases} cases of the per-case mean over the foreground classes present; "
        f"HD95 {summary.mean_hd95:.2f} ± {summary.sd_hd95:.2f} mm). A class the prediction misses scores "
        "Dice 0 and HD95 = the volume diagonal.",
        "",
        f"**Level naming:** {level_summary(summary)}.",
        "",
        "## Dice and HD95 per class (test volumes)",
        "",
        format_table(evaluation, scheme.short_names(), markdown=True),
        "",
        "## Per case",
        "",
        "| case | classes | Dice % | levels named right | HD95 mm |",
        "|---|---|---|---|---|",
        case_rows,
        "",
        "## Figures",
        "",
        "![predicted labels over a sagittal slice](overlay.png)",
        "",
        "![training curves of both stages](curves.png)",
        "",
        "## How this was made",
        "",
        f"- Command: `cps4 demo` with settings `{json.dumps(asdict(settings))}`.",
        f"- Time: {timing}; machine: {platform.platform()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads.",
        "- These are demo-sized runs on phantoms, not benchmark numbers (see BENCHMARKS.md).",
        "",
    ]
    path = report_dir / REPORT_NAME
    write_text_atomic(path, "\n".join(lines))
    return path

