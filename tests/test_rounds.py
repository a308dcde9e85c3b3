"""Refinement rounds: the dataset view, fine-tuning from the previous round, held-out metrics."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cps4_engine.active.rounds import RoundConfig, retrain_round, round_dir, write_dataset_view
from cps4_engine.active.workspace import Workspace
from cps4_engine.data import open_dataset
from cps4_engine.errors import CPS4Error
from cps4_engine.events import CancelToken
from cps4_engine.io import read_volume, write_volume
from cps4_engine.labels import mrspineseg_scheme

SCHEME = mrspineseg_scheme()
SHAPE = (4, 24, 48)
L5, L4, L3 = 2, 3, 4


def phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 4-slice volume with L3, L4, L5 stacked along voxel axis 2 (identity affine)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, dtype=np.uint8)
    top = int(rng.integers(2, 8))
    for vertebra in (L3, L4, L5):
        label[:, 4:18, top : top + 10] = vertebra
        top += 13
    image = np.where(label == 0, 0.1, 0.9) + rng.normal(0.0, 0.03, SHAPE)
    return image.astype(np.float32), label


@pytest.fixture()
def workspace(tmp_path: Path) -> Workspace:
    """case0 labeled complete, case1 partially labeled (L3), case2 and case3 unlabeled,
    case4 held out."""
    cases = []
    for index in range(5):
        image, label = phantom(index)
        image_path = write_volume(tmp_path / "data" / f"case{index}.nii.gz", image, np.eye(4))
        label_path = write_volume(tmp_path / "data" / f"case{index}_seg.nii.gz", label, np.eye(4))
        cases.append(SimpleNamespace(case_id=f"case{index}", image_path=image_path, label_path=label_path, painted=None))
    workspace = Workspace.create(
        tmp_path / "ws", cases, SCHEME, heldout=["case4"], import_labels=["case0"]
    )
    _, label = phantom(1)
    workspace.add_prediction("case1", label, round_=0)
    workspace.set_class_status("case1", L3, "accepted")
    return workspace


def test_dataset_view_holds_human_classes_only(workspace: Workspace, tmp_path: Path) -> None:
    stems = write_dataset_view(workspace, tmp_path / "view")
    assert list(stems.values()) == ["case0", "case1", "case2", "case3"]
    dataset = open_dataset(tmp_path / "view")
    by_stem = {case.case_id: case for case in dataset.cases}
    assert len(by_stem) == 4, "the held-out case stays out of training"
    complete, partial, unlabeled = (by_stem[s] for s in ("case0000", "case0001", "case0002"))
    assert complete.is_labeled and not complete.is_partial
    assert partial.is_partial and tuple(partial.painted) == (L3,)
    assert set(np.unique(read_volume(partial.label_path, kind="label").array)) == {0, L3}
    assert not unlabeled.is_labeled
    np.testing.assert_array_equal(
        read_volume(complete.label_path, kind="label").array, workspace.current_labels("case0")
    )
    with pytest.raises(CPS4Error, match="exists already"):
        write_dataset_view(workspace, tmp_path / "view")


def test_rounds_fine_tune_predict_and_record_heldout_dice(workspace: Workspace) -> None:
    config = RoundConfig(method="supervised", preset="tiny", max_steps=2, device="cpu")
    first = retrain_round(workspace, config)
    assert first is not None and first["round"] == 1
    assert first["trained_on"] == ["case0", "case1"]
    assert 0.0 <= first["metrics"]["mean_dice"] <= 1.0
    assert set(first["metrics"]["cases"]) == {"case4"}
    for case_id in ("case2", "case3"):
        statuses = workspace.class_statuses(case_id)
        assert all(s.status == "machine" and s.round == 1 for s in statuses.values())
        assert workspace.uncertainty(case_id) is not None
    assert workspace.class_statuses("case1")[L3].status == "accepted"
    assert workspace.versions("case0")[-1]["author"] == "import", "complete masks stay"

    _, truth = phantom(2)
    workspace.save_human_labels("case2", truth, statuses={c: "corrected" for c in (L3, L4, L5)})
    second = retrain_round(workspace, config)
    assert second is not None and second["round"] == 2
    assert second["trained_on"] == ["case0", "case1", "case2"]
    assert second["predicted"] == ["case1", "case3"]
    settings = (round_dir(workspace, 2) / "model" / "config.json").read_text()
    assert "round_0001" in settings, "round 2 starts from round 1's weights"
    reopened = Workspace.open(workspace.root)
    assert [r["round"] for r in reopened.rounds] == [1, 2]


def test_a_cancelled_round_records_nothing(workspace: Workspace) -> None:
    cancel = CancelToken()
    cancel.cancel()
    config = RoundConfig(method="supervised", preset="tiny", max_steps=2, device="cpu")
    assert retrain_round(workspace, config, cancel=cancel) is None
    assert workspace.rounds == [] and workspace.current_round == 0


def test_a_round_needs_a_human_label(tmp_path: Path) -> None:
    image, _ = phantom(0)
    path = write_volume(tmp_path / "only.nii.gz", image, np.eye(4))
    case = SimpleNamespace(case_id="only", image_path=path, label_path=None, painted=None)
    workspace = Workspace.create(tmp_path / "ws", [case], SCHEME)
    with pytest.raises(CPS4Error, match="no training case has a human label"):
        retrain_round(workspace, RoundConfig(preset="tiny", max_steps=1, device="cpu"))
