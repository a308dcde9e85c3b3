"""The stage-2 segmentation network: a MONAI 2D U-Net over sagittal slices.

The network maps a batch of preprocessed slices ``(B, 1, H, W)`` (intensities in [0, 1])
to logits ``(B, 20, H, W)``: one channel per MRSpineSeg class, background at channel 0.
Everything needed to rebuild it is a small JSON-friendly dictionary (see
:func:`segmenter_config`) that the stage-2 run folder stores in ``config.json`` under
``"segmenter"``, so inference rebuilds the exact network from the run folder alone.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from cps4_engine.errors import CPS4Error

NUM_CLASSES = 20
SEGMENTER_NETWORK = "monai.UNet"


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
        A ``monai.networks.nets.UNet`` taking ``(B, 1, H, W)`` and returning logits
        ``(B, 20, H, W)``; ``H`` and ``W`` must be divisible by ``2 ** len(strides)``.

    Raises:
        CPS4Error: the dict names another network or lacks a field.
    """
    from monai.networks.nets import UNet

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
        return UNet(
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
