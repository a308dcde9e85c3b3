"""The image side of the vision-language model: a dense encoder from MONAI networks.

The encoder maps preprocessed slices ``(B, 1, H, W)`` (intensities in [0, 1]) to pixel
embeddings ``(B, D, H, W)`` at full resolution, D being the preset's ``embed_dim``:

- ``unet`` presets (``tiny``, ``cpu``): a MONAI ``UNet`` with stride-2 levels of
  ``encoder_channels``, ``encoder_res_units`` residual units per level and D output
  channels;
- ``unetr`` presets (``paper``): a MONAI ``UNETR``: a ViT-B/16-class transformer over
  16 x 16 patches (hidden 768, 12 blocks, 12 heads) with a convolutional decoder back to
  full resolution, D output channels.
"""

from __future__ import annotations

from monai.networks.nets import UNETR, UNet
from torch import nn

from cps4_engine.errors import CPS4Error
from cps4_engine.presets import Preset

UNETR_VIT_LAYERS = 12


def build_image_encoder(preset: Preset) -> nn.Module:
    """A randomly initialised dense encoder for ``preset``.

    Args:
        preset: gives the architecture (``image_encoder``), its sizes, ``embed_dim`` and
            ``slice_size``.

    Returns:
        A module mapping ``(B, 1, H, W)`` to ``(B, embed_dim, H, W)`` for ``(H, W)`` equal
        to ``preset.slice_size`` (``unet`` also accepts any size divisible by
        ``2 ** (len(encoder_channels) - 1)``).

    Raises:
        CPS4Error: the preset's sizes do not fit the architecture.
    """
    height, width = preset.slice_size
    if preset.image_encoder == "unet":
        factor = 2 ** (len(preset.encoder_channels) - 1)
        if height % factor or width % factor:
            raise CPS4Error(f"preset {preset.name!r}: slice size {preset.slice_size} is not divisible by {factor}")
        return UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=preset.embed_dim,
            channels=preset.encoder_channels,
            strides=(2,) * (len(preset.encoder_channels) - 1),
            num_res_units=preset.encoder_res_units,
            norm="INSTANCE",
        )
    if preset.image_encoder == "unetr":
        if height % preset.patch_size or width % preset.patch_size:
            raise CPS4Error(f"preset {preset.name!r}: slice size {preset.slice_size} is not divisible by patch {preset.patch_size}")
        if preset.vit_layers != UNETR_VIT_LAYERS:
            raise CPS4Error(f"preset {preset.name!r}: the UNETR encoder has {UNETR_VIT_LAYERS} ViT blocks, not {preset.vit_layers}")
        return UNETR(
            in_channels=1,
            out_channels=preset.embed_dim,
            img_size=preset.slice_size,
            feature_size=preset.unetr_feature_size,
            hidden_size=preset.vit_hidden_size,
            mlp_dim=preset.vit_mlp_dim,
            num_heads=preset.vit_heads,
            norm_name="instance",
            spatial_dims=2,
        )
    raise CPS4Error(f"preset {preset.name!r}: unknown image encoder {preset.image_encoder!r}")
