"""From a volume to model-ready sagittal slices, and from slice predictions back.

:func:`prepare_volume` cuts a volume into display-orientation sagittal slices
(:func:`cps4_engine.io.to_sagittal`), scales intensities per volume to [0, 1] between the
0.5th and 99.5th percentiles (MONAI ``ScaleIntensityRangePercentiles``), and resizes every
slice to the preset's ``(H, W)`` (MONAI ``Resize``: bilinear for images, nearest for
labels). The whole slice is resized; no crop, so nothing is lost and the inverse is exact
up to interpolation. :func:`restore_labels` and :func:`restore_probabilities` undo it.

Partial labels: a mask may be *partial* (``painted`` lists the classes an annotator
painted). :func:`class_validity` and :func:`labels_for_ce` say which pixels' truth is
known, for losses that must not learn "background" where nobody looked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.transforms import Resize, ScaleIntensityRangePercentiles

from cps4_engine.io import Volume, from_sagittal, to_sagittal

IGNORE_INDEX = -100
LOWER_PERCENTILE = 0.5
UPPER_PERCENTILE = 99.5


@dataclass
class SliceStack:
    """A volume as a stack of model-sized sagittal slices, with what is needed to go back.

    Attributes:
        images: float32 ``(S, 1, H, W)`` intensities in [0, 1].
        labels: int64 ``(S, H, W)`` class ids, or None for unlabeled volumes.
        painted: sorted class ids painted in a partial mask; None when the mask is
            complete (or absent).
        volume_shape: voxel shape ``(X, Y, Z)`` of the source volume.
        affine: the source volume's 4x4 affine.
        sagittal_shape: ``(S, rows, cols)`` of the display-orientation slices before
            resizing.
    """

    images: np.ndarray
    labels: np.ndarray | None
    painted: tuple[int, ...] | None
    volume_shape: tuple[int, int, int]
    affine: np.ndarray
    sagittal_shape: tuple[int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        """Model slice size ``(H, W)``."""
        return (int(self.images.shape[2]), int(self.images.shape[3]))

    @property
    def num_slices(self) -> int:
        """Number of sagittal slices ``S``."""
        return int(self.images.shape[0])


def _resize_planes(planes: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Resize ``(N, h, w)`` planes to ``(N, *size)`` with MONAI (planes act as channels)."""
    if tuple(planes.shape[1:]) == tuple(size):
        return np.array(planes)
    resize = Resize(spatial_size=tuple(size), mode=mode, anti_aliasing=False)
    return np.asarray(resize(torch.as_tensor(np.ascontiguousarray(planes))))


def scale_intensity(array: np.ndarray) -> np.ndarray:
    """Per-volume percentile scaling to float32 [0, 1] (0.5th -> 0, 99.5th -> 1, clipped).

    Args:
        array: voxel intensities of any shape and real dtype.
    """
    scaler = ScaleIntensityRangePercentiles(
        lower=LOWER_PERCENTILE, upper=UPPER_PERCENTILE, b_min=0.0, b_max=1.0, clip=True
    )
    scaled = np.asarray(scaler(torch.as_tensor(np.asarray(array, dtype=np.float32)[None])))[0]
    return scaled.astype(np.float32, copy=False)


def prepare_volume(
    volume: Volume,
    size: tuple[int, int],
    label: Volume | np.ndarray | None = None,
    painted: Sequence[int] | None = None,
) -> SliceStack:
    """Turn a volume (and its mask) into model-sized sagittal slices.

    Args:
        volume: the image volume ``(X, Y, Z)``.
        size: model slice size ``(H, W)`` in pixels (rows superior -> inferior, columns
            anterior -> posterior).
        label: mask in the same voxel grid, as a Volume or an ``(X, Y, Z)`` integer array.
        painted: class ids painted in a partial mask; None for a complete mask.

    Returns:
        A :class:`SliceStack` with ``images (S, 1, H, W)`` and ``labels (S, H, W)``.

    Raises:
        ValueError: the mask's shape differs from the volume's.
    """
    size = (int(size[0]), int(size[1]))
    sagittal = to_sagittal(scale_intensity(volume.array), volume.affine)
    images = _resize_planes(sagittal, size, mode="bilinear").astype(np.float32)
    images = np.clip(images, 0.0, 1.0)[:, None]
    labels = None
    if label is not None:
        label_array = label.array if isinstance(label, Volume) else np.asarray(label)
        if label_array.shape != volume.array.shape:
            raise ValueError(
                f"mask shape {label_array.shape} differs from image shape {volume.array.shape}"
            )
        label_slices = to_sagittal(label_array.astype(np.int64), volume.affine)
        labels = _resize_planes(label_slices, size, mode="nearest-exact").astype(np.int64)
    return SliceStack(
        images=images,
        labels=labels,
        painted=None if painted is None else tuple(sorted(int(c) for c in painted)),
        volume_shape=volume.shape,
        affine=np.array(volume.affine, dtype=np.float64),
        sagittal_shape=tuple(int(n) for n in sagittal.shape),  # type: ignore[arg-type]
    )


def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def restore_labels(stack: SliceStack, labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Put per-slice class ids back into the source volume's voxel grid (nearest).

    Args:
        stack: the stack the predictions were made on.
        labels: ``(S, H, W)`` integer class ids.

    Returns:
        ``(X, Y, Z)`` uint8 class ids aligned with the source volume.
    """
    labels = _as_numpy(labels)
    expected = (stack.num_slices, *stack.size)
    if labels.shape != expected:
        raise ValueError(f"labels have shape {labels.shape}, expected {expected}")
    planes = _resize_planes(labels.astype(np.int64), stack.sagittal_shape[1:], mode="nearest-exact")
    return from_sagittal(planes.astype(np.uint8), stack.affine, stack.volume_shape)


def restore_probabilities(stack: SliceStack, probabilities: np.ndarray | torch.Tensor) -> np.ndarray:
    """Put per-slice class probabilities back into the source voxel grid (bilinear).

    Args:
        stack: the stack the predictions were made on.
        probabilities: ``(S, C, H, W)`` values in [0, 1].

    Returns:
        ``(C, X, Y, Z)`` float32 probabilities aligned with the source volume. Memory is
        ``4 * C * X * Y * Z`` bytes.
    """
    probabilities = _as_numpy(probabilities).astype(np.float32, copy=False)
    if probabilities.ndim != 4 or probabilities.shape[0] != stack.num_slices or tuple(
        probabilities.shape[2:]
    ) != stack.size:
        raise ValueError(
            f"probabilities have shape {probabilities.shape}, expected "
            f"({stack.num_slices}, C, {stack.size[0]}, {stack.size[1]})"
        )
    channels = probabilities.shape[1]
    restored = np.empty((channels, *stack.volume_shape), dtype=np.float32)
    for channel in range(channels):
        planes = _resize_planes(probabilities[:, channel], stack.sagittal_shape[1:], mode="bilinear")
        restored[channel] = from_sagittal(np.clip(planes, 0.0, 1.0), stack.affine, stack.volume_shape)
    return restored


def class_validity(
    labels: np.ndarray | torch.Tensor, painted: Sequence[int] | None, num_classes: int
) -> np.ndarray | torch.Tensor:
    """Where each class's truth is known.

    Complete masks (``painted`` None): everywhere. Partial masks: everywhere for the
    painted classes (an unpainted pixel is known not to be a painted class); for every
    other class, background included, only on pixels painted as some class (they are known
    to be that class and not this one).

    Args:
        labels: ``(..., H, W)`` integer class ids, numpy or torch (e.g. ``(S, H, W)``).
        painted: class ids painted in a partial mask, shared by every slice; None if complete.
        num_classes: number of classes ``C`` including background.

    Returns:
        bool ``(S, C, H, W)`` (class axis inserted after the first axis), of the same
        library (numpy or torch, same device) as ``labels``.
    """
    tensor = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    shape = (tensor.shape[0], num_classes, *tensor.shape[1:])
    if painted is None:
        validity = torch.ones(shape, dtype=torch.bool, device=tensor.device)
    else:
        painted_pixels = (tensor != 0).unsqueeze(1)
        validity = painted_pixels.expand(shape).clone()
        for class_id in painted:
            if 0 <= int(class_id) < num_classes:
                validity[:, int(class_id)] = True
    return validity if isinstance(labels, torch.Tensor) else validity.numpy()


def labels_for_ce(
    labels: np.ndarray | torch.Tensor, painted: Sequence[int] | None
) -> np.ndarray | torch.Tensor:
    """Class-id targets for cross-entropy: unknown pixels of a partial mask are ignored.

    Args:
        labels: ``(...)`` integer class ids, numpy or torch.
        painted: class ids painted in a partial mask; None if the mask is complete.

    Returns:
        int64 copy of ``labels`` (same library) where, for a partial mask, every
        background pixel is :data:`IGNORE_INDEX` (its class is unknown).
    """
    if isinstance(labels, torch.Tensor):
        targets = labels.to(torch.int64).clone()
        if painted is not None:
            targets[targets == 0] = IGNORE_INDEX
        return targets
    targets = np.asarray(labels).astype(np.int64)
    if painted is not None:
        targets[targets == 0] = IGNORE_INDEX
    return targets
