"""Tiny spine-like datasets and a fake stage-1 model for the stage-2 tests.

Volumes are 4 sagittal slices of 24 (anterior-posterior) x 48 (superior-inferior)
voxels: three vertebrae (L3, L4, L5: ids 4, 3, 2) with the discs between them (ids 13,
12), bright on a dark background, plus noise. The identity affine makes voxel axis 0 the
sagittal axis.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cps4_engine.io import write_volume

SHAPE = (4, 24, 48)
LEVELS = ((4, 13), (3, 12), (2, None))


def phantom(seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image, label)`` pair; ``scale`` multiplies the intensities."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, dtype=np.uint8)
    top = int(rng.integers(2, 6))
    for vertebra, disc in LEVELS:
        label[:, 4:18, top : top + 9] = vertebra
        top += 9
        if disc is not None:
            label[:, 5:17, top : top + 4] = disc
            top += 4
    image = np.where(label == 0, 0.1, np.where(label >= 11, 0.5, 0.9))
    image = image + rng.normal(0.0, 0.03, SHAPE)
    return (image * scale).astype(np.float32), label


def write_dataset(root: Path, cases: int, seed: int = 0, scales: list[float] | None = None) -> Path:
    """An MRSpineSeg-layout folder (``MR/Case{N}.nii.gz``, ``Mask/mask_case{N}.nii.gz``)."""
    (root / "MR").mkdir(parents=True, exist_ok=True)
    (root / "Mask").mkdir(parents=True, exist_ok=True)
    for index in range(cases):
        scale = scales[index] if scales else 1.0
        image, label = phantom(seed * 100 + index, scale)
        write_volume(root / "MR" / f"Case{index + 1}.nii.gz", image, np.eye(4))
        write_volume(root / "Mask" / f"mask_case{index + 1}.nii.gz", label, np.eye(4))
    return root


def mark_partial(root: Path, case_number: int, painted: list[int]) -> None:
    """Keep only ``painted`` classes in a case's mask and write its partial sidecar."""
    from cps4_engine.io import read_volume

    path = root / "Mask" / f"mask_case{case_number}.nii.gz"
    volume = read_volume(path, kind="label")
    kept = np.where(np.isin(volume.array, painted), volume.array, 0).astype(np.uint8)
    write_volume(path, kept, volume.affine)
    sidecar = root / "Mask" / f"mask_case{case_number}.cps4.json"
    sidecar.write_text(json.dumps({"painted": sorted(painted), "complete": False}))


def write_stage1_run(run_dir: Path, scheme: str = "mrspineseg", stage: int = 1) -> Path:
    """A run folder with just the ``config.json`` a stage-1 check reads."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"stage": stage, "scheme": {"name": scheme}}))
    return run_dir


class CountingVLM:
    """A stand-in stage-1 model counting its calls.

    ``class_probabilities`` claims L4 (class 3, channel 2) with probability 0.9 wherever
    the slice is bright like a vertebra, and nothing elsewhere: crude, but deterministic
    and recognisable in pseudo-labels.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.slices_seen = 0

    def class_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.slices_seen += images.shape[0]
        maps = torch.zeros(images.shape[0], 19, *images.shape[2:])
        bright = images[:, 0] > 0.6
        maps[:, 2] = bright.float() * 0.9
        return maps
