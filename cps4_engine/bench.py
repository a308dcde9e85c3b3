"""``cps4 bench``: the stage-2 benchmark table of ``../shared/BENCHMARK_PROTOCOL.md``.

For every dataset, seed and labeled count it trains the methods of :data:`BENCH_METHODS`
(supervised-only, mean teacher, UniMatch, CPS4 on mean teacher and CPS4 on UniMatch, the
stage-1 model pretrained on the same labeled volumes), plus full supervision
(every training volume labeled but the validation ones) as the ceiling, and scores each
run's predictions on the test volumes in their own geometry (Dice and HD95 per case,
:func:`cps4_engine.metrics.case_metrics`). It also measures

* pseudo-label quality: Dice of the pseudo-labels against the hidden truth of the
  unlabeled training volumes, for the final teacher alone, the prompt maps alone and
  the fused CPS4 pseudo-label;
* the stage-2 step time of CPS4 against mean teacher, the two trained one after the other
  in one process with nothing else running (a ratio);
* predict time and peak memory per volume, the largest real case included.

Protocols (cases in file-name/index order): ``synthetic`` — ``cps4 synth --cases 60
--seed 2026``, first 40 training, last 20 test, 2 and 4 labeled; ``vb3_l1l5_t1`` — first
14 training, last 6 test, 1 and 2 labeled. Each dataset's training volumes are linked into
their own MRSpineSeg-layout folder, so neither stage can see a test volume. Runs execute in
``jobs`` worker processes; results go to ``bench.json`` and ``bench.md`` in ``out``.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cps4_engine.checkpoint import write_json_atomically
from cps4_engine.errors import CPS4Error
from cps4_engine.layouts import image_extension, mrspineseg_case_paths
from cps4_engine.presets import DEFAULT_PROMPT_WEIGHT

# A benchmark row's method name -> the stage-2 method and base it trains with.
BENCH_METHODS: dict[str, tuple[str, str | None]] = {
    "supervised": ("supervised", None),
    "mean-teacher": ("mean-teacher", None),
    "unimatch": ("unimatch", None),
    "cps4": ("cps4", "mean-teacher"),
    "cps4-unimatch": ("cps4", "unimatch"),
}
SEMI_SUPERVISED = tuple(name for name, (method, _) in BENCH_METHODS.items() if method != "supervised")
METHOD_ORDER = tuple(BENCH_METHODS)
FULL = "full"
LARGEST_REAL_SET = "vb2_t11l5_t2"


@dataclass(frozen=True)
class Protocol:
    """How one dataset is split for the benchmark.

    Attributes:
        name: ``synthetic`` or a subset of the real-data index (e.g. ``vb3_l1l5_t1``).
        train: the first ``train`` cases are training volumes.
        test: the last ``test`` cases are test volumes.
        labeled: labeled-volume counts to run (drawn from the training volumes by seed).
        synthetic_cases: cases to generate (synthetic only).
        synthetic_seed: generator seed (synthetic only).
    """

    name: str
    train: int
    test: int
    labeled: tuple[int, ...]
    synthetic_cases: int = 0
    synthetic_seed: int = 2026


PROTOCOLS: dict[str, Protocol] = {
    "synthetic": Protocol("synthetic", train=40, test=20, labeled=(2, 4), synthetic_cases=60),
    "vb3_l1l5_t1": Protocol("vb3_l1l5_t1", train=14, test=6, labeled=(1, 2)),
    "vb2_t11l5_t2": Protocol("vb2_t11l5_t2", train=4, test=2, labeled=(1,)),
}


@dataclass
class BenchSettings:
    """What to run.

    Attributes:
        out: folder for data links, runs, ``bench.json`` and ``bench.md``.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        preset: size preset of both stages.
        max_steps: stage-2 steps per run (None: the preset's).
        vlm_steps: stage-1 steps per pretraining (None: the preset's).
        seeds: seeds to repeat every configuration with.
        protocols: datasets and their splits.
        jobs: worker processes running configurations in parallel.
        realdata: the real-data folder (None: ``$CPS4_REALDATA`` or ``../shared/realdata``).
        validation: validation volumes carved from the training volumes (count/fraction).
        timing_steps: steps of each method in the side-by-side step-time measurement.
        full_supervision: also run the full-supervision ceiling.
        text_encoder: stage-1 text encoder (None: the pretrained default).
        freeze_text_encoder: stage 1 keeps the text backbone fixed (only its projection
            trains); False fine-tunes it.
        prompt_weight: weight of the prompt maps in CPS4's fused pseudo-labels.
        methods: the rows of :data:`BENCH_METHODS` to run at each labeled count (the
            full-supervision ceiling follows ``full_supervision``).
        time_largest_real: also time prediction on the largest real volume.
        command: the command line that started the benchmark (recorded in the report).
    """

    out: Path
    device: str = "auto"
    preset: str = "cpu"
    max_steps: int | None = None
    vlm_steps: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    protocols: tuple[Protocol, ...] = tuple(PROTOCOLS.values())
    jobs: int = 1
    realdata: Path | None = None
    validation: int | float = 0.1
    timing_steps: int = 30
    full_supervision: bool = True
    text_encoder: str | None = None
    freeze_text_encoder: bool = True
    prompt_weight: float = DEFAULT_PROMPT_WEIGHT
    methods: tuple[str, ...] = METHOD_ORDER
    time_largest_real: bool = True
    command: str = ""


@dataclass
class PreparedDataset:
    """A dataset ready for the benchmark: its training folder and test volumes."""

    name: str
    train_dir: str
    test_cases: list[dict[str, str]]
    train_case_ids: list[str]
    labeled: tuple[int, ...]
    train_count: int


@dataclass
class Task:
    """One unit of work for a worker process."""

    kind: str
    dataset: str
    seed: int
    labeled: int | str
    method: str = ""
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.dataset}/seed{self.seed}/labeled{self.labeled}/{self.method}".rstrip("/")


def find_realdata(explicit: Path | None) -> Path | None:
    """The real-data folder: ``explicit``, ``$CPS4_REALDATA`` or ``../shared/realdata``."""
    candidates = [explicit, os.environ.get("CPS4_REALDATA"),
                  Path(__file__).resolve().parents[1].parent / "shared" / "realdata"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "index.json").is_file():
            return Path(candidate)
    return None


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(Path(source).resolve())


def prepare_dataset(protocol: Protocol, settings: BenchSettings) -> PreparedDataset:
    """Generate or locate a dataset and link its training volumes into their own folder.

    Raises:
        CPS4Error: the real data is missing or has fewer cases than the protocol needs.
    """
    from cps4_engine.data import open_dataset

    data_root = Path(settings.out) / "data"
    if protocol.name == "synthetic":
        from cps4_engine.synthetic import write_synthetic_dataset

        source = data_root / f"synthetic_{protocol.synthetic_cases}_seed{protocol.synthetic_seed}"
        if not (source / "MR").is_dir():
            write_synthetic_dataset(source, protocol.synthetic_cases, protocol.synthetic_seed)
        cases = list(open_dataset(source).cases)
    else:
        root = find_realdata(settings.realdata)
        if root is None:
            raise CPS4Error(f"dataset {protocol.name} needs the real cases (set CPS4_REALDATA or --realdata)")
        cases = list(open_dataset(root / protocol.name).cases)
    if len(cases) < protocol.train + protocol.test:
        raise CPS4Error(
            f"dataset {protocol.name} has {len(cases)} cases; the protocol needs "
            f"{protocol.train} training + {protocol.test} test"
        )
    train_dir = data_root / f"{protocol.name}_train"
    if train_dir.exists():
        shutil.rmtree(train_dir)
    for number, case in enumerate(cases[: protocol.train], start=1):
        image, mask = mrspineseg_case_paths(train_dir, number, image_extension(case.image_path))
        _link(case.image_path, image)
        _link(case.label_path, mask)
    test_cases = [
        {"case_id": str(case.case_id), "image": str(case.image_path), "label": str(case.label_path)}
        for case in cases[len(cases) - protocol.test :]
    ]
    return PreparedDataset(
        name=protocol.name, train_dir=str(train_dir), test_cases=test_cases,
        train_case_ids=[str(case.case_id) for case in cases[: protocol.train]],
        labeled=protocol.labeled, train_count=protocol.train,
    )


def _validation_count(settings: BenchSettings, train_count: int) -> int:
    if isinstance(settings.validation, float):
        return max(1, int(round(settings.validation * train_count))) if settings.validation > 0 else 0
    return int(settings.validation)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def _run_dir(settings: dict[str, Any], task: Task) -> Path:
    return Path(settings["out"]) / "runs" / task.key.replace("/", "_")


def _vlm_task(settings: dict[str, Any], task: Task) -> dict[str, Any]:
    from cps4_engine.stage1 import Stage1Config, pretrain

    out = _run_dir(settings, task)
    if out.exists():
        shutil.rmtree(out)
    began = time.perf_counter()
    config = Stage1Config(
        data=task.payload["train_dir"], out=out, labeled=task.labeled, preset=settings["preset"],
        max_steps=settings["vlm_steps"], device=settings["device"], seed=task.seed,
        validation=settings["validation"], text_encoder=settings["text_encoder"],
        freeze_text_encoder=settings["freeze_text_encoder"],
    )
    pretrain(config)
    return {"run": str(out), "seconds": time.perf_counter() - began}


def _score_test_volumes(
    run: Path, test_cases: list[dict[str, str]], device: str, level_step: bool = True,
    shifts: Sequence[float] | None = None,
) -> dict[str, Any]:
    from cps4_engine.inference import load_segmenter, predict_volume
    from cps4_engine.options import DEFAULT_TEST_TIME_SHIFTS
    from cps4_engine.io import read_volume
    from cps4_engine.metrics import case_metrics, summarize

    model = load_segmenter(run, device)
    scored = []
    for case in test_cases:
        image = read_volume(case["image"], kind="image")
        truth = read_volume(case["label"], kind="label")
        prediction = predict_volume(model, image, keep_probabilities=False, level_step=level_step,
                                    shifts=DEFAULT_TEST_TIME_SHIFTS if shifts is None else shifts)
        scored.append(case_metrics(prediction.labels, truth.array, truth.spacing, case_id=case["case_id"]))
    summary = summarize(scored)
    return {
        "dice": summary.mean_dice, "dice_sd_cases": summary.sd_dice,
        "hd95": summary.mean_hd95, "hd95_sd_cases": summary.sd_hd95,
        "level_accuracy": summary.level_accuracy,
        "cases_all_levels_right": summary.cases_all_levels_right,
        "spine_dice": summary.mean_spine_dice,
        "cases": [c.to_dict() for c in scored],
    }


def pseudo_label_quality(run: Path, vlm_run: Path | None, device: str) -> dict[str, float]:
    """Dice of pseudo-labels against the hidden truth of a run's unlabeled volumes.

    The network that made the run's pseudo-labels, at its last step (the EMA teacher,
    ``teacher.safetensors``, for mean teacher; the student, ``last.safetensors``, for
    UniMatch), labels every unlabeled training volume of its ``split.json``; with a stage-1 run, the prompt maps and the fused
    pseudo-label (:func:`cps4_engine.fusion.combine_with_teacher`, with the run's prompt
    threshold and the weights it fused with, per class where it recorded them) are scored
    too. The
    labels are restored to each volume's grid and scored like predictions.

    Args:
        run: a stage-2 run folder.
        vlm_run: the stage-1 run it trained with, or None.
        device: where to run the networks.

    Returns:
        Mean Dice over volumes by source: ``teacher`` and, with ``vlm_run``, ``prompt`` and
        ``fused``.
    """
    import torch

    from cps4_engine.checkpoint import load_weights, read_run_config
    from cps4_engine.data import Split
    from cps4_engine.device import resolve_device
    from cps4_engine.fusion import combine_with_teacher
    from cps4_engine.io import read_volume
    from cps4_engine.metrics import case_metrics
    from cps4_engine.models.segmenter import build_segmenter
    from cps4_engine.preprocess import prepare_volume, restore_labels, with_context
    from cps4_engine.inference import predict_slices
    from cps4_engine.stage2 import compute_prompt_cache

    torch_device = resolve_device(device)
    config = read_run_config(run, stage=2, scheme="mrspineseg")
    teacher = build_segmenter(config["segmenter"]).to(torch_device)
    # Mean teacher labels with its EMA teacher; UniMatch with the student itself.
    labeller = "last.safetensors" if config.get("base") == "unimatch" else "teacher.safetensors"
    teacher.load_state_dict(load_weights(run / labeller, torch_device))
    teacher.eval()
    vlm = None
    if vlm_run is not None:
        from cps4_engine import classmaps

        vlm = classmaps.load_vlm(vlm_run, torch_device)
    size = tuple(config["segmenter"]["slice_size"])
    threshold = float(config["settings"]["prompt_threshold"])
    # The weights the run fused with: per class when it weighed the maps by reliability.
    recorded = config.get("prompt_weights")
    prompt_weight: float | torch.Tensor = (
        torch.tensor(recorded, dtype=torch.float32) if recorded is not None else float(config["settings"]["prompt_weight"])
    )
    split = Split.load(run / "split.json")
    scores: dict[str, list[float]] = {"teacher": []}
    if vlm is not None:
        scores.update(prompt=[], fused=[])
    for case in split.unlabeled:
        if case.label_path is None:
            continue
        volume = read_volume(case.image_path, kind="image")
        truth = read_volume(case.label_path, kind="label")
        stack = prepare_volume(volume, size, keep_aspect=bool(config["segmenter"].get("keep_aspect", False)))
        images = torch.from_numpy(stack.images).to(torch_device)
        context = int(config["segmenter"].get("context_slices", 0))
        teacher_probs = predict_slices(teacher, with_context(images, context), batch_size=16).to(torch_device)
        prompt_probs = compute_prompt_cache(vlm, images, torch_device).float() if vlm is not None else None
        for source in scores:
            combined = combine_with_teacher(
                teacher_probs, prompt_probs if prompt_probs is not None else teacher_probs[:, 1:],
                mode=source, threshold=threshold, prompt_weight=prompt_weight,  # type: ignore[arg-type]
                class_dim=1,
            )
            labels = restore_labels(stack, combined.labels)
            scores[source].append(case_metrics(labels, truth.array, truth.spacing).mean_dice)
    return {source: float(np.nanmean(values)) if values else math.nan for source, values in scores.items()}


def _train_task(settings: dict[str, Any], task: Task) -> dict[str, Any]:
    from cps4_engine.stage2 import Stage2Config, train

    out = _run_dir(settings, task)
    if out.exists():
        shutil.rmtree(out)
    vlm_run = task.payload.get("vlm_run")
    began = time.perf_counter()
    method, base = BENCH_METHODS[task.method]
    train(Stage2Config(
        data=task.payload["train_dir"], out=out, labeled=task.payload["labeled_count"],
        method=method, base=base, vlm=vlm_run, preset=settings["preset"], max_steps=settings["max_steps"],
        device=settings["device"], seed=task.seed, validation=settings["validation"],
        prompt_weight=settings["prompt_weight"],
    ))
    seconds = time.perf_counter() - began
    result = {"run": str(out), "train_seconds": seconds}
    result.update(_score_test_volumes(out, task.payload["test_cases"], settings["device"]))
    if task.method in SEMI_SUPERVISED:
        result["pseudo_label_dice"] = pseudo_label_quality(
            out, Path(vlm_run) if vlm_run else None, settings["device"]
        )
    if vlm_run:
        result["vlm_labeled_match"] = _same_labeled(Path(vlm_run), out)
    return result


def _same_labeled(vlm_run: Path, stage2_run: Path) -> bool:
    """Whether stage 1 and stage 2 used the same labeled volumes (a fairness check)."""
    from cps4_engine.data import Split

    first = Split.load(vlm_run / "split.json")
    second = Split.load(stage2_run / "split.json")
    return sorted(str(c.case_id) for c in first.labeled) == sorted(str(c.case_id) for c in second.labeled)


def _timing_task(settings: dict[str, Any], task: Task) -> dict[str, Any]:
    """Mean teacher and CPS4 trained one after the other; median step seconds of each."""
    from cps4_engine.stage2 import Stage2Config, train

    times: dict[str, float] = {}
    for method in ("mean-teacher", "cps4"):
        out = Path(settings["out"]) / "runs" / f"timing_{method}"
        if out.exists():
            shutil.rmtree(out)
        steps = int(settings["timing_steps"])
        train(Stage2Config(
            data=task.payload["train_dir"], out=out, labeled=task.payload["labeled_count"], method=method,
            vlm=task.payload["vlm_run"] if method == "cps4" else None, preset=settings["preset"],
            max_steps=steps, validation_every=steps + 1, device=settings["device"], seed=task.seed,
            validation=settings["validation"],
        ))
        history = json.loads((out / "history.json").read_text())
        step_seconds = [entry["step_s"] for entry in history["steps"]][2:] or [
            entry["step_s"] for entry in history["steps"]
        ]
        times[method] = float(np.median(step_seconds))
    return {
        "mean_teacher_step_s": times["mean-teacher"], "cps4_step_s": times["cps4"],
        "ratio_cps4_over_mean_teacher": times["cps4"] / times["mean-teacher"],
        "steps": int(settings["timing_steps"]),
    }


def _predict_timing_task(settings: dict[str, Any], task: Task) -> dict[str, Any]:
    """Predict time and peak memory per volume with a trained run."""
    import torch

    from cps4_engine.device import resolve_device
    from cps4_engine.inference import load_segmenter, predict_volume
    from cps4_engine.io import read_volume

    device = resolve_device(settings["device"])
    model = load_segmenter(task.payload["run"], device)
    rows = []
    for path in task.payload["images"]:
        volume = read_volume(path, kind="image")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        predict_volume(model, volume, keep_probabilities=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        row = {"image": Path(path).name, "shape": list(volume.shape), "seconds": seconds,
               "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
        if device.type == "cuda":
            row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
    return {"run": task.payload["run"], "volumes": rows}


TASK_FUNCTIONS: dict[str, Callable[[dict[str, Any], Task], dict[str, Any]]] = {
    "vlm": _vlm_task, "train": _train_task, "timing": _timing_task, "predict": _predict_timing_task,
}


def _execute(settings: dict[str, Any], task: Task) -> tuple[str, dict[str, Any]]:
    try:
        return task.key, TASK_FUNCTIONS[task.kind](settings, task)
    except Exception as error:  # one failed configuration must not lose the others
        return task.key, {"error": f"{type(error).__name__}: {error}"}


class _Runner:
    """Runs tasks inline (``jobs == 1``) or in a pool of spawned worker processes."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.pool = None
        if jobs > 1:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(threads,),
            )

    def run(self, settings: dict[str, Any], tasks: list[Task],
            follow_up: Callable[[Task, dict[str, Any]], list[Task]],
            report: Callable[[str, dict[str, Any]], None]) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        if self.pool is None:
            queue = list(tasks)
            while queue:
                task = queue.pop(0)
                key, result = _execute(settings, task)
                results[key] = result
                report(key, result)
                queue.extend(follow_up(task, result))
            return results
        pending = {self.pool.submit(_execute, settings, task): task for task in tasks}
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                key, result = future.result()
                results[key] = result
                report(key, result)
                for extra in follow_up(task, result):
                    pending[self.pool.submit(_execute, settings, extra)] = extra
        return results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _plan(datasets: list[PreparedDataset], settings: BenchSettings) -> tuple[list[Task], dict[str, list[Task]]]:
    """First-wave tasks, and the CPS4 tasks waiting for each stage-1 pretraining."""
    first: list[Task] = []
    waiting: dict[str, list[Task]] = {}
    for dataset in datasets:
        base = {"train_dir": dataset.train_dir, "test_cases": dataset.test_cases}
        for seed in settings.seeds:
            for count in dataset.labeled:
                payload = dict(base, labeled_count=count)
                for method in settings.methods:
                    if BENCH_METHODS[method][0] != "cps4":
                        first.append(Task("train", dataset.name, seed, count, method, dict(payload)))
                prompted = [Task("train", dataset.name, seed, count, method, dict(payload))
                            for method in settings.methods if BENCH_METHODS[method][0] == "cps4"]
                if prompted:  # stage 1 is pretrained only for the methods that read its maps
                    vlm = Task("vlm", dataset.name, seed, count, payload=dict(payload))
                    first.append(vlm)
                    waiting[vlm.key] = prompted
            if settings.full_supervision:
                full = dataset.train_count - _validation_count(settings, dataset.train_count)
                first.append(Task("train", dataset.name, seed, FULL, "supervised",
                                  dict(base, labeled_count=full)))
    # Longest first: stage-1 pretrainings unlock the CPS4 runs.
    first.sort(key=lambda task: task.kind != "vlm")
    return first, waiting


def _mean_sd(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return float(np.mean(finite)), sd, len(finite)


def summarize_results(results: dict[str, dict[str, Any]], settings: BenchSettings) -> dict[str, Any]:
    """Mean ± sd over seeds per dataset, labeled count and method."""
    rows, pseudo = [], []
    for protocol in settings.protocols:
        counts: list[int | str] = list(protocol.labeled) + ([FULL] if settings.full_supervision else [])
        for count in counts:
            methods = ("supervised",) if count == FULL else [m for m in METHOD_ORDER if m in settings.methods]
            for method in methods:
                runs = [results.get(Task("train", protocol.name, seed, count, method).key, {}) for seed in settings.seeds]
                dice = _mean_sd([r.get("dice") for r in runs])
                hd95 = _mean_sd([r.get("hd95") for r in runs])
                levels = _mean_sd([r.get("level_accuracy") for r in runs])
                spine = _mean_sd([r.get("spine_dice") for r in runs])
                seconds = _mean_sd([r.get("train_seconds") for r in runs])
                errors = [r["error"] for r in runs if "error" in r]
                rows.append({"dataset": protocol.name, "labeled": count, "method": method,
                             "dice_mean": dice[0], "dice_sd": dice[1], "hd95_mean": hd95[0],
                             "hd95_sd": hd95[1], "level_accuracy_mean": levels[0], "level_accuracy_sd": levels[1],
                             "spine_dice_mean": spine[0], "spine_dice_sd": spine[1],
                             "all_levels_right": [r.get("cases_all_levels_right") for r in runs if "dice" in r],
                             "train_seconds": seconds[0], "runs": dice[2], "errors": errors})
                if method in SEMI_SUPERVISED:
                    with_prompts = BENCH_METHODS[method][0] == "cps4"
                    sources = ("teacher", "prompt", "fused") if with_prompts else ("teacher",)
                    for source in sources:
                        values = [r.get("pseudo_label_dice", {}).get(source) for r in runs]
                        mean, sd, n = _mean_sd(values)
                        pseudo.append({"dataset": protocol.name, "labeled": count, "method": method,
                                       "source": source, "dice_mean": mean, "dice_sd": sd, "runs": n})
    return {"table": rows, "pseudo_labels": pseudo}


def machine_description(device: str) -> dict[str, Any]:
    """CPU, GPU and library versions of this machine."""
    import torch

    from cps4_engine.checkpoint import library_versions
    from cps4_engine.device import resolve_device

    described = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                 "cpu_count": os.cpu_count(), "device": str(resolve_device(device)),
                 "versions": library_versions()}
    if torch.cuda.is_available():
        described["gpu"] = torch.cuda.get_device_name(0)
    return described


def _format(mean: float, sd: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The benchmark tables as markdown."""
    lines = ["# Stage-2 benchmark", "", f"Command: `{report['settings']['command']}`", "",
             f"Machine: {json.dumps(report['machine'])}", "",
             f"Seeds {report['settings']['seeds']}; preset `{report['settings']['preset']}`, "
             f"stage-2 steps {report['settings']['max_steps']}, stage-1 steps {report['settings']['vlm_steps']}; "
             "Dice and HD95 (mm) per test case in its own geometry, mean over foreground classes "
             "present; level accuracy (share of structures named right by majority), the cases with "
             "every level right per seed, and the spine Dice (all foreground as one); the table gives "
             "mean ± sd over seeds of the per-seed means over cases, and the mean wall time of one "
             "stage-2 run.", "",
             "## Test volumes", "",
             "| dataset | labeled | method | Dice | level accuracy | all levels right | spine Dice | HD95 (mm) "
             "| train s | runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["summary"]["table"]:
        note = f" (failed: {row['errors'][0]})" if row["errors"] else ""
        right = "+".join(str(n) for n in row.get("all_levels_right", [])) or "—"
        seconds = row.get("train_seconds", math.nan)
        lines.append(f"| {row['dataset']} | {row['labeled']} | {row['method']} | "
                     f"{_format(row['dice_mean'], row['dice_sd'])} | "
                     f"{_format(row.get('level_accuracy_mean', math.nan), row.get('level_accuracy_sd', math.nan))} | "
                     f"{right} | {_format(row.get('spine_dice_mean', math.nan), row.get('spine_dice_sd', math.nan))} | "
                     f"{_format(row['hd95_mean'], row['hd95_sd'], 1)} | "
                     f"{seconds:.0f} | {row['runs']}{note} |")
    lines += ["", "## Pseudo-labels on the unlabeled training volumes (Dice against the hidden truth)", "",
              "| dataset | labeled | run | pseudo-label source | Dice | runs |", "|---|---|---|---|---|---|"]
    for row in report["summary"]["pseudo_labels"]:
        lines.append(f"| {row['dataset']} | {row['labeled']} | {row['method']} | {row['source']} | "
                     f"{_format(row['dice_mean'], row['dice_sd'])} | {row['runs']} |")
    timing = report.get("step_time", {})
    lines += ["", "## Stage-2 step time, side by side in one process", ""]
    if "ratio_cps4_over_mean_teacher" in timing:
        lines.append(f"Mean teacher {timing['mean_teacher_step_s'] * 1000:.1f} ms/step, CPS4 "
                     f"{timing['cps4_step_s'] * 1000:.1f} ms/step (median of {timing['steps']} steps): "
                     f"ratio CPS4 / mean teacher = {timing['ratio_cps4_over_mean_teacher']:.2f}.")
    else:
        lines.append(f"Not measured ({timing.get('error', 'no CPS4 run')}).")
    prediction = report.get("predict", {})
    lines += ["", "## Predict time and peak memory per volume", "",
              "| volume | shape | seconds | peak GPU MB | process peak RSS MB |", "|---|---|---|---|---|"]
    for row in prediction.get("volumes", []):
        gpu = f"{row['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in row else "—"
        lines.append(f"| {row['image']} | {'×'.join(str(n) for n in row['shape'])} | {row['seconds']:.3f} | "
                     f"{gpu} | {row['process_peak_rss_mb']:.0f} |")
    if "error" in prediction:
        lines.append(f"\nNot measured ({prediction['error']}).")
    return "\n".join(lines) + "\n"


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole benchmark and write ``bench.json`` and ``bench.md`` into ``settings.out``.

    Returns:
        The report written to ``bench.json``.
    """
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    if settings.jobs < 1:
        raise CPS4Error(f"--jobs {settings.jobs} must be at least 1")
    unknown = [method for method in settings.methods if method not in BENCH_METHODS]
    if unknown or not settings.methods:
        raise CPS4Error(f"bench methods {','.join(unknown) or '(none)'} unknown; choose from {', '.join(BENCH_METHODS)}")
    datasets = [prepare_dataset(protocol, settings) for protocol in settings.protocols]
    plain = {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(settings).items()}
    plain["protocols"] = [asdict(p) for p in settings.protocols]
    first, waiting = _plan(datasets, settings)
    started = time.perf_counter()

    skipped: dict[str, dict[str, Any]] = {}

    def follow_up(task: Task, result: dict[str, Any]) -> list[Task]:
        dependents = waiting.get(task.key, [])
        if result.get("run"):
            for dependent in dependents:
                dependent.payload["vlm_run"] = result["run"]
            return dependents
        for dependent in dependents:
            skipped[dependent.key] = {"error": f"stage-1 pretraining failed: {result.get('error')}"}
        return []

    def report_progress(key: str, result: dict[str, Any]) -> None:
        state = f"failed: {result['error']}" if "error" in result else "done"
        log(f"[{time.perf_counter() - started:7.1f} s] {key}: {state}")

    runner = _Runner(settings.jobs)
    try:
        results = runner.run(plain, first, follow_up, report_progress)
    finally:
        runner.close()
    results.update(skipped)

    solo = _Runner(1)
    extra_results: dict[str, Any] = {}
    first_dataset = datasets[0]
    seed, count = settings.seeds[0], first_dataset.labeled[0]
    vlm_run = results.get(Task("vlm", first_dataset.name, seed, count).key, {}).get("run")
    timing = Task("timing", first_dataset.name, seed, count,
                  payload={"train_dir": first_dataset.train_dir, "labeled_count": count, "vlm_run": vlm_run})
    images = [case["image"] for dataset in datasets for case in dataset.test_cases]
    largest = _largest_real_image(settings) if settings.time_largest_real else None
    if largest is not None:
        images.append(largest)
    trained = results.get(Task("train", first_dataset.name, seed, count, "cps4").key, {}).get("run")
    tasks = [timing] if vlm_run else []
    if trained:
        tasks.append(Task("predict", first_dataset.name, seed, count, payload={"run": trained, "images": images}))
    extra_results = solo.run(plain, tasks, lambda task, result: [], report_progress)

    report = {
        "settings": plain,
        "machine": machine_description(settings.device),
        "datasets": [asdict(d) for d in datasets],
        "results": results,
        "summary": summarize_results(results, settings),
        "step_time": extra_results.get(timing.key, {"error": "no stage-1 run to time CPS4 with"}),
        "predict": next((v for k, v in extra_results.items() if k.startswith("predict/")),
                        {"error": "no trained CPS4 run"}),
        "seconds": time.perf_counter() - started,
    }
    write_json_atomically(out / "bench.json", report)
    from cps4_engine.io import write_text_atomic

    write_text_atomic(out / "bench.md", render_markdown(report))
    return report


def _largest_real_image(settings: BenchSettings) -> str | None:
    """The largest volume present of the real set with the biggest scans, if any is here."""
    root = find_realdata(settings.realdata)
    if root is None:
        return None
    index = json.loads((root / "index.json").read_text())
    cases = [case for case in index.get(LARGEST_REAL_SET, {}).get("cases", []) if (root / case["image"]).is_file()]
    if not cases:
        return None
    biggest = max(cases, key=lambda case: int(np.prod(case["shape"])))
    return str(root / biggest["image"])


def smoke_settings(out: Path, **overrides: Any) -> BenchSettings:
    """A seconds-long configuration for tests: tiny preset, few cases, steps and seeds."""
    protocol = Protocol("synthetic", train=4, test=1, labeled=(1,), synthetic_cases=5)
    settings = BenchSettings(out=out, device="cpu", preset="tiny", max_steps=2, vlm_steps=2, seeds=(0,),
                             protocols=(protocol,), jobs=1, validation=1, timing_steps=3,
                             text_encoder="tiny", time_largest_real=False)
    return replace(settings, **overrides)
