"""Stage 1: class-prompt vision-language pretraining.

:func:`iter_pretrain` trains the :class:`~cps4_engine.models.vlm.VLM` on the labeled
training volumes of a dataset and yields :class:`~cps4_engine.events.TrainEvent` objects;
:func:`pretrain` drives it with an optional callback. Data: the dataset's cases are split
by :func:`cps4_engine.data.split_cases` (the seed picks the labeled volumes); the labeled
volumes' slices are preprocessed once and cached in memory; batches are drawn with a
seeded generator (slices showing a structure four times as often as empty ones) and
augmented with the weak (joint geometric) view of
:class:`cps4_engine.augment.SliceAugmenter`. Validation: the fused class maps
(:func:`cps4_engine.fusion.fuse_class_maps`) of the validation volumes, scored by 3D Dice
over the slices (MONAI ``DiceMetric``), choose the best checkpoint.

Run folder (``out``):

- ``config.json``: ``"stage": 1``, scheme, prompts (list, index = class id, background
  first), prompt template, preset, preprocessing, text encoder, losses, seed, versions;
- ``model.safetensors`` (best by validation Dice; the last weights when there is no
  validation volume), ``last.safetensors``, ``train_state.safetensors`` (optimiser,
  scaler, step, random generators: what ``resume`` needs);
- ``text_encoder/``: the text backbone's config and tokenizer (weights are in the model
  files), so the run loads without the original text encoder;
- ``history.json`` (loss parts per step, validation scores), ``split.json``;
- ``class_reliability.json``: each class map's Dice on the validation volumes at the best
  checkpoint (:func:`write_class_reliability`), which stage 2's fusion weighs the maps by.

Mixed precision on CUDA: bfloat16 autocast where supported, else float16 with a
``GradScaler``.

Several processes (``torchrun --nproc_per_node N -m cps4_engine pretrain …``, gloo on CPU,
NCCL on CUDA): the VLM trains under ``DistributedDataParallel``
(:func:`~cps4_engine.distributed.wrap_dataclass_model`) with ``find_unused_parameters``, as
some trainable parameters get no gradient (the image head without the contrastive term, a
fine-tuned text backbone's pooler); each rank draws its batches from its own rank-strided
shard of the slices; every rank runs every step (a cancel on any rank stops all); only
rank 0 validates, through the plain model (the DDP wrapper's forward broadcasts the text
backbone's buffers, a collective the other ranks would not join), and writes the run folder.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from cps4_engine import checkpoint, distributed
from cps4_engine.checkpoint import read_run_config, write_run_config
from cps4_engine.errors import CPS4Error
from cps4_engine.events import CancelToken, TrainEvent, run_with_callback
from cps4_engine.labels import LabelScheme, mrspineseg_scheme
from cps4_engine.losses import Stage1Loss, Stage1LossWeights, one_hot_targets
from cps4_engine.models.image_encoder import build_image_encoder
from cps4_engine.models.text import load_text_encoder
from cps4_engine.models.vlm import CLASS_MAPS, VLM
from cps4_engine.preprocess import UNKNOWN_LABEL, class_validity, prepare_volume
from cps4_engine.presets import Preset, get_preset
from cps4_engine.training import (
    HISTORY_FILE,
    SPLIT_FILE,
    LoopSettings,
    StageTask,
    TrainingLoop,
    batches,
    check_run_folder,
)

# The learning rate decays to this share of its base value (cosine after the warm-up).
FINAL_LEARNING_RATE_SHARE = 0.1
TEXT_FOLDER = "text_encoder"
# The stage-1 class maps' per-class validation Dice at the best checkpoint.
RELIABILITY_FILE = "class_reliability.json"
EMPTY_SLICE_WEIGHT = 0.25
WARMUP_FRACTION = 0.05


@dataclass
class Stage1Config:
    """Settings of a stage-1 run.

    Attributes:
        data: dataset folder (any layout :func:`cps4_engine.data.open_dataset` reads).
        out: run folder to create (or to continue with ``resume``).
        labeled: labeled training volumes: a count, or a fraction of the training volumes.
        preset: ``tiny``, ``cpu`` or ``paper`` (:mod:`cps4_engine.presets`).
        max_steps: optimiser steps; None uses the preset's.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        text_encoder: see :func:`cps4_engine.models.text.load_text_encoder`.
        seed: picks the labeled volumes, initialises the networks and the sampling.
        resume: continue the run in ``out`` from its last saved state.
        token_loss: use the token-level attention loss.
        pixel_loss: use the pixel-level attention loss.
        alignment_weight: weight of the dense prompt-pixel alignment.
        token_weight: weight of the token-level attention loss.
        pixel_weight: weight of the pixel-level attention loss.
        contrastive_weight: weight of the image-text contrastive term (0: off).
        prompt_template: class prompt template with ``{name}`` and/or ``{description}``
            placeholders (:mod:`cps4_engine.labels`); None uses the scheme's default
            prompts (the anatomical descriptions). A resumed run keeps the prompts it
            recorded.
        train_cases: use only the first N cases of the dataset (in its order) for
            training; the rest are never seen. None: all.
        validation: validation volumes carved from the training volumes (count or
            fraction); their fused class maps pick the best checkpoint.
        validation_every: steps between validations and checkpoints; None uses the preset's.
        batch_size: slices per step; None uses the preset's.
        learning_rate: AdamW learning rate; None uses the preset's.
        text_learning_rate_scale: the text backbone learns at this fraction of it (a
            pretrained encoder should move slowly).
        freeze_text_encoder: keep the text backbone's weights fixed (only its projection
            trains) and encode the prompts once. The default: on ``vb3_l1l5_t1`` the
            fixed pretrained MiniLM gave better class maps than the fine-tuned one, which
            diverged in 2 of 3 seeds, and a CPU step is about 6 times cheaper
            (BENCHMARKS.md). False fine-tunes the backbone at ``text_learning_rate_scale``.
        centre_prompts: subtract the class prompts' mean pooled embedding before the
            prompt-pixel heads (:class:`cps4_engine.models.vlm.VLM`).
        augment: apply the weak (geometric) augmentation to training batches.
        amp: mixed precision on CUDA.
        cpu_bf16: bfloat16 autocast of the training steps on the CPU (fast only on CPUs
            with native bfloat16, e.g. AVX512-BF16 or AMX).
        threshold: a class claims a pixel where its probability exceeds this (validation).
    """

    data: str | Path
    out: str | Path
    labeled: int | float = 2
    preset: str = "cpu"
    max_steps: int | None = None
    device: str = "auto"
    text_encoder: str | None = None
    seed: int = 0
    resume: bool = False
    token_loss: bool = True
    pixel_loss: bool = True
    alignment_weight: float = 1.0
    token_weight: float = 1.0
    pixel_weight: float = 1.0
    contrastive_weight: float = 0.0
    prompt_template: str | None = None
    train_cases: int | None = None
    validation: int | float = 0.1
    validation_every: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    text_learning_rate_scale: float = 0.1
    freeze_text_encoder: bool = True
    centre_prompts: bool = True
    augment: bool = True
    amp: bool = True
    cpu_bf16: bool = False
    threshold: float = 0.5

    def loss_weights(self) -> Stage1LossWeights:
        """The loss weights after the ablation switches."""
        return Stage1LossWeights(
            alignment=self.alignment_weight,
            token=self.token_weight if self.token_loss else 0.0,
            pixel=self.pixel_weight if self.pixel_loss else 0.0,
            contrastive=self.contrastive_weight,
        )


@dataclass
class SliceCache(Dataset):
    """Preprocessed slices of several volumes, kept in memory; a torch ``Dataset``.

    Item ``i`` is ``(image (1, H, W), label (H, W), painted)``.

    Attributes:
        images: float32 ``(N, 1, H, W)`` in [0, 1].
        labels: int64 ``(N, H, W)``.
        painted: per slice, the painted classes of a partial mask or None.
        volume_index: int64 ``(N,)``: which volume each slice comes from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    painted: list[tuple[int, ...] | None]
    volume_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]:
        return self.images[index], self.labels[index], self.painted[index]


def class_prompts(scheme: LabelScheme, template: str | None = None) -> list[str]:
    """One prompt per class of ``scheme``, index = class id, background first
    (:meth:`cps4_engine.labels.LabelScheme.class_prompts`; None: the scheme's defaults).

    Raises:
        CPS4Error: the template has neither a ``{name}`` nor a ``{description}`` placeholder.
    """
    return scheme.class_prompts(template)


def load_slices(cases: Sequence[Any], size: tuple[int, int], keep_aspect: bool = False) -> SliceCache:
    """Read, preprocess and stack the labeled volumes ``cases``.

    Args:
        cases: :class:`cps4_engine.data.Case` objects with a label file.
        size: model slice size ``(H, W)``.
        keep_aspect: letterbox the slices (:func:`cps4_engine.preprocess.prepare_volume`).

    Raises:
        CPS4Error: a volume or mask is unreadable, or they do not match
            (:func:`cps4_engine.data.load_case`).
    """
    from cps4_engine.data import load_case

    images, labels, painted, owners = [], [], [], []
    for index, case in enumerate(cases):
        volume, label = load_case(case)
        stack = prepare_volume(volume, size, label=label, painted=case.painted, keep_aspect=keep_aspect)
        images.append(torch.from_numpy(stack.images))
        labels.append(torch.from_numpy(stack.labels))
        painted.extend([stack.painted] * stack.num_slices)
        owners.append(torch.full((stack.num_slices,), index, dtype=torch.int64))
    if not images:
        return SliceCache(torch.zeros(0, 1, *size), torch.zeros(0, *size, dtype=torch.int64), [], torch.zeros(0, dtype=torch.int64))
    return SliceCache(torch.cat(images), torch.cat(labels), painted, torch.cat(owners))


def batch_validity(labels: torch.Tensor, painted: Sequence[tuple[int, ...] | None], num_classes: int) -> torch.Tensor:
    """Where each class's truth is known, for a batch mixing volumes: bool ``(B, C, H, W)``."""
    return torch.cat([class_validity(labels[i : i + 1], painted[i], num_classes, unknown=UNKNOWN_LABEL)
                      for i in range(labels.shape[0])])


def _one_hot_volume(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Slices ``(S, H, W)`` of one volume as a one-hot 3D batch ``(1, C, S, H, W)``."""
    return one_hot_targets(labels, num_classes).permute(1, 0, 2, 3).unsqueeze(0)


@torch.no_grad()
def validation_scores(vlm: VLM, cache: SliceCache, threshold: float) -> tuple[float, list[float | None]]:
    """3D Dice of the fused class maps on validation volumes: overall and per class.

    Args:
        vlm: the model.
        cache: labeled validation slices.
        threshold: class probability threshold of the fusion.

    Returns:
        ``(dice, per_class)``: the mean over volumes of each volume's mean Dice over the
        classes present (NaN when no volume has a foreground class), and for each of the
        19 foreground classes (class ``c`` at index ``c - 1``) its mean Dice over the
        volumes where it is present, None where it never is.
    """
    from monai.metrics import DiceMetric

    from cps4_engine.fusion import fuse_class_maps

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    num_classes = len(vlm.prompts)
    scores, per_volume = [], []
    for index in torch.unique(cache.volume_index).tolist():
        chosen = cache.volume_index == index
        probabilities = vlm.class_probabilities(cache.images[chosen])
        predicted = fuse_class_maps(probabilities, threshold, class_dim=1)
        truth = cache.labels[chosen]
        per_class = metric(_one_hot_volume(predicted.cpu(), num_classes), _one_hot_volume(truth, num_classes))[0]
        per_volume.append(per_class)
        if torch.isfinite(per_class).any():
            scores.append(float(per_class[torch.isfinite(per_class)].mean()))
    classes: list[float | None] = [None] * (num_classes - 1)
    if per_volume:
        stacked = torch.stack(per_volume)
        for class_index in range(num_classes - 1):
            present = stacked[:, class_index][torch.isfinite(stacked[:, class_index])]
            classes[class_index] = float(present.mean()) if present.numel() else None
    return (float(np.mean(scores)) if scores else float("nan")), classes


def write_class_reliability(out: Path, per_class: Sequence[float | None], dice: float, step: int, volumes: int) -> None:
    """Record how good each class map was on the validation volumes (``class_reliability.json``).

    Stage 2 weighs each class map in fused pseudo-labels by it
    (:func:`cps4_engine.fusion.read_class_reliability`). Format: ``{"dice": [19 floats or
    null], "score": overall Dice, "step": int, "volumes": int}``; index ``i`` is foreground
    class ``i + 1``.
    """
    checkpoint.write_json_atomically(out / RELIABILITY_FILE, {
        "dice": [None if value is None else round(float(value), 6) for value in per_class],
        "score": round(float(dice), 6), "step": int(step), "volumes": int(volumes),
    })


def _check_config(config: Stage1Config) -> None:
    labeled = config.labeled
    if isinstance(labeled, bool) or not isinstance(labeled, (int, float)):
        raise CPS4Error(f"--labeled {labeled!r} must be a count or a fraction")
    if labeled <= 0 or (isinstance(labeled, float) and labeled > 1):
        raise CPS4Error(f"--labeled {labeled} must be a positive count or a fraction in (0, 1]")
    if config.max_steps is not None and config.max_steps < 1:
        raise CPS4Error(f"--max-steps {config.max_steps} must be at least 1")
    if not 0.0 < config.threshold < 1.0:
        raise CPS4Error(f"threshold {config.threshold} must lie strictly between 0 and 1")
    for name in ("alignment", "token", "pixel", "contrastive"):
        weight = getattr(config, f"{name}_weight")
        if not math.isfinite(weight) or weight < 0:
            raise CPS4Error(f"--{name}-weight {weight} must be a finite number >= 0")
    if sum(asdict(config.loss_weights()).values()) <= 0:
        raise CPS4Error("every stage-1 loss weight is 0; nothing would be trained")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Stage1Trainer(StageTask):
    """One stage-1 run: checks, data, model and step, run by the shared training loop.

    :class:`~cps4_engine.training.TrainingLoop` owns checkpoints, resume, the schedule
    (warm-up, cosine decay to 10 %), clipping, AMP, validation and events.
    """

    def __init__(self, config: Stage1Config) -> None:
        from cps4_engine.device import resolve_device

        _check_config(config)
        self.config = config
        self.preset: Preset = get_preset(config.preset)
        self.device = resolve_device(config.device)
        self.out = Path(config.out)
        self.scheme = mrspineseg_scheme()
        self.prompts = class_prompts(self.scheme, config.prompt_template)
        self.max_steps = int(config.max_steps or self.preset.max_steps)
        self.batch_size = int(config.batch_size or self.preset.batch_size)
        self.learning_rate = float(config.learning_rate or self.preset.learning_rate)
        self.validation_every = int(config.validation_every or min(self.preset.validation_every, self.max_steps))
        if config.resume:
            recorded = read_run_config(self.out, stage=1, scheme=self.scheme.name)
            self.config = config = replace(
                config,
                centre_prompts=bool(recorded.get("centre_prompts", False)),
                freeze_text_encoder=bool(recorded.get("text_encoder", {}).get("frozen", False)),
            )
            # The run goes on with the prompts it was trained with, whatever today's defaults.
            self.prompts = [str(prompt) for prompt in recorded.get("prompts", self.prompts)]
        check_run_folder(self.out, config.resume, stage=1, same_settings={
            "data": config.data, "preset": config.preset, "prompt_template": config.prompt_template})
        self.split = self._split()
        self.loop = TrainingLoop(self, LoopSettings(
            out=self.out, stage="stage 1", max_steps=self.max_steps, validation_every=self.validation_every,
            resume=config.resume, amp=config.amp, cpu_bf16=config.cpu_bf16, schedule="cosine",
            warmup_fraction=WARMUP_FRACTION, floor=FINAL_LEARNING_RATE_SHARE, gradient_clip=1.0,
        ))

    def _split(self) -> Any:
        from cps4_engine.data import open_dataset, split_cases

        dataset = open_dataset(self.config.data)
        cases = list(dataset.cases)
        if self.config.train_cases is not None and not 1 <= self.config.train_cases <= len(cases):
            raise CPS4Error(f"--train-cases {self.config.train_cases} must be between 1 and the {len(cases)} cases", path=self.config.data)
        training = cases[: self.config.train_cases]
        if not any(case.is_labeled for case in training):
            raise CPS4Error("the dataset has no labeled volume; stage 1 needs at least one mask", path=self.config.data)
        split = split_cases(cases, labeled=self.config.labeled, seed=self.config.seed, train=self.config.train_cases, validation=self.config.validation)
        if not split.labeled:
            raise CPS4Error(f"--labeled {self.config.labeled} selects no labeled volume", path=self.config.data)
        return split

    def run_config(self, text_source: str) -> dict[str, Any]:
        """What ``config.json`` records: enough to rebuild the model and to audit the run."""
        return {
            "stage": 1,
            "scheme": self.scheme.to_dict(),
            "prompts": self.prompts,
            "prompt_template": self.config.prompt_template or self.scheme.prompt_template,
            "preset": self.preset.to_dict(),
            "preprocessing": {
                "slice_size": list(self.preset.slice_size),
                "keep_aspect": self.preset.keep_aspect,
                "intensity": "per-volume percentile scaling 0.5-99.5 to [0, 1]",
            },
            "text_encoder": {
                "source": text_source, "requested": self.config.text_encoder, "folder": TEXT_FOLDER,
                "frozen": self.config.freeze_text_encoder,
            },
            "centre_prompts": self.config.centre_prompts,
            "class_maps": CLASS_MAPS,
            "losses": asdict(self.config.loss_weights()),
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "settings": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self.config).items()},
        }

    def build_model(self) -> VLM:
        """A freshly initialised model for this run's preset, prompts and text encoder."""
        text = load_text_encoder(self.config.text_encoder, embed_dim=self.preset.embed_dim, max_length=self.preset.text_max_length, seed=self.config.seed)
        if self.config.freeze_text_encoder:
            text.freeze_backbone()
        return VLM(build_image_encoder(self.preset), text, self.prompts, self.preset, centre_prompts=self.config.centre_prompts)

    def _optimizer(self, model: VLM) -> torch.optim.Optimizer:
        text_backbone = [parameter for parameter in model.text_encoder.backbone.parameters() if parameter.requires_grad]
        text_ids = {id(parameter) for parameter in model.text_encoder.backbone.parameters()}
        others = [parameter for parameter in model.parameters() if id(parameter) not in text_ids]
        return torch.optim.AdamW(
            [
                {"params": others, "lr": self.learning_rate},
                {"params": text_backbone, "lr": self.learning_rate * self.config.text_learning_rate_scale},
            ],
            weight_decay=1e-4,
        )

    def events(self, cancel: CancelToken | None = None) -> Iterator[TrainEvent]:
        """Train, yielding events; see :func:`iter_pretrain`. Under ``torchrun`` every rank
        trains and only rank 0 yields events and writes (:mod:`cps4_engine.distributed`)."""
        with distributed.joined(self.config.device) as context:
            yield from self.loop.run(context, cancel or CancelToken())

    def setup(self, context: distributed.DistContext) -> None:
        config, device = self.config, context.device
        _seed_everything(config.seed)
        self.model = self.build_model().to(device)
        geometry = {"size": self.preset.slice_size, "keep_aspect": self.preset.keep_aspect}
        self.train_slices = load_slices(self.split.labeled, **geometry)
        # Only rank 0 validates (the loop), so only it needs the validation slices.
        validation_cases = [case for case in self.split.validation if case.is_labeled] if context.is_main else []
        self.validation = load_slices(validation_cases, **geometry)
        self.optimizer = self._optimizer(self.model)
        # DDP broadcasts rank 0's weights at wrap time and averages gradients in backward.
        # Some parameters never train (the image head when the contrastive weight is 0: its
        # output is computed but not read; a fine-tuned text backbone's pooler), which DDP
        # must know not to wait for. (A static graph does not fit: the first step's zero
        # gradient of the unread output marks the image head as trained.)
        self.trained = distributed.wrap_dataclass_model(self.model, context, find_unused_parameters=True)
        # Each rank draws its own shard of the slices with its own draws; rank 0's are those
        # of a single-process run.
        sampler = torch.Generator().manual_seed(config.seed + 1000 * context.rank)
        self.generators = {"sampler": sampler}
        self.augmenter = None
        if config.augment:
            from cps4_engine.augment import SliceAugmenter

            self.augmenter = SliceAugmenter(seed=config.seed + 7919 * context.rank)
            self.generators["augmentation"] = self.augmenter.generator
        self.criterion = Stage1Loss(config.loss_weights())
        shard = distributed.rank_shard(len(self.train_slices), context)
        has_structure = (self.train_slices.labels[shard].flatten(1) > 0).any(dim=1)
        weights = torch.where(has_structure, 1.0, EMPTY_SLICE_WEIGHT)
        self.batches = batches(Subset(self.train_slices, shard.tolist()), self.batch_size, sampler, weights,
                               collate_fn=_collate_slices)
        self.context = context
        self.step = 0

    def write_new_run(self) -> None:
        # A run restarted after dying before its first checkpoint must not inherit a record.
        (self.out / RELIABILITY_FILE).unlink(missing_ok=True)
        self.model.text_encoder.save_architecture(self.out / TEXT_FOLDER)
        self.split.save(self.out / SPLIT_FILE)
        write_run_config(self.out, self.run_config(self.model.text_encoder.source))

    def start_message(self) -> str:
        return (
            f"stage 1 on {self.context.device}: {len(self.split.labeled)} labeled volumes "
            f"({len(self.train_slices)} slices), {len(self.split.validation)} validation, "
            f"text encoder {self.model.text_encoder.source}"
            + (f"; {self.context.world_size} processes, each on its own share of the slices" if self.context.distributed else "")
        )

    def after_step(self, step: int) -> None:
        self.step = step

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels, painted = next(self.batches)
        if self.augmenter is not None:
            augmented = self.augmenter.weak({"image": images, "label": labels})
            images, labels = augmented["image"], augmented["label"]
        device = self.context.device
        validity = batch_validity(labels, painted, len(self.prompts)).to(device)
        images, labels = images.to(device), labels.to(device)
        output = self.trained(images, with_image_logits=bool(self.criterion.weights.contrastive))
        losses = self.criterion(output, one_hot_targets(labels, len(self.prompts)), validity)
        return losses["total"], {name: float(value.detach()) for name, value in losses.items()}

    def validate(self) -> dict[str, tuple[float, nn.Module]]:
        if not len(self.validation):
            return {}
        dice, per_class = validation_scores(self.model, self.validation, self.config.threshold)
        if math.isfinite(dice) and dice > self._best_recorded():
            # The loop keeps these weights as the best: record what their class maps are worth.
            volumes = int(torch.unique(self.validation.volume_index).numel())
            write_class_reliability(self.out, per_class, dice, self.step, volumes)
        return {"student": (dice, self.model)}

    def _best_recorded(self) -> float:
        """The overall Dice recorded with the class reliability so far (-inf if none)."""
        path = self.out / RELIABILITY_FILE
        if not path.is_file():
            return -math.inf
        return float(json.loads(path.read_text()).get("score", -math.inf))


def _collate_slices(items: list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]]) -> tuple:
    """A stage-1 batch: stacked images and labels, and each slice's painted classes."""
    images, labels, painted = zip(*items)
    return torch.stack(images), torch.stack(labels), list(painted)


def read_history(run_dir: str | Path) -> dict[str, list]:
    """The ``history.json`` of a run (empty lists when it has none yet)."""
    return checkpoint.read_history(Path(run_dir) / HISTORY_FILE)


def iter_pretrain(config: Stage1Config, cancel: CancelToken | None = None) -> Iterator[TrainEvent]:
    """Run stage 1, yielding ``start``, ``step`` (loss parts, ETA), ``validation``,
    ``checkpoint`` and finally ``end`` (or ``cancelled``) events.

    Raises:
        CPS4Error: bad settings, a dataset without a labeled volume, an ``out`` folder
            that already holds a run (without ``resume``) or is not a stage-1 run.
    """
    yield from Stage1Trainer(config).events(cancel)


def pretrain(config: Stage1Config, callback: Callable[[TrainEvent], None] | None = None, cancel: CancelToken | None = None) -> Path:
    """Run stage 1 to the end (or until cancelled); returns the run folder."""
    run_with_callback(iter_pretrain(config, cancel), callback)
    return Path(config.out)
