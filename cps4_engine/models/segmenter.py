"""The stage-2 segmentation network: a MONAI 2D U-Net over sagittal slices.

The network maps a batch of preprocessed slices ``(B, 1, H, W)`` (intensities in [0, 1])
to logits ``(B, 20, H, W)``: one channel per MRSpineSeg class, background at channel 0.
Everything needed to rebuild it is a small JSON-friendly dictionary (see
:func:`segmenter_config`) that the stage-2 run folder stores in ``config.json`` under
``"segmenter"``, so inference rebuilds the exact network from the run folder alone.

:class:`Segmenter` is MONAI's ``UNet`` with the same modules and parameter names (old
checkpoints load unchanged) and one addition for weak-to-strong consistency training
(UniMatch): its forward can perturb the *features the decoder reads* for some rows of the
batch, i.e. channel dropout (``Dropout2d``) on every encoder feature map that crosses a
skip connection and on the bottleneck output, while the encoder itself runs unperturbed.
Without perturbed rows, or in eval mode, the forward is exactly MONAI's.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn

from cps4_engine.errors import CPS4Error
from cps4_engine.options import DEFAULT_FEATURE_DROPOUT

NUM_CLASSES = 20
SEGMENTER_NETWORK = "monai.UNet"


class _FeatureDropout:
    """Channel dropout on the last ``rows`` samples of a batch (the perturbed view)."""

    def __init__(self, rows: int, probability: float) -> None:
        self.rows = rows
        self.probability = probability

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        kept, perturbed = features[: -self.rows], features[-self.rows :]
        return torch.cat([kept, F.dropout2d(perturbed, self.probability, training=True)])


class _Level(nn.Sequential):
    """One U-Net level, ``(down, SkipConnection(deeper levels), up)`` as in MONAI's UNet,
    whose forward can drop channels of the features the ``up`` path reads."""

    def forward(self, x: torch.Tensor, perturbation: _FeatureDropout | None = None) -> torch.Tensor:  # type: ignore[override]
        down, skip, up = self[0], self[1], self[2]
        encoded = down(x)
        inner = skip.submodule
        if isinstance(inner, _Level):
            deeper = inner(encoded, perturbation)
        else:  # the bottleneck: its output is the deepest feature the decoder reads
            deeper = inner(encoded)
            if perturbation is not None:
                deeper = perturbation(deeper)
        if perturbation is not None:
            encoded = perturbation(encoded)
        return up(torch.cat([encoded, deeper], dim=skip.dim))


class Segmenter(UNet):
    """MONAI ``UNet`` (same arguments, modules and state-dict keys) with an optional
    feature-perturbed forward for the last rows of a batch (see the module doc)."""

    def _get_connection_block(self, down_path: nn.Module, up_path: nn.Module, subblock: nn.Module) -> nn.Module:
        return _Level(down_path, SkipConnection(subblock), up_path)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, perturbed_rows: int = 0, feature_dropout: float = DEFAULT_FEATURE_DROPOUT
    ) -> torch.Tensor:
        """Logits of a batch, the last ``perturbed_rows`` samples with feature dropout.

        Args:
            x: ``(B, C, H, W)`` slices.
            perturbed_rows: how many samples at the end of the batch get the perturbation
                (0: none). Samples never mix (instance norm), so one call can hold plain
                and perturbed views of the same images.
            feature_dropout: probability of dropping a channel of each decoder input
                feature map of a perturbed sample (the rest are scaled by ``1 / (1 - p)``).

        Returns:
            ``(B, 20, H, W)`` logits. In eval mode nothing is dropped: the result equals
            the plain forward.
        """
        if perturbed_rows < 0 or perturbed_rows > x.shape[0]:
            raise ValueError(f"perturbed_rows must be between 0 and the batch size {x.shape[0]}; got {perturbed_rows}")
        if perturbed_rows == 0 or not self.training or feature_dropout == 0.0:
            return self.model(x)
        return self.model(x, _FeatureDropout(perturbed_rows, feature_dropout))


def segmenter_config(preset: Any) -> dict[str, Any]:
    """The network description for a preset.

    Args:
        preset: a :class:`cps4_engine.presets.Preset` (uses ``seg_channels`` and
            ``slice_size``).

    Returns:
        A JSON-serialisable dict: ``network``, ``in_channels`` (``1 + 2 k``),
        ``context_slices`` (``k`` neighbours per side, 2.5D), ``keep_aspect`` (letterboxed
        slices), ``out_channels`` (20), ``channels`` (feature maps per level), ``strides`` (2 between levels),
        ``num_res_units``, ``norm``, ``dropout`` and ``slice_size`` ``[H, W]`` in pixels.
    """
    channels = [int(c) for c in preset.seg_channels]
    context = int(getattr(preset, "context_slices", 0))
    return {
        "network": SEGMENTER_NETWORK,
        "in_channels": 1 + 2 * context,
        "context_slices": context,
        "keep_aspect": bool(getattr(preset, "keep_aspect", False)),
        "out_channels": NUM_CLASSES,
        "channels": channels,
        "strides": [2] * (len(channels) - 1),
        "num_res_units": int(getattr(preset, "seg_res_units", 2)),
        "norm": "instance",
        "dropout": 0.0,
        "slice_size": [int(s) for s in preset.slice_size],
    }


def build_segmenter(preset_or_config: Any) -> nn.Module:
    """Build the segmentation network from a preset or a stored config dict.

    Args:
        preset_or_config: a preset (see :func:`segmenter_config`) or the dict that
            :func:`segmenter_config` returned (e.g. ``config.json["segmenter"]``).

    Returns:
        A :class:`Segmenter` (a ``monai.networks.nets.UNet``) taking ``(B, C, H, W)`` and
        returning logits ``(B, 20, H, W)``; ``H`` and ``W`` must be divisible by
        ``2 ** len(strides)``.

    Raises:
        CPS4Error: the dict names another network or lacks a field.
    """
    config = (
        dict(preset_or_config)
        if isinstance(preset_or_config, Mapping)
        else segmenter_config(preset_or_config)
    )
    if config.get("network") != SEGMENTER_NETWORK:
        raise CPS4Error(
            f"segmenter config names network {config.get('network')!r}; "
            f"this version builds {SEGMENTER_NETWORK!r}"
        )
    try:
        return Segmenter(
            spatial_dims=2,
            in_channels=int(config["in_channels"]),
            out_channels=int(config["out_channels"]),
            channels=tuple(config["channels"]),
            strides=tuple(config["strides"]),
            num_res_units=int(config["num_res_units"]),
            norm=str(config["norm"]),
            dropout=float(config["dropout"]),
        )
    except KeyError as missing:
        raise CPS4Error(f"segmenter config lacks the field {missing}") from None
