"""The bad-input catalogue: what a careless user, a broken scanner export or a damaged
download feeds the ``cps4`` command line, and what each must give.

Every case runs the real command line in-process (:func:`cps4_engine.cli.main`) and
asserts either a refusal (exit status 2, exactly one line on stderr that names the file
or option and matches the expected problem, no traceback) or a correct read (exit status
0 and the expected output). Cases are generated from synthetic volumes (and, in
``test_real_case_damage``, from a real case of ``../shared/realdata`` when present):
header fields, truncations and flipped bytes, voxel types, shapes, affines pairing an
image with a mask, case ids, run-folder edits, option values and OS errors.
``test_catalogue_size`` prints how many cases there are.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from _bad_nifti import flip_bytes, nifti_with
from cps4_engine.cli import main
from cps4_engine.io import write_volume
from cps4_engine.synthetic import generate_case

#: Voxel axis 0 inferior, 1 posterior, 2 left: the sagittal axis is the last one, as in
#: the real cases, so an invented default geometry (sagittal axis 0) shows.
AFFINE = np.array([[0.0, 0, -4.0, 12.0], [0, -1.0, 0, 30.0], [-1.0, 0, 0, 45.0], [0, 0, 0, 1]])
SHAPE = (12, 10, 5)


@dataclass(frozen=True)
class Case:
    """One catalogue entry.

    ``make(folder)`` builds the input in an empty folder and returns the argv; a refusal
    expects ``problem`` (a regex) on one stderr line that contains ``names``(folder)
    (the file or option it must name); a correct read (``problem=None``) expects exit
    status 0 and ``output`` (a regex) on stdout.
    """

    id: str
    make: Callable[[Path], list[str]]
    problem: str | None
    names: Callable[[Path], str] | None = None
    output: str | None = None


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse refusals exit from inside main
        status = int(exit_.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def image_array(dtype=np.int16) -> np.ndarray:
    return (np.arange(np.prod(SHAPE)) % 17).reshape(SHAPE).astype(dtype)


def labels_array(dtype=np.uint8) -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=dtype)
    labels[2:6, 3:7, 1:4] = 3
    labels[7:10, 3:7, 1:4] = 4
    return labels


# ----- header fields, for .nii and .nii.gz ---------------------------------------------

HEADER_REFUSALS = {
    "no-sform-no-qform": ({"sform_code": 0, "qform_code": 0}, None, "no usable sform or qform"),
    "vox-offset-0": ({"vox_offset": 0}, None, "vox_offset 0 points inside the header"),
    "vox-offset-200": ({"vox_offset": 200}, None, "vox_offset 200 points inside"),
    "vox-offset-nan": ({"vox_offset": np.nan}, None, "vox_offset nan points inside"),
    "singular-sform": ({"srow_y": [0.0, 0, 0, 0]}, None, "sform is singular"),
    "collinear-sform": ({"srow_x": [0.0, -1.0, 0, 0], "srow_y": [0.0, -1.0, 0, 0]}, None, "sform is singular"),
    "nan-sform": ({"srow_z": [np.nan, 0, 0, 0]}, None, "sform holds NaN or infinite"),
    "inf-sform-offset": ({"srow_x": [0.0, 0, -4.0, np.inf]}, None, "sform holds NaN or infinite"),
    "qform-pixdim-0": ({"sform_code": 0, "pixdim": [-1, 0, 1, 4, 1, 1, 1, 1]}, None, "qform voxel spacing"),
    "qform-pixdim-negative": ({"sform_code": 0, "pixdim": [-1, 1, -1, 4, 1, 1, 1, 1]}, None, "must be positive"),
    "qform-pixdim-nan": ({"sform_code": 0, "pixdim": [-1, 1, np.nan, 4, 1, 1, 1, 1]}, None, "must be positive"),
    "qform-nan-quaternion": ({"sform_code": 0, "quatern_c": np.nan}, None, "qform holds NaN"),
    "qform-inf-offset": ({"sform_code": 0, "qoffset_y": np.inf}, None, "qform holds NaN"),
    "dimension-0-x": ({}, (0, 10, 5), "dimension of 0"),
    "dimension-0-z": ({}, (12, 10, 0), "dimension of 0"),
    "huge-dimensions": ({}, (32000, 32000, 32000), "more than this machine's"),
    "huge-4d": ({}, (32000, 32000, 320, 3), "more than this machine's"),
    "scl-slope-1e38": ({"scl_slope": 1e38}, None, r"beyond 32-bit floats \(scl_slope 1e\+38\)"),
    "magic-garbage": ({"sizeof_hdr": 123}, None, "no NIfTI-1 or NIfTI-2 header"),
    "datatype-unknown": ({"datatype": 77, "bitpix": 16}, None, "unknown voxel datatype code 77"),
    "datatype-claims-complex": ({"datatype": 32, "bitpix": 64}, None, "truncated or corrupt"),
    "declared-larger-than-file": ({}, (12, 10, 50), "truncated|corrupt|not a readable"),
}


def _header_case(name: str, suffix: str) -> Case:
    fields, shape, problem = HEADER_REFUSALS[name]
    file = f"scan{suffix}"
    return Case(
        f"header-{name}{suffix}",
        lambda d: ["info", str(nifti_with(d / file, image_array(), AFFINE, shape=shape, **fields))],
        problem,
        lambda d: str(d / file),
    )


HEADER_READS = {
    # (array, header fields, expected info output)
    "qform-only": (image_array(), {"sform_code": 0}, r"orientation:  I,P,L.*note:.*qform", ),
    "scaled-slope-2": (image_array(), {"scl_slope": 2.0}, r"intensity:    0 \.\. 32"),
    "int64-labels-in-range": (labels_array(np.int64), {}, r"labels:\n.*L4"),
    "uint32-labels": (labels_array(np.uint32), {}, r"labels:"),
    "float32-intensities": (image_array(np.float32), {}, r"dtype:        float32"),
    "uint16-intensities": (image_array(np.uint16) * 170, {}, r"intensity:    0 \.\. 2720"),
    "int8-intensities": (image_array(np.int8), {}, r"dtype:        int8"),
    "float64-intensities": (image_array(np.float64), {}, r"dtype:        float64"),
    "sform-qform-disagree": (image_array(), {"qoffset_x": 40.0}, r"note:         sform and qform disagree"),
    "sagittal-axis-from-affine": (image_array(), {}, r"sagittal:     voxel axis 2 \(5 sagittal slices\)"),
}


def _read_case(name: str, suffix: str) -> Case:
    array, fields, output = HEADER_READS[name]
    file = f"scan{suffix}"
    return Case(f"reads-{name}{suffix}",
                lambda d: ["info", str(nifti_with(d / file, array, AFFINE, **fields))], None, output=output)


# ----- truncations and damaged bytes ---------------------------------------------------


@functools.lru_cache(maxsize=1)
def _phantom() -> tuple[np.ndarray, np.ndarray]:
    image, _, affine = generate_case(1)  # seconds: drawn once for all damage cases
    return image, affine


def _phantom_file(folder: Path, name: str = "scan.nii.gz") -> Path:
    return write_volume(folder / name, *_phantom())


def _truncated(fraction: float, suffix: str) -> Case:
    def make(d: Path) -> list[str]:
        whole = _phantom_file(d, f"whole{suffix}")
        data = whole.read_bytes()
        (d / f"cut{suffix}").write_bytes(data[: int(len(data) * fraction)])
        return ["info", str(d / f"cut{suffix}")]

    return Case(f"truncated-{fraction:g}{suffix}", make, "truncated",
                lambda d: str(d / f"cut{suffix}"))


def _flipped(where: float, count: int) -> Case:
    def make(d: Path) -> list[str]:
        path = _phantom_file(d)
        flip_bytes(path, max(20, int(path.stat().st_size * where)), count)
        return ["info", str(path)]

    return Case(f"flipped-{count}-bytes-at-{where:g}", make, "file is corrupt",
                lambda d: str(d / "scan.nii.gz"))


def _empty(suffix: str) -> Case:
    def make(d: Path) -> list[str]:
        (d / f"empty{suffix}").write_bytes(b"")
        return ["info", str(d / f"empty{suffix}")]

    return Case(f"empty-file{suffix}", make, "not a readable NIfTI|truncated", lambda d: str(d / f"empty{suffix}"))


def _gzip_of_garbage() -> Case:
    def make(d: Path) -> list[str]:
        (d / "junk.nii.gz").write_bytes(gzip.compress(b"\x00\x01 not a header " * 40))
        return ["info", str(d / "junk.nii.gz")]

    return Case("gzip-of-garbage", make, "not a readable NIfTI", lambda d: str(d / "junk.nii.gz"))


def _html_download() -> Case:
    def make(d: Path) -> list[str]:
        (d / "scan.nii.gz").write_text("<html><body>Login required</body></html>")
        return ["info", str(d / "scan.nii.gz")]

    return Case("html-saved-as-nifti", make, "not a readable NIfTI", lambda d: str(d / "scan.nii.gz"))


# ----- voxel types and shapes ----------------------------------------------------------


def _saved(name: str, array: np.ndarray, problem: str | None, output: str | None = None) -> Case:
    def make(d: Path) -> list[str]:
        image = nib.Nifti1Image(array, AFFINE, dtype=array.dtype) if array.dtype != bool else None
        if image is None:
            image = nib.Nifti1Image(array.astype(np.uint8), AFFINE)
        nib.save(image, d / "vol.nii.gz")
        return ["info", str(d / "vol.nii.gz")]

    return Case(name, make, problem, (lambda d: str(d / "vol.nii.gz")) if problem else None, output)


def _with_nan(value: float) -> np.ndarray:
    array = image_array(np.float32)
    array[3, 3, 3] = value
    return array


DTYPE_AND_SHAPE_CASES = [
    _saved("dtype-complex64", image_array(np.float32).astype(np.complex64), "unsupported voxel type"),
    _saved("dtype-rgb24", np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]), "unsupported voxel type"),
    _saved("dtype-float-nan", _with_nan(np.nan), "1 voxels are NaN or infinite"),
    _saved("dtype-float-inf", _with_nan(np.inf), "1 voxels are NaN or infinite"),
    _saved("dtype-float-minus-inf", _with_nan(-np.inf), "1 voxels are NaN or infinite"),
    _saved("dtype-uint8-reads", image_array(np.uint8), None, r"dtype:        uint8"),
    _saved("dtype-int32-reads", image_array(np.int32), None, r"dtype:        int32"),
    _saved("dtype-uint64-reads", image_array(np.uint64), None, r"dtype:        uint64"),
    _saved("shape-2d", np.zeros((12, 10), np.int16), "expected a 3D volume"),
    _saved("shape-4d-two-volumes", np.zeros((12, 10, 5, 2), np.int16), "expected a 3D volume, got 4D"),
    _saved("shape-5d", np.zeros((12, 10, 5, 1, 3), np.int16), "expected a 3D volume"),
    _saved("shape-4d-singleton-reads", np.zeros((12, 10, 5, 1), np.int16), None, r"shape:        12 x 10 x 5"),
    _saved("shape-one-slice-reads", np.zeros((12, 10, 1), np.int16), None, r"1 sagittal slices"),
]


# ----- an image meeting a mask on another grid (workspace init) -----------------------


def _dataset_with_mask(
    mask_affine: np.ndarray, mask_shape: tuple[int, ...] = SHAPE, value: np.generic = np.uint8(3)
) -> Callable[[Path], list[str]]:
    def make(d: Path) -> list[str]:
        write_volume(d / "data" / "MR" / "Case1.nii.gz", image_array(), AFFINE)
        mask = np.zeros(mask_shape, value.dtype)
        mask[1:3, 1:3, 1:3] = value
        (d / "data" / "Mask").mkdir(parents=True)
        nifti_with(d / "data" / "Mask" / "mask_case1.nii.gz", mask, mask_affine)
        return ["workspace", "init", str(d / "ws"), "--data", str(d / "data")]

    return make


def _moved(row: int, millimetres: float) -> np.ndarray:
    affine = AFFINE.copy()
    affine[row, 3] += millimetres
    return affine


def _flipped_axis(axis: int) -> np.ndarray:
    flip = np.eye(4)
    flip[axis, axis] = -1
    flip[axis, 3] = SHAPE[axis] - 1
    return AFFINE @ flip


MASK = lambda d: str(d / "data" / "Mask" / "mask_case1.nii.gz")  # noqa: E731
GEOMETRY_CASES = [
    *(Case(f"mask-shifted-{mm:g}mm-{'xyz'[row]}", _dataset_with_mask(_moved(row, mm)), "origin .* mm away", MASK)
      for row in range(3) for mm in (10.0, 0.5)),
    *(Case(f"mask-mirrored-axis-{axis}", _dataset_with_mask(_flipped_axis(axis)), "orientation .* vs", MASK)
      for axis in range(3)),
    Case("mask-axes-swapped", _dataset_with_mask(AFFINE[:, [1, 0, 2, 3]], (10, 12, 5)), "shape|orientation", MASK),
    Case("mask-other-spacing", _dataset_with_mask(AFFINE @ np.diag([1.0, 1.0, 1.25, 1.0])), "spacing or direction", MASK),
    *(Case(f"mask-shape-off-by-one-axis-{axis}",
           _dataset_with_mask(AFFINE, tuple(n + (i == axis) for i, n in enumerate(SHAPE))),
           "mask shape .* differs from image shape 12x10x5", MASK)
      for axis in range(3)),
    *(Case(f"mask-value-{label}", _dataset_with_mask(AFFINE, value=value), problem, MASK)
      for label, value, problem in [
          ("25", np.uint8(25), "label values 25 are outside the mrspineseg scheme"),
          ("minus-1", np.int16(-1), "negative value -1"),
          ("1e6", np.int32(10**6), "label values 1000000 are outside"),
          ("2^33+3", np.int64(2**33 + 3), "label value 8589934595 is too large"),
          ("uint32-max", np.uint32(2**32 - 1), "label value 4294967295 is too large"),
          ("1.5", np.float32(1.5), "non-integer values"),
      ]),
    Case("mask-float32-rounding-reads", _dataset_with_mask(AFFINE + 2e-5), None, output=r"1 cases .* 1 labeled"),
]


# ----- case ids --------------------------------------------------------------------


def _workspace_with_ids(ids: list[str]) -> Callable[[Path], list[str]]:
    def make(d: Path) -> list[str]:
        for case_id in ids:
            write_volume(d / "data" / f"{case_id}.nii.gz", image_array(), AFFINE)
            write_volume(d / "data" / f"{case_id}_seg.nii.gz", labels_array(), AFFINE)
        assert main(["workspace", "init", str(d / "ws"), "--data", str(d / "data")]) == 0
        return ["workspace", "export", str(d / "ws"), "--out", str(d / "export")]

    return make


def _with_unlabeled_case2(d: Path) -> list[str]:
    argv = _dataset_with_mask(AFFINE)(d)
    write_volume(d / "data" / "MR" / "Case2.nii.gz", image_array(), AFFINE)
    return argv


def _garbage_manifest(d: Path) -> Path:
    (d / "ws").mkdir()
    (d / "ws" / "workspace.json").write_text("{")
    return d / "ws"


def _index(cases: object) -> Callable[[Path], list[str]]:
    def make(d: Path) -> list[str]:
        write_volume(d / "a.nii.gz", image_array(), AFFINE)
        (d / "index.json").write_text(json.dumps({"train": {"cases": cases}}))
        return ["info", str(d / "index.json")]

    return make


ID_CASES = [
    Case("ids-Case1-Case01", _workspace_with_ids(["Case1", "Case01"]), "'Case1' and 'Case01' both become Case1",
         lambda d: str(d / "ws")),
    Case("ids-case_2-Case002", _workspace_with_ids(["case_2", "Case002"]), "collide", lambda d: str(d / "ws")),
    Case("ids-CASE3-case3", _workspace_with_ids(["CASE3", "case03", "Case4"]), "collide", lambda d: str(d / "ws")),
    Case("ids-distinct-export", _workspace_with_ids(["Case1", "Case2"]), None, output="exported 2 label volumes"),
    Case("ids-heldout-unknown", lambda d: [*_dataset_with_mask(AFFINE)(d), "--heldout", "Case9"],
         r"held-out cases \['Case9'\] are not in the dataset", lambda d: str(d / "ws")),
    Case("ids-heldout-without-mask", lambda d: [*_with_unlabeled_case2(d), "--heldout", "Case2"],
         "held-out case 'Case2' has no mask", lambda d: str(d / "data" / "MR" / "Case2.nii.gz")),
    Case("index-cases-not-a-list-of-entries", _index([42]), "every case entry must be an object", lambda d: str(d / "index.json")),
    Case("index-image-missing", _index([{"image": "nope.nii.gz"}]), "image file not found",
         lambda d: str(d / "nope.nii.gz")),
]


# ----- run folders -----------------------------------------------------------------


def _stage2_run(folder: Path) -> Path:
    """A stage-2 run folder as ``cps4 train`` writes it, tiny preset, untrained weights."""
    from cps4_engine.checkpoint import save_weights, write_run_config
    from cps4_engine.labels import mrspineseg_scheme
    from cps4_engine.models.segmenter import build_segmenter, segmenter_config
    from cps4_engine.presets import get_preset

    preset = get_preset("tiny")
    segmenter = segmenter_config(preset)
    write_run_config(folder, {"stage": 2, "scheme": mrspineseg_scheme().to_dict(), "preset": preset.to_dict(),
                              "segmenter": segmenter, "method": "supervised"})
    save_weights(folder / "model.safetensors", build_segmenter(segmenter).state_dict())
    return folder


def _edited_run(edit: Callable[[Path, dict], None]) -> Callable[[Path], list[str]]:
    def make(d: Path) -> list[str]:
        run = _stage2_run(d / "run")
        config = json.loads((run / "config.json").read_text())
        edit(run, config)
        image = write_volume(d / "Case1.nii.gz", image_array(), AFFINE)
        return ["predict", str(run), str(image), "--out", str(d / "pred"), "--device", "cpu"]

    return make


def _set(section: str | None, key: str, value: object) -> Callable[[Path, dict], None]:
    def edit(run: Path, config: dict) -> None:
        (config if section is None else config[section])[key] = value
        (run / "config.json").write_text(json.dumps(config))

    return edit


def _write(name: str, payload: bytes) -> Callable[[Path, dict], None]:
    return lambda run, config: (run / name).write_bytes(payload)


def _nested(depth: int) -> Callable[[Path, dict], None]:
    def edit(run: Path, config: dict) -> None:
        text = json.dumps(config)[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
        (run / "config.json").write_text(text)

    return edit


def _safetensors_with(metadata: dict) -> bytes:
    from safetensors.torch import save
    import torch

    return save({"x": torch.zeros(1)}, metadata=metadata)


def _nan_weights(run: Path, config: dict) -> None:
    from cps4_engine.checkpoint import save_weights
    from safetensors.torch import load_file

    weights = load_file(run / "model.safetensors")
    first = next(name for name, tensor in weights.items() if tensor.is_floating_point())
    weights[first].view(-1)[0] = float("nan")
    save_weights(run / "model.safetensors", weights)


CONFIG = lambda d: str(d / "run" / "config.json")  # noqa: E731
RUN = lambda d: str(d / "run")  # noqa: E731
RUN_CASES = [
    Case("run-valid-predicts", _edited_run(lambda run, config: None), None, output=r"Case1.nii.gz -> "),
    *(Case(f"run-segmenter-{key}-{label}", _edited_run(_set("segmenter", key, value)), f"'segmenter.{key}' ", CONFIG)
      for key, label, value in [
          ("slice_size", "zero", [0, 0]), ("slice_size", "one-entry", [64]), ("slice_size", "text", "big"),
          ("slice_size", "huge", [100000, 32]), ("channels", "empty", []), ("channels", "million", [8, 10**6, 32]),
          ("channels", "floats", [8.5, 16, 32]), ("strides", "zero", [0, 2]), ("num_res_units", "1e9", 1e9),
          ("num_res_units", "10^9", 10**9), ("num_res_units", "negative", -1), ("dropout", "nan", float("nan")),
          ("dropout", "1.5", 1.5), ("dropout", "text", "lots"), ("in_channels", "zero", 0),
          ("out_channels", "one", 1), ("context_slices", "99", 99), ("norm", "number", 3),
      ]),
    Case("run-segmenter-strides-length", _edited_run(_set("segmenter", "strides", [2])), "needs 2 entries", CONFIG),
    Case("run-segmenter-not-divisible", _edited_run(_set("segmenter", "slice_size", [62, 32])), "not divisible by 4",
         CONFIG),
    Case("run-segmenter-out-channels-vs-scheme", _edited_run(_set("segmenter", "out_channels", 25)),
         "does not match the scheme's 20 classes", CONFIG),
    Case("run-segmenter-context-vs-channels", _edited_run(_set("segmenter", "in_channels", 3)),
         "must be 1 for 0 context slices", CONFIG),
    Case("run-segmenter-not-an-object", _edited_run(_set(None, "segmenter", [1, 2])), "'segmenter' must be an object",
         CONFIG),
    *(Case(f"run-preset-{key}-{label}", _edited_run(_set("preset", key, value)), f"'preset.{key}' ", CONFIG)
      for key, label, value in [
          ("slice_size", "negative", [-64, 32]), ("batch_size", "zero", 0), ("learning_rate", "nan", float("nan")),
          ("encoder_res_units", "1e9", 10**9), ("image_encoder", "other", "resnet"), ("fov_shift", "inf", float("inf")),
          ("embed_dim", "zero", 0), ("keep_aspect", "text", "yes"), ("weak_zoom", "one", 1.0),
          ("weak_rotation", "negative", -5.0),
      ]),
    Case("run-max-steps-zero", _edited_run(_set(None, "max_steps", 0)), "'run.max_steps' is 0", CONFIG),
    Case("run-deep-nesting-20", _edited_run(_nested(20)), "nested more than 12 levels", CONFIG),
    Case("run-deep-nesting-100000", _edited_run(_nested(100_000)), "unreadable run configuration", CONFIG),
    Case("run-stage-1-folder", _edited_run(_set(None, "stage", 1)), r"not a stage-2 run folder \(it is a stage-1", RUN),
    Case("run-no-stage", _edited_run(lambda run, config: (run / "config.json").write_text("{}")),
         "no stage recorded", RUN),
    Case("run-config-a-list", _edited_run(lambda run, config: (run / "config.json").write_text("[2]")),
         "no stage recorded", RUN),
    Case("run-config-not-json", _edited_run(_write("config.json", b"{stage: 2")), "unreadable run configuration",
         CONFIG),
    Case("run-config-binary", _edited_run(_write("config.json", b"\xff\xfe\x00garbage")),
         "unreadable run configuration", CONFIG),
    Case("run-scheme-classes-not-list", _edited_run(lambda run, config: _set(None, "scheme", {"name": "x", "classes": 3})(run, config)),
         "'scheme.classes' must list", CONFIG),
    Case("run-history-a-list", _edited_run(_write("history.json", b"[1, 2, 3]")),
         "training history must be an object", lambda d: str(d / "run" / "history.json")),
    Case("run-history-bad-steps", _edited_run(_write("history.json", json.dumps({"steps": [{"step": "x"}]}).encode())),
         "'steps' must be a list of entries", lambda d: str(d / "run" / "history.json")),
    Case("run-train-state-garbage", _edited_run(_write("train_state.safetensors", b"\x00" * 64)),
         "not a readable safetensors", lambda d: str(d / "run" / "train_state.safetensors")),
    Case("run-train-state-not-ours", _edited_run(_write("train_state.safetensors", _safetensors_with({"a": "b"}))),
         "not a cps4 training state", lambda d: str(d / "run" / "train_state.safetensors")),
    Case("run-train-state-tampered",
         _edited_run(_write("train_state.safetensors", _safetensors_with({"cps4_training_state": '{"step": "many"}'}))),
         "training state is damaged", lambda d: str(d / "run" / "train_state.safetensors")),
    Case("run-train-state-broken-json",
         _edited_run(_write("train_state.safetensors", _safetensors_with({"cps4_training_state": "{"}))),
         "training state is damaged", lambda d: str(d / "run" / "train_state.safetensors")),
    Case("run-weights-missing", _edited_run(lambda run, config: (run / "model.safetensors").unlink()),
         "weights file not found", lambda d: str(d / "run" / "model.safetensors")),
    Case("run-weights-pickle", _edited_run(_write("model.safetensors", b"\x80\x04\x95" + b"\x00" * 40)),
         "not a readable safetensors", lambda d: str(d / "run" / "model.safetensors")),
    Case("run-weights-nan", _edited_run(_nan_weights), "weights hold NaN or infinite values",
         lambda d: str(d / "run" / "model.safetensors")),
    Case("run-folder-missing", lambda d: ["predict", str(d / "nope"), str(d / "x.nii.gz"), "--out", str(d / "o")],
         "run folder not found", lambda d: str(d / "nope")),
]


# ----- option values ---------------------------------------------------------------


def _synthetic_data(d: Path) -> Path:
    assert main(["synth", str(d / "data"), "--cases", "2", "--seed", "0"]) == 0
    return d / "data"


def _option(name: str, argv: Callable[[Path], list[str]], problem: str, option: str) -> Case:
    return Case(f"option-{name}", argv, problem, lambda d: option)


OPTION_CASES = [
    *(_option(f"{command}-{flag.strip('-')}-{value}",
              lambda d, command=command, flag=flag, value=value: [command, str(d), "--labeled", "1", "--out",
                                                                  str(d / "run"), flag, value],
              "must be 1 or more|is not a whole number", flag)
      for command in ("train", "pretrain") for flag in ("--max-steps", "--batch-size") for value in ("0", "-1", "x")),
    _option("train-labeled-text", lambda d: ["train", str(d), "--labeled", "some", "--out", str(d / "r")],
            "neither a count nor a fraction", "--labeled"),
    _option("train-method-unknown", lambda d: ["train", str(d), "--labeled", "1", "--out", str(d / "r"), "--method",
                                               "magic"], "invalid choice", "--method"),
    _option("train-out-missing", lambda d: ["train", str(d), "--labeled", "1"], "required: --out", "--out"),
    _option("predict-batch-size-0", lambda d: ["predict", str(d), str(d / "x.nii.gz"), "--out", str(d / "o"),
                                               "--batch-size", "0"], "batch-size", "--batch-size"),
    *(_option(f"predict-test-time-shifts-{name}", lambda d, value=value: [
        "predict", str(d), str(d / "x.nii.gz"), "--out", str(d / "o"), "--test-time-shifts", value],
        problem, "--test-time-shifts")
      for name, value, problem in (("half", "0,0.5", "0.5 is out of range"), ("nan", "nan", "nan is out of range"),
                                   ("text", "0,up", "not a comma-separated list"),
                                   ("empty", ",", "at least one shift"))),
    _option("unknown-command", lambda d: ["segment-everything"], "invalid choice", "segment-everything"),
    _option("unknown-option", lambda d: ["info", str(d), "--colour"], "unrecognized arguments", "--colour"),
    *(_option(f"{'-'.join(argv[:2]).strip('-')}-{argv[-1]}", lambda d, argv=argv: list(argv),
              "must be 1 or more|must be at least 1", argv[-2])
      for argv in (["demo", "--stage1-steps", "0"], ["demo", "--stage2-steps", "-1"], ["demo", "--cases", "0"],
                   ["demo", "--labeled", "0"], ["bench", "--max-steps", "0"], ["bench", "--jobs", "0"])),
    _option("synth-cases-0", lambda d: ["synth", str(d / "s"), "--cases", "0"], "at least 1", "--cases"),
    _option("queue-top-negative", lambda d: ["queue", str(d), "--top", "-1"], "at least 1", "--top"),
    _option("info-device-tpu", lambda d: ["info", str(d), "--device", "tpu"], "tpu", "tpu"),
]


# ----- OS errors ---------------------------------------------------------------------


def _a_file(d: Path) -> Path:
    (d / "plain.txt").write_text("a file, not a folder")
    return d / "plain.txt"


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


UNDER_A_FILE = lambda d: str(d / "plain.txt")  # noqa: E731
OS_CASES = [
    Case("os-synth-out-under-a-file", lambda d: ["synth", str(_a_file(d) / "data"), "--cases", "1"],
         "Not a directory|exists", UNDER_A_FILE),
    Case("os-synth-out-read-only", lambda d: ["synth", "/sys/cps4-read-only/data", "--cases", "1"],
         "not permitted|Read-only|denied|No such file", lambda d: "/sys/cps4-read-only"),
    Case("os-workspace-init-under-a-file", lambda d: [
        "workspace", "init", str(_a_file(d) / "ws"), "--data", str(_synthetic_data(d))], "Not a directory|cannot create",
        UNDER_A_FILE),
    Case("os-workspace-export-under-a-file", lambda d: [
        *_workspace_with_ids(["Case1"])(d)[:3], "--out", str(_a_file(d) / "export")], "Not a directory", UNDER_A_FILE),
    Case("os-workspace-export-read-only", lambda d: [
        *_workspace_with_ids(["Case1"])(d)[:3], "--out", "/sys/cps4-read-only/export"],
        "not permitted|Read-only|denied|No such file", lambda d: "/sys/cps4-read-only"),
    Case("os-predict-out-under-a-file", lambda d: [*_edited_run(lambda run, config: None)(d)[:3], "--out",
                                                   str(_a_file(d) / "pred"), "--device", "cpu"],
         "Not a directory|exists", UNDER_A_FILE),
    Case("os-info-folder-named-nifti", lambda d: ["info", str(_folder(d / "scan.nii.gz"))],
         "is a folder", lambda d: str(d / "scan.nii.gz")),
    Case("os-info-missing-file", lambda d: ["info", str(d / "gone.nii.gz")], "file not found",
         lambda d: str(d / "gone.nii.gz")),
    Case("os-workspace-status-missing", lambda d: ["workspace", "status", str(d / "nows")], "not a cps4 workspace",
         lambda d: str(d / "nows")),
    Case("os-workspace-manifest-garbage", lambda d: [
        "workspace", "status", str(_garbage_manifest(d))],
        "unreadable workspace manifest", lambda d: str(d / "ws" / "workspace.json")),
    Case("os-train-data-is-a-file", lambda d: ["train", str(_a_file(d)), "--labeled", "1", "--out", str(d / "r"),
                                               "--preset", "tiny", "--method", "supervised"], ".", UNDER_A_FILE),
]


CASES = [
    *(_header_case(name, suffix) for name in HEADER_REFUSALS for suffix in (".nii", ".nii.gz")),
    *(_read_case(name, suffix) for name in HEADER_READS for suffix in (".nii", ".nii.gz")),
    *(_truncated(fraction, ".nii.gz") for fraction in (0.0005, 0.01, 0.1, 0.5, 0.9, 0.999)),
    *(_truncated(fraction, ".nii") for fraction in (0.001, 0.5, 0.99)),
    *(_flipped(where, count) for where, count in ((0.3, 16), (0.5, 16), (0.8, 1), (0.98, 4))),
    _empty(".nii"), _empty(".nii.gz"), _gzip_of_garbage(), _html_download(),
    *DTYPE_AND_SHAPE_CASES, *GEOMETRY_CASES, *ID_CASES, *RUN_CASES, *OPTION_CASES, *OS_CASES,
]


def check(case: Case, folder: Path, capsys: pytest.CaptureFixture) -> None:
    argv = case.make(folder)
    capsys.readouterr()
    status, out, err = run_cli(argv, capsys)
    if case.problem is None:
        assert status == 0, f"expected a correct read, got: {err}"
        assert re.search(case.output or "", out, flags=re.S), out
        return
    lines = err.strip().splitlines()
    assert status == 2, f"exit status {status}, stderr: {err[-400:]}"
    assert len(lines) == 1, f"not one line: {err[-600:]}"
    assert "Traceback" not in err
    assert re.search(case.problem, lines[0]), lines[0]
    if case.names is not None:
        assert case.names(folder) in lines[0], f"does not name {case.names(folder)}: {lines[0]}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    check(case, tmp_path, capsys)


def test_catalogue_size(capsys: pytest.CaptureFixture) -> None:
    refusals = sum(case.problem is not None for case in CASES)
    assert len(CASES) >= 120 and len({case.id for case in CASES}) == len(CASES)
    with capsys.disabled():
        print(f"\nbad-input catalogue: {len(CASES)} generated cases ({refusals} refusals, "
              f"{len(CASES) - refusals} correct reads) + {len(REAL_DAMAGE)} per real case")


# ----- real cases ---------------------------------------------------------------------

REAL_DAMAGE = {
    "reads": (lambda path: path, None),
    "vox-offset-0": (lambda path: _edit_real_header(path, vox_offset=0), "vox_offset 0"),
    "no-geometry": (lambda path: _edit_real_header(path, sform_code=0, qform_code=0), "no usable sform or qform"),
    "flipped-bytes": (lambda path: flip_bytes(path, path.stat().st_size // 2, 16), "corrupt|truncated"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]) and path,
                  "truncated|corrupt"),
}


def _edit_real_header(path: Path, **fields: float) -> Path:
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    return nifti_with(path, data, image.affine, **fields)


@pytest.mark.parametrize("damage", list(REAL_DAMAGE))
def test_real_case_damage(realdata: Path, damage: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    index = json.loads((realdata / "index.json").read_text())
    entry = next(iter(index.values()))["cases"][0]
    path = tmp_path / Path(entry["image"]).name
    shutil.copyfile(realdata / entry["image"], path)
    make, problem = REAL_DAMAGE[damage]
    make(path)
    check(Case(f"real-{damage}", lambda d: ["info", str(path)], problem, lambda d: str(path),
               output=r"orientation:  I,P,L.*sagittal:     voxel axis 2"), tmp_path, capsys)


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    from cps4_engine.checkpoint import check_resume_matches
    from cps4_engine.errors import CPS4Error

    recorded = {"settings": {"method": "cps4", "data": str(tmp_path / "data"), "preset": "tiny"}}
    check_resume_matches(recorded, {"method": "cps4", "data": tmp_path / "x" / ".." / "data", "preset": "tiny"},
                         tmp_path)
    for key, other in (("method", "supervised"), ("preset", "cpu"), ("data", tmp_path / "other")):
        wanted = {**recorded["settings"], key: other}
        with pytest.raises(CPS4Error, match=f"was started with {key} .*resume with the same settings") as error:
            check_resume_matches(recorded, wanted, tmp_path / "run")
        assert "\n" not in str(error.value) and str(tmp_path / "run") in str(error.value)
