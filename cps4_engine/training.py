"""The one training loop both stages run: checkpoints, resume, schedule, validation, events.

A stage supplies a :class:`StageTask` — its networks, its optimiser, one optimisation
step's loss and its validation — and :class:`TrainingLoop` does everything else, the same
way for stage 1 and stage 2:

- **run folder**: :func:`check_run_folder` refuses to overwrite a run without ``resume``
  and to resume a folder without a training state; a fresh run writes its own files
  (:meth:`StageTask.write_new_run`) before the first step.
- **resume**: the last weights, the networks the task names in
  :meth:`StageTask.extra_weights` (e.g. stage 2's teacher), the optimiser, the AMP scaler,
  the sampling generators, the best score and the history up to the saved step.
- **schedule**: linear warm-up over the first ``warmup_fraction`` of the steps, then cosine
  decay to ``floor`` times the base learning rate (``torch.optim.lr_scheduler.LambdaLR``),
  or a constant rate; the global gradient norm clipped to ``gradient_clip``.
- **AMP**: autocast on CUDA (bfloat16 where supported, else float16 with a gradient
  scaler); on the CPU bfloat16 autocast of the training steps only when ``cpu_bf16`` asks
  for it; nothing on MPS.
- **validation** every ``validation_every`` steps and at the last: the task's metric for
  each candidate network (e.g. student and teacher); the best candidate so far is saved as
  ``model.safetensors``; then the last weights, the extra networks, the training state and
  ``history.json`` are saved (atomically).
- **events** (:class:`~cps4_engine.events.TrainEvent`): ``start``, ``step`` (losses, ETA),
  ``validation``, ``checkpoint``, ``end``; ``cancelled`` after a checkpoint when the
  :class:`~cps4_engine.events.CancelToken` is set, which takes effect before the next step.
- **several processes** (``torchrun``): the task's step runs on every rank; only rank 0
  writes and yields events, and a cancel on any rank stops all of them
  (:mod:`cps4_engine.distributed`); there every rank yields ``cancelled`` (the others
  with no message), so every process exits as cancelled.
  At each checkpoint rank 0 gathers every rank's random states into the training state,
  so that on resume each rank continues its own draws, not rank 0's.

Batches come from torch ``DataLoader`` objects over the stage's ``Dataset`` with a sampler
that draws one batch per pass (:func:`batches`), so the draws are those of the sampler's
generator, which the checkpoint saves.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from cps4_engine import distributed
from cps4_engine.checkpoint import (
    load_training_state,
    load_weights,
    random_states,
    read_history,
    save_training_state,
    save_weights,
    write_json_atomically,
)
from cps4_engine.errors import CPS4Error
from cps4_engine.events import CancelToken, TrainEvent

BEST_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
STATE_FILE = "train_state.safetensors"
HISTORY_FILE = "history.json"
SPLIT_FILE = "split.json"
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


def check_run_folder(out: Path, resume: bool, stage: int | None = None,
                     same_settings: dict[str, Any] | None = None) -> None:
    """Refuse to overwrite a run, to resume where there is nothing to resume, or to resume
    with other settings.

    A folder whose run was killed before its first checkpoint (``config.json`` but no
    weights or training state) holds nothing to lose and is started afresh. Under
    ``torchrun`` only rank 0 checks: it may already have started this very run when
    another rank gets here.

    Args:
        out: the run folder.
        resume: the run is to be continued.
        stage: 1 or 2: a resumed folder must be a run of this stage (None: not checked).
        same_settings: settings a resumed run must have been started with, by the names
            of ``config.json["settings"]`` (e.g. method, data, preset).

    Raises:
        CPS4Error: ``out`` holds a run and ``resume`` is False; ``resume`` is True and
            ``out`` has no training state, is not a run of ``stage`` or was started with
            other ``same_settings``.
    """
    import os

    from cps4_engine.checkpoint import check_resume_matches, read_run_config

    if int(os.environ.get("RANK", "0")) != 0:
        return
    checkpointed = (out / STATE_FILE).is_file() or (out / LAST_FILE).is_file()
    if (out / "config.json").exists() and not resume and checkpointed:
        raise CPS4Error("already holds a run; pass --resume to continue it or choose another --out", path=out)
    if resume:
        if not (out / STATE_FILE).is_file():
            raise CPS4Error(f"nothing to resume (no {STATE_FILE})", path=out)
        if stage is not None:
            recorded = read_run_config(out, stage=stage, scheme="mrspineseg")
            check_resume_matches(recorded, same_settings or {}, out)


def learning_rate_factor(step: int, max_steps: int, schedule: str, warmup_fraction: float, floor: float) -> float:
    """Multiplier of the base learning rate for optimiser step ``step + 1`` (0-based ``step``).

    ``cosine``: ``(step + 1) / warmup`` during the warm-up, then
    ``floor + (1 - floor) * (1 + cos(pi * progress)) / 2``; ``constant``: 1.
    """
    if schedule == "constant":
        return 1.0
    warmup = max(1, int(warmup_fraction * max_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batches(dataset: Dataset, batch_size: int, generator: torch.Generator,
            weights: torch.Tensor | None = None, collate_fn: Any = None) -> Iterator[Any]:
    """Endless batches drawn with replacement: one ``DataLoader`` pass is one batch.

    Args:
        dataset: a map-style dataset.
        batch_size: items per batch.
        generator: the sampler's generator (saved with the training state).
        weights: per-item sampling weights (``WeightedRandomSampler``); None draws
            uniformly (``RandomSampler`` with replacement).
        collate_fn: the loader's collate function (None: torch's default).
    """
    if weights is not None:
        sampler: Any = WeightedRandomSampler(weights, batch_size, replacement=True, generator=generator)
    else:
        sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size, generator=generator)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0, collate_fn=collate_fn)
    while True:
        yield from loader


def autocast(
    device: torch.device, enabled: bool, dtype: torch.dtype = torch.bfloat16, cpu_bf16: bool = False
) -> AbstractContextManager:
    """Mixed precision on CUDA when ``enabled``, bfloat16 on the CPU when ``cpu_bf16``; else a no-op.

    The two switches are separate because ``amp`` is on by default and CPU bfloat16 is not:
    it is fast only on CPUs with native bfloat16 (AVX512-BF16, AMX) and slower elsewhere.
    """
    if device.type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=cpu_bf16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled and device.type == "cuda")


@dataclass
class LoopSettings:
    """How the shared loop runs one stage.

    Attributes:
        out: the run folder.
        stage: a name for messages (``stage 1``, ``stage 2``).
        max_steps: optimiser steps.
        validation_every: steps between validations (and checkpoints).
        resume: continue the run in ``out``.
        amp: mixed precision on CUDA.
        cpu_bf16: bfloat16 autocast of the training steps on the CPU (validation stays
            float32, as prediction is).
        schedule: ``cosine`` or ``constant``.
        warmup_fraction: share of ``max_steps`` for the linear warm-up.
        floor: the cosine schedule ends at this multiple of the base learning rate.
        gradient_clip: maximum global gradient norm (None: no clipping).
    """

    out: Path
    stage: str
    max_steps: int
    validation_every: int
    resume: bool = False
    amp: bool = True
    cpu_bf16: bool = False
    schedule: str = "cosine"
    warmup_fraction: float = 0.05
    floor: float = 0.0
    gradient_clip: float | None = 1.0


class StageTask(ABC):
    """What one stage supplies to :class:`TrainingLoop`.

    :meth:`setup` builds data, networks and optimiser (``model``, ``optimizer``,
    ``generators``); the loop then calls :meth:`loss` once per step and :meth:`validate`
    every ``validation_every`` steps.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generators: dict[str, torch.Generator]

    @abstractmethod
    def setup(self, context: distributed.DistContext) -> None:
        """Load data and build ``model``, ``optimizer`` and ``generators`` on ``context.device``."""

    @abstractmethod
    def write_new_run(self) -> None:
        """Write the files of a fresh run (config, split, …) into the run folder."""

    @abstractmethod
    def start_message(self) -> str:
        """The ``start`` event's line: data, device."""

    @abstractmethod
    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One step's total loss (to back-propagate) and its parts as floats."""

    def after_step(self, step: int) -> None:
        """Work after the optimiser step ``step`` (1-based), e.g. a teacher's EMA update."""

    def extra_weights(self) -> dict[str, nn.Module]:
        """Networks besides ``model`` saved at every checkpoint and restored on resume."""
        return {}

    def trained_module(self) -> nn.Module:
        """The module the loss runs through (a DDP wrapper of ``model`` under torchrun)."""
        return self.model

    def validate(self) -> dict[str, tuple[float, nn.Module]]:
        """Validation score (higher is better, NaN if unknown) of each candidate network."""
        return {}


class TrainingLoop:
    """Runs a :class:`StageTask` under :class:`LoopSettings`; see the module doc."""

    def __init__(self, task: StageTask, settings: LoopSettings) -> None:
        if settings.schedule not in SCHEDULES:
            raise CPS4Error(f"--schedule {settings.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        self.task = task
        self.settings = settings

    def run(self, context: distributed.DistContext, cancel: CancelToken) -> Iterator[TrainEvent]:
        """Train, yielding events (only rank 0 writes and yields, but every rank yields ``cancelled``)."""
        task, settings, out, main = self.task, self.settings, self.settings.out, context.is_main
        start_step = 0
        best_score, best_source = -math.inf, None
        history: dict[str, list] = {"steps": [], "validation": []}
        task.setup(context)
        use_amp = settings.amp and context.device.type == "cuda"
        amp_dtype = torch.bfloat16 if not use_amp or torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        if settings.resume:
            task.model.load_state_dict(load_weights(out / LAST_FILE, context.device))
            for name, network in task.extra_weights().items():
                network.load_state_dict(load_weights(out / name, context.device))
            start_step, extra = load_training_state(
                out / STATE_FILE, task.optimizer, scaler if scaler.is_enabled() else None, generators=task.generators,
                rank=context.rank,
            )
            stored = extra.get("best_score")
            best_score = -math.inf if stored is None else float(stored)
            best_source = extra.get("best_source")
            previous = read_history(out / HISTORY_FILE)
            history = {key: [e for e in previous.get(key, []) if e["step"] <= start_step] for key in history}
        elif main:
            out.mkdir(parents=True, exist_ok=True)
            task.write_new_run()
        for group in task.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            task.optimizer,
            lambda step: learning_rate_factor(step, settings.max_steps, settings.schedule,
                                              settings.warmup_fraction, settings.floor),
            last_epoch=start_step - 1,
        )

        def rank_states() -> dict[int, dict]:
            """Every rank's random states by rank, for the state file (all ranks must call it)."""
            gathered = distributed.gather_objects(random_states(task.generators), context)
            return dict(enumerate(gathered))

        def checkpoint(step: int, other_ranks: dict[int, dict] | None = None) -> Path:
            path = save_weights(out / LAST_FILE, task.model.state_dict())
            for name, network in task.extra_weights().items():
                save_weights(out / name, network.state_dict())
            if best_source is None:
                save_weights(out / BEST_FILE, task.model.state_dict())
            save_training_state(
                out / STATE_FILE, step, task.optimizer, scaler if scaler.is_enabled() else None,
                generators=task.generators,
                extra={"best_score": best_score if math.isfinite(best_score) else None, "best_source": best_source},
                other_ranks={rank: states for rank, states in (other_ranks or {}).items() if rank != context.rank},
            )
            write_json_atomically(out / HISTORY_FILE, history)
            return path

        if main:
            yield TrainEvent("start", step=start_step, max_steps=settings.max_steps, path=str(out),
                             message=task.start_message())
        step_times: list[float] = []
        step = start_step
        while step < settings.max_steps:
            if distributed.any_rank(cancel.cancelled, context):
                states = rank_states()
                if main:
                    path = checkpoint(step, states)
                    yield TrainEvent("cancelled", step=step, max_steps=settings.max_steps, path=str(path),
                                     message=f"{settings.stage} cancelled at step {step}; resume with --resume")
                else:
                    # Silent on the console, but every torchrun process must exit as cancelled.
                    yield TrainEvent("cancelled", step=step, max_steps=settings.max_steps)
                return
            began = time.perf_counter()
            task.model.train()
            with autocast(context.device, use_amp, amp_dtype, cpu_bf16=settings.cpu_bf16):
                total, losses = task.loss(step)
            if not math.isfinite(losses.get("total", float(total.detach()))):
                raise CPS4Error(
                    f"{settings.stage} loss became {float(total.detach())} at step {step + 1}; "
                    f"lower --learning-rate or disable AMP", path=out,
                )
            task.optimizer.zero_grad(set_to_none=True)
            scaler.scale(total.float()).backward()
            if settings.gradient_clip is not None:
                scaler.unscale_(task.optimizer)
                nn.utils.clip_grad_norm_(task.model.parameters(), settings.gradient_clip)
            scaler.step(task.optimizer)
            scaler.update()
            learning_rate = float(task.optimizer.param_groups[0]["lr"])
            scheduler.step()
            step += 1
            task.after_step(step)
            elapsed = time.perf_counter() - began
            step_times.append(elapsed)
            eta = float(np.mean(step_times[-20:])) * (settings.max_steps - step)
            if main:
                history["steps"].append({"step": step, "losses": losses, "lr": learning_rate, "step_s": elapsed})
                yield TrainEvent("step", step=step, max_steps=settings.max_steps, losses=losses, eta_s=eta,
                                 message=f"loss {losses.get('total', float(total.detach())):.4f}")
            at_checkpoint = step % settings.validation_every == 0 or step == settings.max_steps
            states = rank_states() if at_checkpoint else None
            if main and at_checkpoint:
                scores = task.validate()
                if scores:
                    metrics = {}
                    for source, (score, network) in scores.items():
                        metrics["dice" if source == "student" else f"{source}_dice"] = score
                        if math.isfinite(score) and score > best_score:
                            best_score, best_source = score, source
                            save_weights(out / BEST_FILE, network.state_dict())
                    history["validation"].append(
                        {"step": step, **metrics, "best": best_score, "best_source": best_source}
                    )
                    yield TrainEvent(
                        "validation", step=step, max_steps=settings.max_steps, metrics=metrics,
                        message=f"validation Dice {metrics.get('dice', math.nan):.3f} "
                                f"(best {best_score:.3f}, {best_source})",
                    )
                path = checkpoint(step, states)
                yield TrainEvent("checkpoint", step=step, max_steps=settings.max_steps, path=str(path),
                                 message="last model and training state saved")
        if main:
            if step == start_step:
                checkpoint(step)
            metrics = {"dice": best_score} if math.isfinite(best_score) else {}
            yield TrainEvent("end", step=step, max_steps=settings.max_steps, metrics=metrics, path=str(out),
                             message=f"{settings.stage} done: run written to {out}")
