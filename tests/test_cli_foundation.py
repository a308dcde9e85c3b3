"""``cps4 synth`` and ``cps4 info``: outputs, determinism, and one-line errors."""

from __future__ import annotations

import gzip
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from cps4_engine.cli import main
from cps4_engine.io import write_volume


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_twice_is_byte_identical(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "a"), "--cases", "2", "--seed", "0"]) == 0
    assert main(["synth", str(tmp_path / "b"), "--cases", "2", "--seed", "0"]) == 0
    assert "wrote 2 synthetic cases" in capsys.readouterr().out
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(map(str, first)) == [
        "MR/Case1.nii.gz", "MR/Case2.nii.gz", "Mask/mask_case1.nii.gz", "Mask/mask_case2.nii.gz", "synthetic.json",
    ]
    assert first == second
    assert main(["synth", str(tmp_path / "c"), "--cases", "2", "--seed", "1"]) == 0
    assert _files(tmp_path / "c")[next(iter(first))] != first[next(iter(first))]


def test_info_on_synthetic_dataset_and_file(tmp_path, capsys):
    main(["synth", str(tmp_path / "d"), "--cases", "2", "--seed", "0"])
    capsys.readouterr()
    assert main(["info", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "layout:       mrspineseg" in out
    assert "2 (2 labeled, 0 partial, 0 unlabeled)" in out
    assert main(["info", str(tmp_path / "d" / "Mask" / "mask_case1.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "L3 vertebra" in out and "L4/L5 intervertebral disc" in out and "dtype:        uint8" in out


def test_info_on_real_case(realdata, capsys):
    assert main(["info", str(realdata / "vb2_t11l5_t2" / "case06_img.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "shape:        381 x 381 x 77" in out
    assert "spacing:      1 x 1 x 1 mm" in out
    assert "orientation:  I,P,L" in out
    assert "voxel axis 2" in out
    assert main(["info", str(realdata / "vb3_l1l5_t1")]) == 0
    out = capsys.readouterr().out
    assert "layout:       index (set vb3_l1l5_t1)" in out and "20 (20 labeled" in out


def _bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    truncated = tmp_path / "cut.nii.gz"
    write_volume(tmp_path / "whole.nii.gz", np.random.default_rng(0).random((16, 16, 8)).astype(np.float32), np.eye(4))
    truncated.write_bytes((tmp_path / "whole.nii.gz").read_bytes()[:300])
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5), np.float32), np.eye(4)), flat)
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"not nifti" * 50))
    return {
        "missing": (["info", str(tmp_path / "absent.nii.gz")], "file not found"),
        "empty": (["info", str(empty)], "dataset folder is empty"),
        "text": (["info", str(text)], "not a NIfTI file"),
        "truncated": (["info", str(truncated)], "truncated"),
        "2d": (["info", str(flat)], "expected a 3D volume"),
        "fake": (["info", str(fake)], "not a readable NIfTI"),
        "cases": (["synth", str(tmp_path / "out"), "--cases", "0"], "--cases must be at least 1"),
        "foreign": (["synth", str(tmp_path), "--cases", "1"], "not empty"),
    }


@pytest.mark.parametrize("name", ["missing", "empty", "text", "truncated", "2d", "fake", "cases", "foreign"])
def test_bad_input_exit_code_two_one_line(tmp_path, capsys, name):
    argv, problem = _bad_inputs(tmp_path)[name]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"cps4 {argv[0]}: error:")


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cps4_engine", "info", str(tmp_path / "absent.nii.gz")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("absent.nii.gz: file not found")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
