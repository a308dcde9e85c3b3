"""Named size presets shared by every trainer.

A preset fixes everything that trades quality for time: the slice size models see, the
image encoder's architecture and width, the shared embedding dimension, the batch size,
the learning rate and the default number of optimiser steps, for stage 1 (the
vision-language model) and stage 2 (the segmenter).

- ``tiny``: 64 x 32 slices, a few thousand parameters; seconds on a CPU. For tests.
- ``cpu``: 112 x 112 letterboxed slices (the slice's aspect kept; 2 mm per pixel on a
  224 mm field of view), a five-level U-Net over three neighbouring slices; minutes on
  two CPU cores. The default when no GPU is
  present.
- ``paper``: 512 x 256 slices (the authors' 256 wide x 512 high crop) and a ViT-B/16-class
  encoder (hidden 768, 12 layers, 12 heads, patch 16) with a UNETR decoder. For GPUs.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass
from typing import Literal

from cps4_engine.errors import CPS4Error

# CPS4's share of the class-prompt maps in fused pseudo-labels. At 0.5 the fused labels were
# worse than the teacher's alone (vb3, 3 seeds: 0.41 vs 0.46 Dice against the hidden truth
# with 1 labeled volume, 0.48 vs 0.53 with 2); at 0.25 they matched it (0.47 vs 0.47,
# 0.53 vs 0.52), the class-prompt maps alone being weaker than the teacher (BENCHMARKS.md).
DEFAULT_PROMPT_WEIGHT = 0.25

EncoderKind = Literal["unet", "unetr"]


@dataclass(frozen=True)
class Preset:
    """Sizes and optimisation settings of one named preset.

    Attributes:
        name: the preset's name (``tiny``, ``cpu``, ``paper``).
        slice_size: ``(H, W)`` in pixels of the 2D sagittal slices models see; H runs
            superior to inferior, W anterior to posterior.
        batch_size: slices per optimiser step.
        learning_rate: AdamW learning rate of stage 1.
        max_steps: default number of stage-1 optimiser steps.
        validation_every: stage-1 steps between validations (and best-checkpoint checks).
        image_encoder: ``unet`` (MONAI ``UNet``) or ``unetr`` (MONAI ``UNETR``, a ViT
            encoder with a convolutional decoder).
        encoder_channels: channels per level of the ``unet`` encoder (its strides are 2).
            Which level a vertebra is has to be read from the whole spine (the sacrum at
            the bottom, counting upwards), so the deepest level should see most of the
            slice: five levels give a 1/16-resolution bottleneck.
        vit_hidden_size: ViT token width of the ``unetr`` encoder.
        vit_layers: number of ViT transformer blocks.
        vit_heads: number of attention heads per block.
        vit_mlp_dim: hidden width of each block's MLP.
        patch_size: ViT patch edge in pixels; ``slice_size`` must be divisible by it.
        unetr_feature_size: channel width of the UNETR decoder's first level.
        embed_dim: dimension D of the shared pixel/prompt embedding space.
        text_max_length: prompts are truncated to this many tokens.
        seg_channels: channels per level of the stage-2 segmenter (MONAI ``UNet``).
        stage2_batch_size: labeled slices per stage-2 step (the unlabeled batch matches).
        stage2_learning_rate: learning rate of the stage-2 student.
        stage2_max_steps: default number of stage-2 optimiser steps.
        encoder_res_units: residual units per level of the ``unet`` encoder's
            contracting path (MONAI ``num_res_units``); more units widen the receptive
            field at low resolution, where they cost little. Runs saved before this
            setting existed used 1.
        keep_aspect: slices are letterboxed into ``slice_size`` (one scale factor in mm)
            instead of stretched (:func:`cps4_engine.preprocess.prepare_volume`); both
            stages use it so that the stage-1 maps lie on the stage-2 grid. Runs saved
            before this setting existed stretched.
        context_slices: the stage-2 segmenter sees this many neighbouring sagittal
            slices on each side as extra input channels (2.5D).
        seg_res_units: residual units per level of the stage-2 segmenter (MONAI
            ``num_res_units``).
        fov_shift: the stage-2 weak augmentation shifts the slice along
            superior-inferior by up to this fraction of its height, so that where the
            image border lies cannot tell the network which level it is looking at.
        weak_zoom: the stage-2 weak augmentation zooms each axis by up to this relative
            amount (0.1: 0.9–1.1), so that a patient's size is not the network's cue.
        weak_rotation: the stage-2 weak augmentation rotates the slice in plane by up
            to this many degrees (a tilted lumbosacral junction).
        labeled_strong: the stage-2 labeled slices also get the strong intensity
            augmentation (bias field, contrast, noise, blur, dropout) on top of the weak
            view, as the unlabeled slices of the student do; False trains on their weak
            view only. On in ``cpu`` and ``paper``: with 2 labeled vb3 volumes it raised
            supervised test Dice in each of 3 seeds (BENCHMARKS.md, eighth session). Runs
            saved before this setting existed trained without it.
    """

    name: str
    slice_size: tuple[int, int]
    batch_size: int
    learning_rate: float
    max_steps: int
    validation_every: int
    image_encoder: EncoderKind
    encoder_channels: tuple[int, ...]
    vit_hidden_size: int
    vit_layers: int
    vit_heads: int
    vit_mlp_dim: int
    patch_size: int
    unetr_feature_size: int
    embed_dim: int
    text_max_length: int
    seg_channels: tuple[int, ...]
    stage2_batch_size: int
    stage2_learning_rate: float
    stage2_max_steps: int
    encoder_res_units: int = 1
    keep_aspect: bool = False
    context_slices: int = 0
    fov_shift: float = 0.05
    seg_res_units: int = 2
    labeled_strong: bool = False
    weak_zoom: float = 0.1
    weak_rotation: float = 10.0

    def to_dict(self) -> dict:
        """The preset as JSON-ready values (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Preset":
        """Rebuild a preset saved with :meth:`to_dict` (e.g. from a run's ``config.json``)."""
        fields = cls.__dataclass_fields__
        known = {name: values[name] for name in fields if name in values}
        missing = {name for name, field in fields.items() if name not in known and field.default is MISSING}
        if missing:
            raise CPS4Error(f"preset settings lack {', '.join(sorted(missing))}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in known.items()})


_PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        slice_size=(64, 32),
        batch_size=4,
        learning_rate=1e-2,
        max_steps=40,
        validation_every=20,
        image_encoder="unet",
        encoder_channels=(8, 16, 32),
        vit_hidden_size=0,
        vit_layers=0,
        vit_heads=0,
        vit_mlp_dim=0,
        patch_size=0,
        unetr_feature_size=0,
        embed_dim=16,
        text_max_length=24,
        seg_channels=(8, 16, 32),
        stage2_batch_size=4,
        stage2_learning_rate=3e-3,
        stage2_max_steps=40,
    ),
    "cpu": Preset(
        name="cpu",
        slice_size=(112, 112),
        batch_size=8,
        learning_rate=3e-3,
        max_steps=600,
        validation_every=100,
        image_encoder="unet",
        encoder_channels=(16, 32, 64, 128, 256),
        vit_hidden_size=0,
        vit_layers=0,
        vit_heads=0,
        vit_mlp_dim=0,
        patch_size=0,
        unetr_feature_size=0,
        embed_dim=64,
        text_max_length=32,
        seg_channels=(16, 32, 64, 128, 256),
        stage2_batch_size=8,
        stage2_learning_rate=1e-3,
        stage2_max_steps=1500,
        encoder_res_units=2,
        keep_aspect=True,
        context_slices=1,
        fov_shift=0.25,
        seg_res_units=1,
        labeled_strong=True,
    ),
    "paper": Preset(
        name="paper",
        slice_size=(512, 256),
        batch_size=8,
        learning_rate=1e-4,
        max_steps=10000,
        validation_every=500,
        image_encoder="unetr",
        encoder_channels=(),
        vit_hidden_size=768,
        vit_layers=12,
        vit_heads=12,
        vit_mlp_dim=3072,
        patch_size=16,
        unetr_feature_size=16,
        embed_dim=256,
        text_max_length=32,
        seg_channels=(32, 64, 128, 256, 512),
        stage2_batch_size=8,
        stage2_learning_rate=1e-3,
        stage2_max_steps=20000,
        keep_aspect=True,
        context_slices=1,
        fov_shift=0.25,
        labeled_strong=True,
    ),
}

PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        CPS4Error: no preset has that name.
    """
    try:
        return _PRESETS[name]
    except KeyError:
        raise CPS4Error(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}") from None
