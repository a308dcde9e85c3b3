"""Weak/strong augmentation: joint geometry, intensity-only strong view, reproducibility."""

from __future__ import annotations

import torch

from cps4_engine.augment import SliceAugmenter


def _batch() -> dict[str, torch.Tensor]:
    label = torch.zeros(3, 32, 16, dtype=torch.int64)
    label[:, 10:20, 4:12] = 4
    image = (label > 0).float().unsqueeze(1) * 0.8 + 0.1
    prompt = torch.zeros(3, 19, 32, 16)
    prompt[:, 3] = (label == 4).float()
    return {"image": image, "label": label, "prompt": prompt}


def test_weak_view_moves_image_label_and_prompt_maps_together() -> None:
    augmenter = SliceAugmenter(seed=3, rotate_degrees=25, weak_probability=1.0)
    batch = _batch()
    out = augmenter.weak(batch)
    assert out["image"].shape == (3, 1, 32, 16)
    assert out["label"].dtype == torch.int64 and out["label"].shape == (3, 32, 16)
    assert out["prompt"].shape == (3, 19, 32, 16)
    assert not torch.equal(out["label"], batch["label"])
    assert set(out["label"].unique().tolist()) <= {0, 4}
    bright = out["image"][:, 0] > 0.5
    inside = out["label"] == 4
    agreement = (bright == inside).float().mean().item()
    assert agreement > 0.97
    prompt_inside = out["prompt"][:, 3] > 0.5
    assert (prompt_inside == inside).float().mean().item() > 0.97


def test_strong_view_changes_intensities_but_not_geometry_and_stays_in_range() -> None:
    augmenter = SliceAugmenter(seed=1, strong_probability=1.0)
    images = _batch()["image"]
    strong = augmenter.strong(images)
    assert strong.shape == images.shape
    assert strong.min() >= 0.0 and strong.max() <= 1.0
    assert (strong - images).abs().mean() > 0.01
    foreground = images[:, 0] > 0.5
    assert strong[:, 0][foreground].mean() > strong[:, 0][~foreground].mean() + 0.2


def test_same_seed_gives_same_augmentation() -> None:
    batch = _batch()
    first = SliceAugmenter(seed=7, weak_probability=1.0, strong_probability=1.0)
    second = SliceAugmenter(seed=7, weak_probability=1.0, strong_probability=1.0)
    assert torch.equal(first.weak(batch)["label"], second.weak(batch)["label"])
    assert torch.allclose(first.strong(batch["image"]), second.strong(batch["image"]))


def test_both_views_are_float32_and_match_inside_a_cpu_bfloat16_step() -> None:
    batch = _batch()
    outside = SliceAugmenter(seed=5, weak_probability=1.0, strong_probability=1.0)
    inside = SliceAugmenter(seed=5, weak_probability=1.0, strong_probability=1.0)
    expected_weak, expected_strong = outside.weak(batch), outside.strong(batch["image"])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        weak, strong = inside.weak(batch), inside.strong(batch["image"])
    assert weak["image"].dtype == strong.dtype == torch.float32
    assert torch.equal(weak["label"], expected_weak["label"])
    assert torch.allclose(weak["image"], expected_weak["image"])
    assert torch.allclose(strong, expected_strong)
