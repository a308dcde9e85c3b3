"""From a volume to model-ready sagittal slices, and from slice predictions back.

:func:`prepare_volume` cuts a volume into display-orientation sagittal slices
(:func:`cps4_engine.io.to_sagittal`), scales intensities per volume to [0, 1] between the
0.5th and 99.5th percentiles (MONAI ``ScaleIntensityRangePercentiles``), and resizes every
slice to the preset's ``(H, W)`` (MONAI ``Resize``: bilinear for images, nearest for
labels). The whole slice is kept; no crop, so nothing is lost and the inverse is exact
up to interpolation. :func:`restore_labels` and :func:`restore_probabilities` undo it.

Two ways to fit a slice into ``(H, W)``:

- ``keep_aspect=False`` (runs saved before the option): the slice is stretched to
  ``(H, W)`` whatever its shape, so a square 224 x 224 mm slice resized to 128 x 64
  loses half its resolution along anterior-posterior.
- ``keep_aspect=True``: the slice is scaled by one factor (in millimetres, from the
  affine's in-plane spacing) so that it fits, and centred with zero padding
  (*letterboxing*); vertebrae keep their shape and every slice of every volume has the
  same millimetres per pixel along both axes. :attr:`SliceStack.content_box` records
  where the slice lies.

Context (2.5D): :func:`with_context` stacks each slice with its ``k`` neighbours on
either side along the sagittal axis as channels, so the network sees the body's 3D
shape; slices at the volume's edge repeat the edge slice.

Partial labels: a mask may be *partial* (``painted`` lists the classes an annotator
painted). :func:`class_validity` and :func:`labels_for_ce` say which pixels' truth is
known, for losses that must not learn "background" where nobody looked.

A partial mask that taught nothing about background would let a network call the whole
volume spine (one real vb3 case with three vertebrae painted: 100 % of a test volume
predicted foreground, BENCHMARKS.md "Partial masks teach background").
:func:`mark_known_background` therefore applies one rule: the vertebrae and discs nobody
painted lie along the spine, above and below the painted ones, so every unpainted voxel
inside the *spine column* -- the painted voxels projected along superior-inferior onto
the left-right x anterior-posterior plane and widened by :data:`BACKGROUND_MARGIN_MM` --
stays unknown (:data:`UNKNOWN_LABEL`), and every voxel outside it is known background
(0). On the 20 vb3 masks with L1-L3 or L3-L5 painted, a 30 mm margin leaves no voxel of
an unpainted vertebra outside the column (20 mm: up to 2.9 % of one; the margin was set
from these dev masks) and makes about half of each volume known background.
:func:`cps4_engine.data.load_case` marks every partial mask it reads this way, so both
training stages see the same rule; the losses then read ``unknown=UNKNOWN_LABEL``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.transforms import Resize, ScaleIntensityRangePercentiles

from cps4_engine.io import Volume, from_sagittal, sagittal_spacing, to_sagittal

IGNORE_INDEX = -100
UNKNOWN_LABEL = IGNORE_INDEX
"""Label value of a marked partial mask's voxels whose class is unknown
(:func:`mark_known_background`); negative, so one-hot encodings and ``labels > 0`` tests
never read it as a class."""
BACKGROUND_MARGIN_MM = 30.0
"""Width of the spine column around the painted structures, in millimetres
(:func:`mark_known_background`)."""
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
        content_box: ``(top, left, height, width)`` in model pixels of the region the
            slice occupies; the whole ``(0, 0, H, W)`` unless letterboxed.
    """

    images: np.ndarray
    labels: np.ndarray | None
    painted: tuple[int, ...] | None
    volume_shape: tuple[int, int, int]
    affine: np.ndarray
    sagittal_shape: tuple[int, int, int]
    content_box: tuple[int, int, int, int] | None = None

    def box(self) -> tuple[int, int, int, int]:
        """:attr:`content_box`, or the whole slice when it is None."""
        return self.content_box or (0, 0, *self.size)

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


def fit_box(
    plane_shape: tuple[int, int], plane_spacing: tuple[float, float], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Where a slice lands when scaled by one factor to fit ``size`` and centred.

    Args:
        plane_shape: ``(rows, cols)`` of the display-orientation slice in voxels.
        plane_spacing: millimetres per row and per column.
        size: model slice size ``(H, W)``.

    Returns:
        ``(top, left, height, width)`` in model pixels.
    """
    rows_mm = plane_shape[0] * plane_spacing[0]
    cols_mm = plane_shape[1] * plane_spacing[1]
    pixels_per_mm = min(size[0] / rows_mm, size[1] / cols_mm)
    height = int(min(size[0], max(1, round(rows_mm * pixels_per_mm))))
    width = int(min(size[1], max(1, round(cols_mm * pixels_per_mm))))
    return ((size[0] - height) // 2, (size[1] - width) // 2, height, width)


def _letterbox(planes: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int], mode: str) -> np.ndarray:
    top, left, height, width = box
    resized = _resize_planes(planes, (height, width), mode)
    out = np.zeros((planes.shape[0], *size), dtype=resized.dtype)
    out[:, top : top + height, left : left + width] = resized
    return out


def with_context(images: np.ndarray | torch.Tensor, context: int) -> np.ndarray | torch.Tensor:
    """Stack every slice with ``context`` neighbours on each side as channels (2.5D).

    Args:
        images: ``(S, 1, H, W)`` slices of one volume, in sagittal order.
        context: neighbours per side ``k`` (0 returns ``images`` unchanged).

    Returns:
        ``(S, 1 + 2k, H, W)`` of the same library; channel ``k`` is the slice itself,
        channel ``k - j`` its ``j``-th neighbour before it, ``k + j`` after it; beyond the
        volume's edge the edge slice is repeated.
    """
    if context <= 0:
        return images
    count = images.shape[0]
    offsets = np.arange(-context, context + 1)
    index = np.clip(np.arange(count)[:, None] + offsets[None, :], 0, count - 1)
    if isinstance(images, torch.Tensor):
        return images[:, 0][torch.from_numpy(index)]
    return np.asarray(images)[:, 0][index]


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
    keep_aspect: bool = False,
) -> SliceStack:
    """Turn a volume (and its mask) into model-sized sagittal slices.

    Args:
        volume: the image volume ``(X, Y, Z)``.
        size: model slice size ``(H, W)`` in pixels (rows superior -> inferior, columns
            anterior -> posterior).
        label: mask in the same voxel grid, as a Volume or an ``(X, Y, Z)`` integer array.
        painted: class ids painted in a partial mask; None for a complete mask.
        keep_aspect: letterbox the slice (one scale factor in mm, zero padding) instead
            of stretching it to ``size`` (see the module doc).

    Returns:
        A :class:`SliceStack` with ``images (S, 1, H, W)`` and ``labels (S, H, W)``.

    Raises:
        ValueError: the mask's shape differs from the volume's.
    """
    size = (int(size[0]), int(size[1]))
    sagittal = to_sagittal(scale_intensity(volume.array), volume.affine)
    box = None
    if keep_aspect:
        box = fit_box(sagittal.shape[1:], sagittal_spacing(volume.affine)[1:], size)
        images = _letterbox(sagittal, size, box, mode="bilinear").astype(np.float32)
    else:
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
        if box is None:
            labels = _resize_planes(label_slices, size, mode="nearest-exact").astype(np.int64)
        else:
            labels = _letterbox(label_slices, size, box, mode="nearest-exact").astype(np.int64)
    return SliceStack(
        images=images,
        labels=labels,
        painted=None if painted is None else tuple(sorted(int(c) for c in painted)),
        volume_shape=volume.shape,
        affine=np.array(volume.affine, dtype=np.float64),
        sagittal_shape=tuple(int(n) for n in sagittal.shape),  # type: ignore[arg-type]
        content_box=box,
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
    top, left, height, width = stack.box()
    content = labels[:, top : top + height, left : left + width]
    planes = _resize_planes(content.astype(np.int64), stack.sagittal_shape[1:], mode="nearest-exact")
    return from_sagittal(planes.astype(np.uint8), stack.affine, stack.volume_shape)


def _checked_probabilities(stack: SliceStack, probabilities: np.ndarray | torch.Tensor) -> np.ndarray:
    """``probabilities`` as float32 numpy, checked to be ``(S, C, H, W)`` of ``stack``."""
    probabilities = _as_numpy(probabilities).astype(np.float32, copy=False)
    if probabilities.ndim != 4 or probabilities.shape[0] != stack.num_slices or tuple(
        probabilities.shape[2:]
    ) != stack.size:
        raise ValueError(
            f"probabilities have shape {probabilities.shape}, expected "
            f"({stack.num_slices}, C, {stack.size[0]}, {stack.size[1]})"
        )
    return probabilities


def restore_soft_labels(
    stack: SliceStack, probabilities: np.ndarray | torch.Tensor, chunk: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Class ids and confidence in the source voxel grid, from resized probabilities.

    Each slice's class probabilities are resized bilinearly to the source grid and the
    argmax is taken there, so outlines follow the probabilities between model pixels
    instead of the model's pixel staircase (:func:`restore_labels` upsamples the argmax
    by nearest neighbour). Slices are processed ``chunk`` at a time, so memory stays at
    ``4 * C * chunk * rows * cols`` bytes whatever the volume's size.

    Args:
        stack: the stack the predictions were made on.
        probabilities: ``(S, C, H, W)`` class probabilities (summing to 1 over C).
        chunk: slices resized at once.

    Returns:
        ``(labels, confidence)``: uint8 class ids and float32 winning probabilities,
        both of the source volume's shape.
    """
    probabilities = torch.as_tensor(_checked_probabilities(stack, probabilities))
    top, left, height, width = stack.box()
    rows, cols = stack.sagittal_shape[1:]
    labels = np.empty((stack.num_slices, rows, cols), dtype=np.uint8)
    confidence = np.empty((stack.num_slices, rows, cols), dtype=np.float32)
    for start in range(0, stack.num_slices, chunk):
        content = probabilities[start : start + chunk, :, top : top + height, left : left + width]
        count, channels = content.shape[:2]
        planes = _resize_planes(content.reshape(count * channels, height, width).numpy(), (rows, cols), mode="bilinear")
        best, winner = torch.from_numpy(planes).reshape(count, channels, rows, cols).max(dim=1)
        labels[start : start + chunk] = winner.numpy().astype(np.uint8)
        confidence[start : start + chunk] = best.clamp(0.0, 1.0).numpy()
    return (
        from_sagittal(labels, stack.affine, stack.volume_shape),
        from_sagittal(confidence, stack.affine, stack.volume_shape),
    )


def restore_probabilities(stack: SliceStack, probabilities: np.ndarray | torch.Tensor) -> np.ndarray:
    """Put per-slice class probabilities back into the source voxel grid (bilinear).

    Args:
        stack: the stack the predictions were made on.
        probabilities: ``(S, C, H, W)`` values in [0, 1].

    Returns:
        ``(C, X, Y, Z)`` float32 probabilities aligned with the source volume. Memory is
        ``4 * C * X * Y * Z`` bytes.
    """
    probabilities = _checked_probabilities(stack, probabilities)
    channels = probabilities.shape[1]
    top, left, height, width = stack.box()
    restored = np.empty((channels, *stack.volume_shape), dtype=np.float32)
    for channel in range(channels):
        content = probabilities[:, channel, top : top + height, left : left + width]
        planes = _resize_planes(content, stack.sagittal_shape[1:], mode="bilinear")
        restored[channel] = from_sagittal(np.clip(planes, 0.0, 1.0), stack.affine, stack.volume_shape)
    return restored


def mark_known_background(
    labels: np.ndarray, affine: np.ndarray, margin_mm: float = BACKGROUND_MARGIN_MM
) -> np.ndarray:
    """A partial mask with its known background: unknown voxels become :data:`UNKNOWN_LABEL`.

    The rule (module doc): project the painted voxels along superior-inferior onto the
    left-right x anterior-posterior plane; unpainted voxels whose projection lies within
    ``margin_mm`` of that footprint (Euclidean, in mm) are unknown, every other
    unpainted voxel is background. A mask with nothing painted knows nothing.

    Args:
        labels: ``(X, Y, Z)`` integer class ids of a partial mask (0 = not painted).
        affine: the mask's 4x4 voxel-to-world matrix (finds superior-inferior and the
            spacing, :func:`cps4_engine.io.to_sagittal`).
        margin_mm: how far beyond the painted footprint the column reaches, mm (>= 0).

    Returns:
        int16 ``(X, Y, Z)``: painted ids kept, 0 for known background,
        :data:`UNKNOWN_LABEL` for unknown voxels.
    """
    from scipy.ndimage import distance_transform_edt

    if not margin_mm >= 0:
        raise ValueError(f"margin_mm must be 0 or more, got {margin_mm}")
    labels = np.asarray(labels)
    slices = to_sagittal(labels, affine)  # (S, rows superior->inferior, cols anterior->posterior)
    spacing = sagittal_spacing(affine)
    footprint = (slices > 0).any(axis=1)  # (S, cols): left-right x anterior-posterior
    if footprint.any():
        distance = distance_transform_edt(~footprint, sampling=(spacing[0], spacing[2]))
        column = np.broadcast_to((distance <= margin_mm)[:, None, :], slices.shape)
    else:
        column = np.ones(slices.shape, dtype=bool)
    marked = slices.astype(np.int16)
    marked[(slices == 0) & column] = UNKNOWN_LABEL
    return from_sagittal(marked, affine, labels.shape)


def known_pixels(
    labels: torch.Tensor, partial: torch.Tensor, painted: torch.Tensor, unknown: int = 0
) -> torch.Tensor:
    """Where each class's truth is known, row by row: the one rule of partial masks.

    Complete rows: everywhere. Partial rows: everywhere for the painted classes (an
    unknown pixel is known not to be a painted class); for every other class, background
    included, only on pixels whose label is not ``unknown`` (painted pixels, and the
    known background of a mask marked by :func:`mark_known_background`).

    Args:
        labels: int ``(B, H, W)`` class ids (any number of trailing axes).
        partial: bool ``(B,)``: the row's mask is partial.
        painted: bool ``(B, C)``: the classes painted in each row's partial mask.
        unknown: label value of unknown pixels in partial rows: 0 for a mask as
            painted, :data:`UNKNOWN_LABEL` for a marked one.

    Returns:
        bool ``(B, C, H, W)`` (new, writable) on ``labels``' device.
    """
    partial = partial.to(device=labels.device, dtype=torch.bool)
    known_classes = (~partial).unsqueeze(1) | painted.to(device=labels.device, dtype=torch.bool)
    known_classes = known_classes.view(*known_classes.shape, *([1] * (labels.ndim - 1)))
    return known_classes | (labels != unknown).unsqueeze(1)


def class_validity(
    labels: np.ndarray | torch.Tensor, painted: Sequence[int] | None, num_classes: int, unknown: int = 0
) -> np.ndarray | torch.Tensor:
    """Where each class's truth is known, for slices of one mask (:func:`known_pixels`).

    Args:
        labels: ``(..., H, W)`` integer class ids, numpy or torch (e.g. ``(S, H, W)``).
        painted: class ids painted in a partial mask, shared by every slice; None if complete.
        num_classes: number of classes ``C`` including background.
        unknown: label value of unknown pixels in a partial mask: 0 for a mask as
            painted, :data:`UNKNOWN_LABEL` for one marked by :func:`mark_known_background`.

    Returns:
        bool ``(S, C, H, W)`` (class axis inserted after the first axis), of the same
        library (numpy or torch, same device) as ``labels``.
    """
    tensor = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    rows = tensor.shape[0]
    painted_row = torch.zeros(num_classes, dtype=torch.bool)
    for class_id in painted or ():
        if 0 <= int(class_id) < num_classes:
            painted_row[int(class_id)] = True
    partial = torch.full((rows,), painted is not None, dtype=torch.bool)
    validity = known_pixels(tensor, partial, painted_row.expand(rows, num_classes), unknown)
    return validity if isinstance(labels, torch.Tensor) else validity.numpy()


def ce_targets(labels: torch.Tensor, partial: torch.Tensor, unknown: int = 0) -> torch.Tensor:
    """Cross-entropy targets, row by row: unknown pixels of partial rows are ignored.

    Args:
        labels: int ``(B, H, W)`` class ids.
        partial: bool ``(B,)``: the row's mask is partial.
        unknown: label value of unknown pixels in partial rows (see :func:`known_pixels`).

    Returns:
        int64 ``(B, H, W)``: ``labels`` with :data:`IGNORE_INDEX` where partial rows'
        labels equal ``unknown``.
    """
    partial = partial.to(device=labels.device, dtype=torch.bool)
    ignored = partial.view(-1, *([1] * (labels.ndim - 1))) & (labels == unknown)
    return torch.where(ignored, IGNORE_INDEX, labels.to(torch.int64))


def labels_for_ce(
    labels: np.ndarray | torch.Tensor, painted: Sequence[int] | None, unknown: int = 0
) -> np.ndarray | torch.Tensor:
    """Class-id targets for cross-entropy of one mask (:func:`ce_targets`).

    Args:
        labels: ``(...)`` integer class ids, numpy or torch.
        painted: class ids painted in a partial mask; None if the mask is complete.
        unknown: label value of unknown pixels in a partial mask (see :func:`class_validity`).

    Returns:
        int64 copy of ``labels`` (same library) where, for a partial mask, every pixel
        labelled ``unknown`` is :data:`IGNORE_INDEX`.
    """
    tensor = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    targets = ce_targets(tensor, torch.tensor(painted is not None), unknown)
    return targets if isinstance(labels, torch.Tensor) else targets.numpy()
