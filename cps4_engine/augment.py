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

Shapes: batches are ``(B, C, H, W)`` tensors on any device; transforms run per sample
(MONAI's array transforms are channel-first without a batch axis).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffined,
    RandBiasField,
    RandCoarseDropout,
    RandGaussianNoise,
    RandGaussianSmooth,
)

NEAREST_KEYS = frozenset({"label"})


class SliceAugmenter:
    """Seeded weak (joint geometric) and strong (intensity) augmentation of slice batches.

    Args:
        seed: seeds MONAI's random state, so a run's augmentation is reproducible.
        rotate_degrees: maximum in-plane rotation of the weak view, degrees.
        scale: maximum relative zoom of the weak view (0.1 → 0.9–1.1).
        translate_fraction: maximum shift of the weak view as a fraction of H and W.
        weak_probability: chance a slice gets the weak affine at all.
        strong_probability: chance of each strong intensity transform.
    """

    def __init__(
        self,
        seed: int = 0,
        rotate_degrees: float = 10.0,
        scale: float = 0.1,
        translate_fraction: float = 0.05,
        weak_probability: float = 0.8,
        strong_probability: float = 0.5,
    ) -> None:
        self.rotate_radians = math.radians(rotate_degrees)
        self.scale = scale
        self.translate_fraction = translate_fraction
        self.weak_probability = weak_probability
        self._weak_cache: dict[tuple[tuple[str, ...], tuple[int, int]], RandAffined] = {}
        self._seed = seed
        self.strong_probability = strong_probability
        self._strong_cache: dict[tuple[int, int], Compose] = {}

    def _weak_transform(self, keys: tuple[str, ...], size: tuple[int, int]) -> RandAffined:
        cache_key = (keys, size)
        if cache_key not in self._weak_cache:
            transform = RandAffined(
                keys=list(keys),
                mode=["nearest" if key in NEAREST_KEYS else "bilinear" for key in keys],
                padding_mode="zeros",
                prob=self.weak_probability,
                rotate_range=(self.rotate_radians,),
                scale_range=(self.scale, self.scale),
                translate_range=(
                    self.translate_fraction * size[0],
                    self.translate_fraction * size[1],
                ),
            )
            transform.set_random_state(seed=self._seed + len(self._weak_cache) * 7919)
            self._weak_cache[cache_key] = transform
        return self._weak_cache[cache_key]

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

    def weak(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply one random affine per sample jointly to every tensor of the batch.

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
        keys = tuple(batch)
        size = tuple(batch["image"].shape[-2:])
        transform = self._weak_transform(keys, size)  # type: ignore[arg-type]
        outputs: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
        for index in range(batch["image"].shape[0]):
            sample = {}
            for key in keys:
                value = batch[key][index]
                if key in NEAREST_KEYS:
                    value = value.unsqueeze(0).float()
                sample[key] = value
            result = transform(sample)
            for key in keys:
                value = torch.as_tensor(result[key]).as_subclass(torch.Tensor)
                if key in NEAREST_KEYS:
                    value = value[0].round().to(batch[key].dtype)
                outputs[key].append(value)
        return {key: torch.stack(values) for key, values in outputs.items()}

    def strong(self, images: torch.Tensor) -> torch.Tensor:
        """Corrupt intensities per sample; geometry untouched.

        Args:
            images: ``(B, 1, H, W)`` float in about [0, 1].

        Returns:
            ``(B, 1, H, W)`` float, clipped to [0, 1].
        """
        transform = self._strong_transform(tuple(images.shape[-2:]))  # type: ignore[arg-type]
        corrupted = [
            torch.as_tensor(transform(image)).as_subclass(torch.Tensor).to(images.dtype)
            for image in images
        ]
        return torch.stack(corrupted).to(images.device).clamp_(0.0, 1.0)
