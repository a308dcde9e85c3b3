"""``cps4 workspace`` and ``cps4 queue`` on small workspaces."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cps4_engine.active.queue import case_uncertainty, review_queue
from cps4_engine.active.workspace import Workspace
from cps4_engine.cli import main
from cps4_engine.data import open_dataset, write_label_status
from cps4_engine.io import read_volume, write_volume
from cps4_engine.labels import mrspineseg_scheme

SHAPE = (4, 8, 8)
L4, L3 = 3, 4


def probabilities(p: float) -> np.ndarray:
    """(20, *SHAPE): L4 in rows 0-3 and L3 in rows 4-7 with probability ``p``."""
    probs = np.full((20, *SHAPE), (1.0 - p) / 19, dtype=np.float32)
    probs[L4, :, :4] = p
    probs[L3, :, 4:] = p
    return probs


@pytest.fixture()
def scored_workspace(tmp_path: Path) -> Workspace:
    """Three unlabeled cases with pseudo-labels of known uncertainty, one held-out case."""
    cases = []
    for name in ("sure", "unsure", "middling", "reference"):
        image = write_volume(tmp_path / f"{name}.nii.gz", np.ones(SHAPE, dtype=np.float32), np.eye(4))
        label = None
        if name == "reference":
            label = write_volume(tmp_path / f"{name}_seg.nii.gz", np.full(SHAPE, L4, dtype=np.uint8), np.eye(4))
        cases.append(SimpleNamespace(case_id=name, image_path=image, label_path=label, painted=None))
    workspace = Workspace.create(tmp_path / "ws", cases, mrspineseg_scheme(), heldout=["reference"])
    for name, p in (("sure", 0.97), ("unsure", 0.35), ("middling", 0.7)):
        probs = probabilities(p)
        workspace.add_prediction(name, probs.argmax(0).astype(np.uint8), 1, case_uncertainty(probs))
    return workspace


def test_review_queue_ranks_cases_and_skips_reviewed_classes(scored_workspace: Workspace) -> None:
    assert [entry.case_id for entry in review_queue(scored_workspace)] == ["unsure", "middling", "sure"]
    scored_workspace.set_class_status("unsure", L3, "accepted")
    entry = review_queue(scored_workspace)[0]
    assert [figures.class_id for figures, _ in entry.classes] == [L4]
    labels = scored_workspace.current_labels("unsure")
    scored_workspace.save_human_labels("unsure", labels, statuses={L4: "accepted"})
    assert [entry.case_id for entry in review_queue(scored_workspace)] == ["middling", "sure"]


def test_cps4_queue_prints_the_ranking(scored_workspace: Workspace, capsys: pytest.CaptureFixture) -> None:
    assert main(["queue", str(scored_workspace.root), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["1", "unsure"] and lines[2].split()[:2] == ["2", "middling"]
    assert "L4" in lines[1] and "L3" in lines[1]
    assert lines[-1] == "... 1 more"


def test_cps4_workspace_status_lists_cases_and_provenance(
    scored_workspace: Workspace, capsys: pytest.CaptureFixture
) -> None:
    scored_workspace.set_class_status("sure", L3, "rejected")
    assert main(["workspace", "status", str(scored_workspace.root)]) == 0
    out = capsys.readouterr().out
    assert "4 cases, round 0" in out
    sure = next(line for line in out.splitlines() if line.startswith("sure"))
    assert "in review" in sure and "v0001" in sure and "L4 machine r1" in sure and "L3 rejected" in sure
    assert "held out" in next(line for line in out.splitlines() if line.startswith("reference"))


def test_cli_errors_are_one_line(tmp_path: Path, scored_workspace: Workspace, capsys: pytest.CaptureFixture) -> None:
    assert main(["queue", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err.strip()
    assert "not a cps4 workspace" in error and "\n" not in error
    assert main(["queue", str(scored_workspace.root), "--top", "0"]) == 2
    assert "--top 0" in capsys.readouterr().err
    assert main(["workspace", "status", str(tmp_path)]) == 2


def mrspineseg_folder(root: Path) -> Path:
    """Case1 with a complete mask, Case2 unlabeled, Case3 with a partial mask (L3 painted)."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[:, :4] = L4
    label[:, 4:] = L3
    for number in (1, 2, 3):
        write_volume(root / "MR" / f"Case{number}.nii.gz", np.full(SHAPE, number, dtype=np.float32), np.eye(4))
    write_volume(root / "Mask" / "mask_case1.nii.gz", label, np.eye(4))
    partial = write_volume(root / "Mask" / "mask_case3.nii.gz", np.where(label == L3, L3, 0).astype(np.uint8), np.eye(4))
    write_label_status(partial, painted=[L3], complete=False)
    return root


def test_cps4_workspace_init_status_and_export_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = mrspineseg_folder(tmp_path / "data")
    assert main(["workspace", "init", str(tmp_path / "ws"), "--data", str(data)]) == 0
    assert "3 cases" in capsys.readouterr().out
    workspace = Workspace.open(tmp_path / "ws")
    assert [workspace.state(c) for c in workspace.case_ids()] == ["reviewed", "unlabeled", "reviewed"]
    assert workspace.labeled_for_training() == [("Case1", None), ("Case3", (L3,))]

    prediction = np.full(SHAPE, L4, dtype=np.uint8)
    workspace.add_prediction("Case2", prediction, 1)
    workspace.add_prediction("Case3", prediction, 1)
    workspace.set_class_status("Case1", L4, "rejected")

    assert main(["workspace", "export", str(tmp_path / "ws"), "--out", str(tmp_path / "out")]) == 0
    exported = {case.case_id: case for case in open_dataset(tmp_path / "out").cases}
    assert sorted(exported) == ["Case1", "Case2", "Case3"], "MRSpineSeg names and numbers kept"
    case1 = read_volume(exported["Case1"].label_path, kind="label").array
    assert set(np.unique(case1)) == {0, L3}, "the rejected class is left out"
    assert exported["Case1"].is_partial and tuple(exported["Case1"].painted) == (L3,)
    case3 = read_volume(exported["Case3"].label_path, kind="label").array
    assert (case3[:, 4:] == L3).all() and (case3[:, :4] == L4).all(), "human L3 kept, machine L4 added"
    np.testing.assert_array_equal(read_volume(exported["Case2"].image_path).array, np.full(SHAPE, 2.0))

    assert main(["workspace", "export", str(tmp_path / "ws"), "--out", str(tmp_path / "reviewed"), "--reviewed-only"]) == 0
    reviewed = {case.case_id: case for case in open_dataset(tmp_path / "reviewed").cases}
    assert not read_volume(reviewed["Case2"].label_path, kind="label").array.any()
    assert set(np.unique(read_volume(reviewed["Case3"].label_path, kind="label").array)) == {0, L3}

    capsys.readouterr()
    assert main(["workspace", "export", str(tmp_path / "ws"), "--out", str(tmp_path / "out")]) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert main(["workspace", "init", str(tmp_path / "ws"), "--data", str(data)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["workspace", "init", str(tmp_path / "ws2"), "--data", str(data), "--heldout", "Case2"]) == 2
    assert "has no mask" in capsys.readouterr().err
