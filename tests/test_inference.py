"""Volume prediction: geometry round trip in any orientation, run loading, written files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from cps4_engine.checkpoint import save_weights, write_run_config
from cps4_engine.errors import CPS4Error
from cps4_engine.inference import (
    LoadedSegmenter,
    load_segmenter,
    predict_files,
    predict_slices,
    predict_volume,
    shift_rows,
)
from cps4_engine.io import Volume, read_volume, to_sagittal, write_volume
from cps4_engine.models.segmenter import build_segmenter, segmenter_config
from cps4_engine.options import DEFAULT_TEST_TIME_SHIFTS
from cps4_engine.presets import get_preset

# voxel axis 0 -> left (sagittal), axis 1 -> inferior, axis 2 -> anterior, unequal spacing
OBLIQUE_AFFINE = np.array(
    [[-1.5, 0, 0, 10], [0, 0, 0.8, -5], [0, -1.2, 0, 30], [0, 0, 0, 1]], dtype=np.float64
)


class ThresholdNet(nn.Module):
    """Class 2 wherever the scaled intensity exceeds 0.5, background elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(40.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.full((images.shape[0], 20, *images.shape[2:]), -20.0)
        logits[:, 0] = 0.0
        logits[:, 2] = self.gain * (images[:, 0] - 0.5)
        return logits


class UpperHalfNet(nn.Module):
    """Class 2 in the upper half of the frame whatever the image: knows only where it looks."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.full((images.shape[0], 20, *images.shape[2:]), -50.0)
        half = images.shape[-2] // 2
        logits[:, 2, :half] = 50.0
        logits[:, 0, half:] = 50.0
        return logits + 0.0 * images[:, :1]


def _box_volume() -> Volume:
    array = np.zeros((5, 24, 16), dtype=np.float32)
    array[1:4, 3:15, 2:9] = 100.0
    return Volume(array, OBLIQUE_AFFINE)


def test_prediction_returns_to_the_volume_grid_in_any_orientation() -> None:
    volume = _box_volume()
    sagittal_shape = to_sagittal(volume.array, volume.affine).shape
    prediction = predict_volume(ThresholdNet(), volume, batch_size=2, slice_size=sagittal_shape[1:])
    assert prediction.labels.shape == volume.shape
    assert np.array_equal(prediction.labels, np.where(volume.array > 50, 2, 0))
    assert prediction.probabilities.shape == (20, *volume.shape)
    assert np.allclose(prediction.probabilities.sum(0), 1.0, atol=1e-4)
    assert np.all(prediction.confidence[volume.array > 50] > 0.99)
    resized = predict_volume(ThresholdNet(), volume, slice_size=(32, 16), keep_probabilities=False)
    assert resized.labels.shape == volume.shape and resized.probabilities is None
    agreement = np.mean(resized.labels == prediction.labels)
    assert agreement > 0.95


@pytest.mark.parametrize(
    ("rows", "expected"),
    [(0, [1, 2, 3, 4]), (1, [0, 1, 2, 3]), (-1, [2, 3, 4, 0]), (3, [0, 0, 0, 1]), (4, [0, 0, 0, 0]), (-9, [0, 0, 0, 0])],
)
def test_shift_rows_moves_rows_towards_the_feet_and_fills_zeros(rows, expected) -> None:
    slices = torch.arange(1.0, 5.0).reshape(1, 1, 4, 1).expand(2, 3, 4, 5)
    moved = shift_rows(slices, rows)
    assert moved.shape == slices.shape
    assert moved[1, 2, :, 4].tolist() == expected


def test_test_time_shifts_average_each_pixel_over_the_copies_that_kept_it_in_view() -> None:
    # 10 rows, shifts of 20 %: copies moved 2 rows down and up. The network paints the
    # frame's upper half, so moved back its answer covers rows 0-2 (moved down) and rows 0-6
    # (moved up); rows 8-9 left the view of the copy moved down, rows 0-1 of the copy moved up.
    images = torch.rand(3, 1, 10, 4)
    plain = predict_slices(UpperHalfNet(), images)
    assert torch.allclose(plain[0, 2, :, 0], torch.tensor([1.0] * 5 + [0.0] * 5), atol=1e-6)
    averaged = predict_slices(UpperHalfNet(), images, shifts=(0.0, -0.2, 0.2))
    expected = torch.tensor([1, 1, 1, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 0, 0, 0])
    assert torch.allclose(averaged[:, 2], expected.reshape(1, 10, 1).expand(3, 10, 4), atol=1e-6)
    assert torch.allclose(averaged.sum(1), torch.ones(3, 10, 4), atol=1e-6)


def test_test_time_shifts_leave_a_network_that_only_looks_at_the_image_unchanged() -> None:
    volume = _box_volume()
    size = to_sagittal(volume.array, volume.affine).shape[1:]
    plain = predict_volume(ThresholdNet(), volume, slice_size=size)
    assert DEFAULT_TEST_TIME_SHIFTS == (0.0,)
    shifted = predict_volume(ThresholdNet(), volume, slice_size=size, shifts=(0.0, -0.1, 0.1))
    assert np.array_equal(plain.labels, shifted.labels)
    assert np.allclose(plain.probabilities, shifted.probabilities, atol=1e-6)


@pytest.fixture()
def stage2_run(tmp_path):
    preset = get_preset("tiny")
    torch.manual_seed(0)
    network = build_segmenter(preset)
    run = tmp_path / "run"
    save_weights(run / "model.safetensors", network.state_dict())
    write_run_config(run, {"stage": 2, "scheme": {"name": "mrspineseg"}, "segmenter": segmenter_config(preset)})
    return run


def test_load_segmenter_and_predict_files(stage2_run, tmp_path) -> None:
    image = tmp_path / "images" / "Case7.nii.gz"
    write_volume(image, _box_volume().array, OBLIQUE_AFFINE)
    model = load_segmenter(stage2_run, "cpu")
    assert model.slice_size == tuple(get_preset("tiny").slice_size)
    assert not model.network.training
    written = predict_files(model, [image.parent], tmp_path / "out", batch_size=3, probabilities=True)
    assert [w.labels.name for w in written] == ["Case7_labels.nii.gz"]
    labels = read_volume(written[0].labels, kind="label")
    assert labels.shape == (5, 24, 16)
    assert np.allclose(labels.affine, OBLIQUE_AFFINE, atol=1e-5)
    assert labels.array.max() < 20
    probabilities = nib.load(str(written[0].probabilities)).get_fdata()
    assert probabilities.shape == (5, 24, 16, 20)
    assert np.allclose(probabilities.sum(-1), 1.0, atol=1e-3)
    confidence = read_volume(written[0].confidence).array
    # the resized winning probability is at least the best of the resized probabilities
    assert np.all(confidence >= probabilities.max(-1) - 1e-4) and confidence.max() <= 1.0
    record = json.loads((tmp_path / "out" / "Case7_levels.json").read_text())
    assert record["test_time_shifts"] == [0.0] and record["level_step"] is True
    predict_files(model, [image], tmp_path / "shifted", shifts=(0.0, -0.1, 0.1), level_step=False)
    record = json.loads((tmp_path / "shifted" / "Case7_levels.json").read_text())
    assert record == {"test_time_shifts": [0.0, -0.1, 0.1], "level_step": False}
    with pytest.raises(CPS4Error, match="--overwrite"):
        predict_files(model, [image], tmp_path / "out")
    assert len(predict_files(model, [image], tmp_path / "out", overwrite=True)) == 1


def test_bad_runs_and_images_give_one_line_errors(stage2_run, tmp_path) -> None:
    stage1 = tmp_path / "stage1"
    write_run_config(stage1, {"stage": 1})
    with pytest.raises(CPS4Error, match="not a stage-2 run"):
        load_segmenter(stage1, "cpu")
    save_weights(stage2_run / "model.safetensors", {"weight": torch.zeros(3)})
    with pytest.raises(CPS4Error, match="do not fit"):
        load_segmenter(stage2_run, "cpu")
    (stage2_run / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CPS4Error, match="model.safetensors"):
        load_segmenter(stage2_run, "cpu")
    run_model = LoadedSegmenter(ThresholdNet(), (24, 16), torch.device("cpu"))
    with pytest.raises(CPS4Error, match="image not found"):
        predict_files(run_model, [tmp_path / "nope.nii.gz"], tmp_path / "out")
    first = tmp_path / "a" / "x.nii.gz"
    second = tmp_path / "b" / "x.nii"
    write_volume(first, np.zeros((4, 4, 4), np.float32), np.eye(4))
    write_volume(second, np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(CPS4Error, match="collide"):
        predict_files(run_model, [first, second], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CPS4Error, match="out of range"):
        predict_files(run_model, [first], tmp_path / "out", shifts=(0.0, 0.6))
    assert not (tmp_path / "out").exists()
