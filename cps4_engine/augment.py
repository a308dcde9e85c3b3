"""Weak and strong slice augmentation for semi-supervised training (MONAI transforms).

Mean teacher with weak/strong augmentation needs the teacher's view and the student's
view of an unlabeled slice to stay pixel-aligned, so that the teacher's pseudo-label
can supervise the student pixel by pixel. We therefore split the two:

* **weak** — a small random affine (rotation, scaling, translation) applied jointly to
  the image and to everything that lives on its pixel grid: labels (nearest), cached
  stage-1 class maps (bilinear). Both views share it.
* **strong** — intensity corruption applied on top of the weak view, for the student
  only: bias field, contrast (gamma), Gaussian noise, blur and coarse dropout. No
  geometry, so the weak view's pseudo-label still fits.

No flips: a sagittal slice flipped top to bottom would turn L5 into T12's position, and
which level is which has to be learned from that context.

Shapes: batches are ``(B, C, H, W)`` tensors on any device. The weak affine resamples the
whole batch at once (MONAI ``AffineTransform``); the strong transforms run per sample
(MONAI's array transforms are channel-first without a batch axis).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Mapping

import torch
from monai.networks.layers import AffineTransform
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandBiasField,
    RandCoarseDropout,
    RandGaussianNoise,
    RandGaussianSmooth,
)

NEAREST_KEYS = frozenset({"label"})


def _full_precision(tensor: torch.Tensor) -> AbstractContextManager:
    """Autocast off: augmentation prepares data and runs in float32 inside mixed-precision steps.

    (Under CPU bfloat16 autocast the blur's convolution returns bfloat16, which MONAI's
    numpy-based transforms cannot take.)
    """
    if tensor.device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=tensor.device.type, enabled=False)
    return nullcontext()


class SliceAugmenter:
    """Seeded weak (joint geometric) and strong (intensity) augmentation of slice batches.

    Images may carry several channels (neighbouring slices, 2.5D); the weak affine moves
    them together and the strong transforms corrupt them together.

    Args:
        seed: seeds the affine generator and MONAI's random state, so a run's
            augmentation is reproducible.
        rotate_degrees: maximum in-plane rotation of the weak view, degrees.
        scale: maximum relative zoom of the weak view (0.1 → 0.9–1.1).
        translate_fraction: maximum shift of the weak view as a fraction of H and W; a
            pair gives the fraction of H (superior-inferior) and of W separately.
        weak_probability: chance a slice gets the weak affine at all.

    Attributes:
        generator: the ``torch.Generator`` of the weak affines (a trainer saves it with
            its checkpoints so that a resumed run draws what an uninterrupted one would).
        strong_probability: chance of each strong intensity transform.
    """

    DEFAULT_TRANSLATE = 0.05

    def __init__(
        self,
        seed: int = 0,
        rotate_degrees: float = 10.0,
        scale: float = 0.1,
        translate_fraction: float | tuple[float, float] = 0.05,
        weak_probability: float = 0.8,
        strong_probability: float = 0.5,
    ) -> None:
        self.rotate_radians = math.radians(rotate_degrees)
        self.scale = scale
        if isinstance(translate_fraction, (int, float)):
            translate_fraction = (float(translate_fraction), float(translate_fraction))
        self.translate_fraction = torch.tensor([float(f) for f in translate_fraction])
        self.weak_probability = weak_probability
        self.generator = torch.Generator().manual_seed(seed)
        self._bilinear = AffineTransform(mode="bilinear", padding_mode="zeros", zero_centered=True)
        self._nearest = AffineTransform(mode="nearest", padding_mode="zeros", zero_centered=True)
        self._seed = seed
        self.strong_probability = strong_probability
        self._strong_cache: dict[tuple[int, int], Compose] = {}

    def _weak_matrices(self, count: int, size: tuple[int, int]) -> torch.Tensor:
        """Random ``(count, 3, 3)`` pull-direction affines about the slice centre, in pixels."""
        generator = self.generator
        applied = torch.rand(count, generator=generator) < self.weak_probability
        angle = (torch.rand(count, generator=generator) * 2 - 1) * self.rotate_radians
        scale = 1 + (torch.rand(count, 2, generator=generator) * 2 - 1) * self.scale
        extent = torch.tensor([float(size[0]), float(size[1])])
        shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * self.translate_fraction * extent
        cos, sin = torch.cos(angle), torch.sin(angle)
        matrices = torch.eye(3).repeat(count, 1, 1)
        matrices[:, 0, 0] = scale[:, 0] * cos
        matrices[:, 0, 1] = -scale[:, 0] * sin
        matrices[:, 1, 0] = scale[:, 1] * sin
        matrices[:, 1, 1] = scale[:, 1] * cos
        matrices[:, :2, 2] = shift
        matrices[~applied] = torch.eye(3)
        return matrices

    def weak(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply one random affine per sample jointly to every tensor of the batch.

        The whole batch is resampled at once with MONAI's ``AffineTransform`` layer
        (``grid_sample`` on the tensors' device).

        Args:
            batch: tensors sharing batch size and ``(H, W)``: ``image`` ``(B, 1, H, W)``,
                optionally ``label`` ``(B, H, W)`` int64 raw class ids (resampled
                nearest; pixels moved in from outside the slice become 0, which is
                background for a complete mask and unknown for a partial one, matching
                the zero intensity padded into the image) and ``prompt``
                ``(B, 19, H, W)`` probabilities (bilinear).

        Returns:
            The same keys, same shapes and dtypes, transformed.
        """
        image = batch["image"]
        size = (int(image.shape[-2]), int(image.shape[-1]))
        matrices = self._weak_matrices(int(image.shape[0]), size).to(image.device)
        outputs = {}
        with _full_precision(image):
            for key, value in batch.items():
                if key in NEAREST_KEYS:
                    moved = self._nearest(value.unsqueeze(1).float(), matrices)[:, 0]
                    outputs[key] = moved.round().to(value.dtype)
                else:
                    outputs[key] = self._bilinear(value.float(), matrices).to(value.dtype)
        return outputs

    def _strong_transform(self, size: tuple[int, int]) -> Compose:
        if size not in self._strong_cache:
            probability = self.strong_probability
            # Holes scale with the slice so that the same preset-independent share of
            # the image (up to about 3 % per hole) is dropped at every slice size.
            smallest = min(size)
            transform = Compose(
                [
                    RandBiasField(degree=3, coeff_range=(0.0, 0.2), prob=probability),
                    RandAdjustContrast(gamma=(0.7, 1.5), prob=probability),
                    RandGaussianNoise(mean=0.0, std=0.05, prob=probability),
                    RandGaussianSmooth(
                        sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=probability / 2
                    ),
                    RandCoarseDropout(
                        holes=2,
                        spatial_size=max(1, smallest // 16),
                        max_spatial_size=max(2, smallest // 6),
                        fill_value=0.0,
                        prob=probability,
                    ),
                ]
            )
            transform.set_random_state(seed=self._seed + 1 + len(self._strong_cache) * 104729)
            self._strong_cache[size] = transform
        return self._strong_cache[size]

    def strong(self, images: torch.Tensor) -> torch.Tensor:
        """Corrupt intensities per sample; geometry untouched.

        Args:
            images: ``(B, 1, H, W)`` float in about [0, 1].

        Returns:
            ``(B, 1, H, W)`` float, clipped to [0, 1].
        """
        transform = self._strong_transform(tuple(images.shape[-2:]))  # type: ignore[arg-type]
        with _full_precision(images):
            corrupted = [
                torch.as_tensor(transform(image)).as_subclass(torch.Tensor).to(images.dtype)
                for image in images
            ]
        return torch.stack(corrupted).to(images.device).clamp_(0.0, 1.0)
