"""The refinement workspace: provenance, human labels winning, versions, schema, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cps4_engine.active.queue import case_uncertainty
from cps4_engine.active.workspace import MANIFEST, PREVIOUS_MANIFEST, SCHEMA_VERSION, Workspace
from cps4_engine.errors import CPS4Error
from cps4_engine.io import read_volume, write_volume
from cps4_engine.labels import mrspineseg_scheme

SCHEME = mrspineseg_scheme()
SHAPE = (6, 12, 10)
AFFINE = np.diag([1.0, 1.2, 4.0, 1.0])
L4, L3 = 3, 4


def spine(classes: dict[int, slice]) -> np.ndarray:
    """Labels with one slab per class along axis 1."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for class_id, rows in classes.items():
        labels[1:5, rows, 2:8] = class_id
    return labels


@pytest.fixture()
def cases(tmp_path: Path) -> list[SimpleNamespace]:
    """Three cases: a complete mask, a partial mask (L3 painted), and an image only."""
    rng = np.random.default_rng(0)
    made = []
    for index, (mask, painted) in enumerate(
        [(spine({L4: slice(1, 4), L3: slice(5, 8)}), None), (spine({L3: slice(5, 8)}), (L3,)), (None, None)]
    ):
        image = write_volume(tmp_path / "data" / f"case{index}.nii.gz", rng.random(SHAPE, dtype=np.float32), AFFINE)
        label = None if mask is None else write_volume(tmp_path / "data" / f"case{index}_seg.nii.gz", mask, AFFINE)
        made.append(SimpleNamespace(case_id=f"case{index}", image_path=image, label_path=label, painted=painted))
    return made


def test_create_imports_masks_as_accepted_human_labels(tmp_path: Path, cases: list) -> None:
    workspace = Workspace.create(tmp_path / "ws", cases, SCHEME, source="data")
    again = Workspace.open(tmp_path / "ws")
    assert again.case_ids() == ["case0", "case1", "case2"]
    statuses = again.class_statuses("case0")
    assert {c: s.status for c, s in statuses.items()} == {L4: "accepted", L3: "accepted"}
    assert all(s.round is None for s in statuses.values())
    assert again.is_complete("case0") and not again.is_complete("case1")
    assert [again.state(c) for c in again.case_ids()] == ["reviewed", "reviewed", "unlabeled"]
    assert again.labeled_for_training() == [("case0", None), ("case1", (L3,))]
    assert again.unreviewed() == ["case1", "case2"]
    np.testing.assert_array_equal(again.current_labels("case0"), read_volume(cases[0].label_path).array)
    assert workspace.version_path("case0").name == "v0001.nii.gz"
    manifest = json.loads((tmp_path / "ws" / MANIFEST).read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION


def test_heldout_cases_and_selective_import(tmp_path: Path, cases: list) -> None:
    workspace = Workspace.create(tmp_path / "ws", cases, SCHEME, heldout=["case0"], import_labels=[])
    assert workspace.role("case0") == "heldout" and workspace.state("case0") == "held out"
    assert workspace.current_labels("case0") is not None, "held-out masks are the reference"
    assert workspace.current_labels("case1") is None
    assert workspace.labeled_for_training() == []
    with pytest.raises(CPS4Error, match="has no mask"):
        Workspace.create(tmp_path / "ws2", cases, SCHEME, heldout=["case2"])
    with pytest.raises(CPS4Error, match="already exists"):
        Workspace.create(tmp_path / "ws", cases, SCHEME)


def test_machine_never_overwrites_human_classes(tmp_path: Path, cases: list) -> None:
    workspace = Workspace.create(tmp_path / "ws", cases, SCHEME)
    human_before = workspace.current_labels("case1")
    # the model calls the painted L3 block L4 and paints L3 elsewhere
    prediction = spine({L4: slice(5, 8), L3: slice(9, 11), 5: slice(1, 3)})
    uncertainty = case_uncertainty(np.full((20, *SHAPE), 0.05, dtype=np.float32))
    version = workspace.add_prediction("case1", prediction, round_=1, uncertainty=uncertainty)
    merged = workspace.current_labels("case1")
    np.testing.assert_array_equal(merged == L3, human_before == L3)
    assert not (merged == L4).any(), "L4 only where the human L3 is, so it vanishes"
    assert (merged == 5).sum() == (prediction == 5).sum()
    statuses = workspace.class_statuses("case1")
    assert statuses[L3].status == "accepted" and statuses[L3].round is None
    assert statuses[5].status == "machine" and statuses[5].round == 1
    assert version == 2 and workspace.versions("case1")[-1]["author"] == "machine"
    assert workspace.uncertainty("case1") == uncertainty
    np.testing.assert_array_equal(read_volume(workspace.version_path("case1", 1)).array, human_before)
    assert workspace.add_prediction("case0", prediction, round_=1) is None, "complete masks stay"
    np.testing.assert_array_equal(workspace.current_labels("case0"), read_volume(cases[0].label_path).array)


def test_human_edits_mark_changed_classes_corrected(tmp_path: Path, cases: list) -> None:
    workspace = Workspace.create(tmp_path / "ws", cases, SCHEME, import_labels=False)
    workspace.add_prediction("case2", spine({L4: slice(1, 4), L3: slice(5, 8)}), round_=1)
    assert workspace.state("case2") == "pseudo-labeled"
    edited = spine({L4: slice(1, 5), L3: slice(5, 8)})
    workspace.save_human_labels("case2", edited)
    statuses = workspace.class_statuses("case2")
    assert statuses[L4].status == "corrected" and statuses[L3].status == "machine"
    assert workspace.state("case2") == "in review" and not workspace.is_complete("case2")
    workspace.set_class_status("case2", L3, "accepted")
    assert workspace.state("case2") == "reviewed"
    workspace.save_human_labels("case2", edited, statuses={L3: "accepted"})
    assert workspace.is_complete("case2")
    assert [v["version"] for v in workspace.versions("case2")] == [1, 2, 3]
    with pytest.raises(CPS4Error, match="do not match"):
        workspace.save_human_labels("case2", np.zeros((2, 2, 2), dtype=np.uint8))
    with pytest.raises(CPS4Error, match="42"):
        workspace.save_human_labels("case2", np.full(SHAPE, 42, dtype=np.uint8))
    with pytest.raises(CPS4Error, match="no case"):
        workspace.set_class_status("nope", L3, "accepted")
    with pytest.raises(CPS4Error, match="unknown class status"):
        workspace.set_class_status("case2", L3, "maybe")  # type: ignore[arg-type]


def test_every_save_keeps_the_previous_manifest(tmp_path: Path, cases: list) -> None:
    workspace = Workspace.create(tmp_path / "ws", cases, SCHEME)
    before = (tmp_path / "ws" / MANIFEST).read_text()
    workspace.set_class_status("case1", L3, "rejected")
    assert (tmp_path / "ws" / PREVIOUS_MANIFEST).read_text() == before
    assert Workspace.open(tmp_path / "ws").class_statuses("case1")[L3].status == "rejected"


def test_unreadable_manifest_falls_back_to_the_previous_one(tmp_path: Path, cases: list) -> None:
    workspace = Workspace.create(tmp_path / "ws", cases, SCHEME)
    workspace.set_class_status("case1", L3, "rejected")
    (tmp_path / "ws" / MANIFEST).write_text('{"format": "cps4-work')
    recovered = Workspace.open(tmp_path / "ws")
    assert recovered.recovered and recovered.class_statuses("case1")[L3].status == "accepted"


def test_future_schema_is_refused_in_one_line(tmp_path: Path, cases: list) -> None:
    Workspace.create(tmp_path / "ws", cases, SCHEME)
    path = tmp_path / "ws" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(CPS4Error, match="newer") as error:
        Workspace.open(tmp_path / "ws")
    assert "\n" not in str(error.value) and "workspace.json" in str(error.value)


def test_malformed_manifest_is_refused(tmp_path: Path, cases: list) -> None:
    Workspace.create(tmp_path / "ws", cases, SCHEME)
    path = tmp_path / "ws" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["cases"]["case0"]["classes"][str(L3)]["status"] = "approved"
    path.write_text(json.dumps(manifest))
    assert not (tmp_path / "ws" / PREVIOUS_MANIFEST).exists(), "one save so far"
    with pytest.raises(CPS4Error, match="status 'approved'"):
        Workspace.open(tmp_path / "ws")
    with pytest.raises(CPS4Error, match="not a cps4 workspace"):
        Workspace.open(tmp_path / "empty")


def test_schema_1_manifest_is_migrated(tmp_path: Path, cases: list) -> None:
    root = tmp_path / "old"
    write_volume(root / "labels" / "a.nii.gz", spine({L3: slice(5, 8)}), AFFINE)
    old = {
        "schema_version": 1,
        "created": "2025-01-01T00:00:00+00:00",
        "scheme": SCHEME.to_dict(),
        "cases": [
            {"id": "a", "image": str(cases[0].image_path), "labels": ["labels/a.nii.gz"], "status": {"4": "corrected"}},
            {"id": "b", "image": str(cases[2].image_path)},
        ],
    }
    (root / MANIFEST).write_text(json.dumps(old))
    workspace = Workspace.open(root)
    assert workspace.manifest["schema_version"] == SCHEMA_VERSION
    assert workspace.class_statuses("a")[L3].status == "corrected"
    assert workspace.class_statuses("a")[L3].changed == "2025-01-01T00:00:00+00:00"
    assert workspace.state("b") == "unlabeled"
    np.testing.assert_array_equal(workspace.current_labels("a") == L3, spine({L3: slice(5, 8)}) == L3)


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from cps4_engine.active.workspace import Workspace
    workspace = Workspace.open(sys.argv[1])
    rng = np.random.default_rng(1)
    shape = workspace.current_labels("big").shape
    for _ in range(10_000):
        mark = (len(workspace.versions("big")) + 1) % 20
        labels = rng.integers(0, 20, shape, dtype=np.uint8)
        labels[0, 0, 0] = mark
        workspace.save_human_labels("big", labels)
        print(mark, flush=True)
    """
)


def test_a_writer_killed_mid_save_leaves_a_readable_workspace(tmp_path: Path) -> None:
    """SIGKILL a process that saves large label volumes in a loop, reopen, three times.

    The kills land at different moments of a save (label file, manifest, .prev copy);
    after each, the workspace must open and its latest version must be a complete file
    holding exactly what that save wrote.
    """
    big_shape = (64, 192, 160)
    image = write_volume(tmp_path / "big.nii.gz", np.zeros(big_shape, dtype=np.float32), np.eye(4))
    label = write_volume(tmp_path / "big_seg.nii.gz", np.zeros(big_shape, dtype=np.uint8), np.eye(4))
    case = SimpleNamespace(case_id="big", image_path=image, label_path=label, painted=None)
    Workspace.create(tmp_path / "ws", [case], SCHEME)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for delay in (0.05, 0.13, 0.21):
        writer = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "ws")], stdout=subprocess.PIPE, env=env, text=True
        )
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline().strip(), "the writer never finished a save"
            time.sleep(delay)
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
        assert writer.returncode == -signal.SIGKILL
        workspace = Workspace.open(tmp_path / "ws")
        labels = workspace.current_labels("big")
        assert labels.shape == big_shape
        assert int(labels[0, 0, 0]) == len(workspace.versions("big")) % 20, "a complete, matching file"
    for version in workspace.versions("big"):
        assert read_volume(workspace.root / version["file"], kind="label").shape == big_shape
