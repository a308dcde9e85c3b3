"""Dataset layouts, cases, partial-label status and reproducible splits.

Layouts :func:`open_dataset` recognises (first match wins):

- ``index``: a JSON index like ``../shared/realdata/index.json``
  (``{set: {"cases": [{"case", "image", "label", ["painted"]}]}}``, paths relative to the
  JSON's folder). Give the JSON, its folder (optionally ``subset=``), or one set's folder
  (``.../realdata/vb3_l1l5_t1``), which resolves through the parent's ``index.json``.
  Cases keep the index's order.
- ``mrspineseg``: ``MR/Case{N}.nii.gz`` with ``Mask/mask_case{N}.nii.gz`` (masks optional).
- ``nnunet``: nnU-Net/Decathlon ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` (``labelsTs/``
  if present) and ``dataset.json``; image names may carry the ``_0000`` channel suffix
  (only channel 0000 is used).
- ``folder``: NIfTI files in one folder; ``X_seg``/``X_label``/``X_labels``/``X_mask`` is
  the mask of ``X`` or ``X_img``/``X_image`` (so is ``X_img_seg``).

How each layout names its files, for reading and for writing, is
:mod:`cps4_engine.layouts`.

Except for ``index``, cases are in natural file-name order (``Case2`` before ``Case10``);
benchmarks rely on that order.

Partial masks: a sidecar ``<mask name without .nii/.nii.gz>.cps4.json`` next to the
mask, ``{"painted": [3, 4], "complete": false}``, says only those classes were painted;
near them, along the spine, the truth is unknown, not background; far from them it is
background (:func:`load_case` marks which is which,
:func:`cps4_engine.preprocess.mark_known_background`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from cps4_engine.errors import CPS4Error
from cps4_engine.io import Volume, is_nifti_path, nifti_stem, read_volume, write_text_atomic
from cps4_engine.labels import LabelScheme, mrspineseg_scheme
from cps4_engine.layouts import (
    MRSPINESEG_IMAGES,
    MRSPINESEG_MASKS,
    NNUNET_DESCRIPTION,
    NNUNET_FOLDERS,
    folder_case_key,
    mrspineseg_mask_stem,
    nnunet_case_id,
)

STATUS_SUFFIX = ".cps4.json"
INDEX_NAME = "index.json"
_AFFINE_TOLERANCE_MM = 1e-3


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers numerically: ``Case2`` < ``Case10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


@dataclass(frozen=True)
class Case:
    """One volume of a dataset.

    Attributes:
        case_id: name unique within the dataset, e.g. ``"Case3"``.
        image_path: the image NIfTI file.
        label_path: the mask NIfTI file, or None for an unlabeled volume.
        painted: sorted class ids painted in a *partial* mask; None when the mask is
            complete (or absent).
    """

    case_id: str
    image_path: Path
    label_path: Path | None = None
    painted: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_path", Path(self.image_path))
        if self.label_path is not None:
            object.__setattr__(self, "label_path", Path(self.label_path))
        if self.painted is not None:
            object.__setattr__(self, "painted", tuple(sorted({int(c) for c in self.painted})))

    @property
    def is_labeled(self) -> bool:
        """Whether the case has a mask (complete or partial)."""
        return self.label_path is not None

    @property
    def is_partial(self) -> bool:
        """Whether the case has a mask with only some classes painted."""
        return self.label_path is not None and self.painted is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "case_id": self.case_id,
            "image": str(self.image_path),
            "label": None if self.label_path is None else str(self.label_path),
            "painted": None if self.painted is None else list(self.painted),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Case":
        """Inverse of :meth:`to_dict`."""
        return cls(
            case_id=str(data["case_id"]),
            image_path=Path(data["image"]),
            label_path=None if data.get("label") is None else Path(data["label"]),
            painted=None if data.get("painted") is None else tuple(int(c) for c in data["painted"]),
        )


@dataclass
class Dataset:
    """Cases found in a folder.

    Attributes:
        root: the dataset folder (for ``index``, the index JSON's folder).
        layout: one of :data:`cps4_engine.layouts.LAYOUTS`.
        cases: cases in dataset order.
        subset: the index set used, if any.
    """

    root: Path
    layout: str
    cases: list[Case] = field(default_factory=list)
    subset: str | None = None

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    def case(self, case_id: str) -> Case:
        """The case with this id.

        Raises:
            CPS4Error: no such case.
        """
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise CPS4Error(f"no case {case_id!r} in this dataset", path=self.root)

    def counts(self) -> dict[str, int]:
        """Number of ``labeled`` (complete), ``partial`` and ``unlabeled`` cases."""
        partial = sum(case.is_partial for case in self.cases)
        labeled = sum(case.is_labeled for case in self.cases) - partial
        return {"labeled": labeled, "partial": partial, "unlabeled": len(self.cases) - labeled - partial}


def label_status_path(mask_path: str | Path) -> Path:
    """Sidecar file that records whether a mask is partial: ``mask_case3.cps4.json``."""
    mask_path = Path(mask_path)
    return mask_path.parent / f"{nifti_stem(mask_path)}{STATUS_SUFFIX}"


def _check_painted(values: Any, path: Path, scheme: LabelScheme) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CPS4Error('"painted" must be a list of class ids', path=path)
    bad = sorted({v for v in values if v not in scheme.foreground_ids})
    if bad:
        raise CPS4Error(f'"painted" holds ids {bad} that are not foreground classes of {scheme.name}', path=path)
    return tuple(sorted(set(values)))


def read_label_status(mask_path: str | Path, scheme: LabelScheme | None = None) -> tuple[int, ...] | None:
    """Painted class ids of a partial mask, or None when the mask is complete.

    A mask without a sidecar is complete.

    Raises:
        CPS4Error: the sidecar is not valid JSON or holds bad fields.
    """
    path = label_status_path(mask_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CPS4Error(f"label status is not valid JSON ({error})", path=path) from None
    if not isinstance(data, dict) or not isinstance(data.get("complete", False), bool):
        raise CPS4Error('label status must be {"painted": [ids], "complete": true|false}', path=path)
    if data.get("complete", False):
        return None
    return _check_painted(data.get("painted"), path, scheme or mrspineseg_scheme())


def write_label_status(
    mask_path: str | Path, painted: Sequence[int] | None, complete: bool | None = None
) -> Path:
    """Record (atomically) whether a mask is complete or which classes were painted.

    Args:
        mask_path: the mask file the sidecar belongs to.
        painted: class ids painted so far; None means the mask is complete.
        complete: override; defaults to ``painted is None``.

    Returns:
        The sidecar path.
    """
    is_complete = painted is None if complete is None else bool(complete)
    if not is_complete and painted is None:
        raise CPS4Error("a partial mask needs the list of painted classes", path=mask_path)
    painted_ids = None if painted is None else sorted({int(c) for c in painted})
    path = label_status_path(mask_path)
    write_text_atomic(path, json.dumps({"painted": painted_ids, "complete": is_complete}) + "\n")
    return path


def _nifti_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and is_nifti_path(p) and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def _make_case(case_id: str, image: Path, label: Path | None) -> Case:
    painted = read_label_status(label) if label is not None else None
    return Case(case_id, image, label, painted)


def _open_mrspineseg(root: Path) -> Dataset:
    images = _nifti_files(root / MRSPINESEG_IMAGES)
    if not images:
        raise CPS4Error("MR/ holds no NIfTI images", path=root / MRSPINESEG_IMAGES)
    mask_folder = root / MRSPINESEG_MASKS
    masks = {nifti_stem(p).lower(): p for p in _nifti_files(mask_folder)} if mask_folder.is_dir() else {}
    cases = []
    for image in images:
        stem = nifti_stem(image)
        cases.append(_make_case(stem, image, masks.pop(mrspineseg_mask_stem(stem), None)))
    if masks:
        orphan = sorted(masks.values(), key=lambda p: natural_key(p.name))[0]
        raise CPS4Error("mask has no matching image in MR/ (Mask/mask_caseN needs MR/CaseN)", path=orphan)
    return Dataset(root, "mrspineseg", cases)


def _open_nnunet(root: Path) -> Dataset:
    description = root / NNUNET_DESCRIPTION
    if description.is_file():
        try:
            json.loads(description.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CPS4Error(f"not valid JSON ({error})", path=description) from None
    cases = []
    for images_name, labels_name in NNUNET_FOLDERS:
        images_dir, labels_dir = root / images_name, root / labels_name
        if not images_dir.is_dir():
            continue
        labels = {nifti_stem(p): p for p in _nifti_files(labels_dir)} if labels_dir.is_dir() else {}
        for image in _nifti_files(images_dir):
            case_id = nnunet_case_id(nifti_stem(image))
            if case_id is None:
                continue
            cases.append(_make_case(case_id, image, labels.pop(case_id, None)))
        if labels:
            orphan = sorted(labels.values(), key=lambda p: natural_key(p.name))[0]
            raise CPS4Error(f"label has no image in {images_name}/", path=orphan)
    if not cases:
        raise CPS4Error("nnU-Net dataset holds no images in imagesTr/ or imagesTs/", path=root)
    return Dataset(root, "nnunet", cases)


def _open_folder(root: Path, files: list[Path]) -> Dataset:
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in files:
        key, is_label = folder_case_key(nifti_stem(path))
        found = labels if is_label else images
        if key in found:
            what = "masks" if is_label else "images"
            raise CPS4Error(f"two {what} of case {key!r}: {found[key].name} and {path.name}; "
                            "keep one", path=path)
        found[key] = path
    orphans = sorted(set(labels) - set(images), key=natural_key)
    if orphans:
        raise CPS4Error("mask has no matching image in the folder", path=labels[orphans[0]])
    if not images:
        raise CPS4Error("folder holds only masks, no images", path=root)
    cases = [_make_case(key, images[key], labels.get(key)) for key in images]
    return Dataset(root, "folder", cases)


def _open_index(index_path: Path, subset: str | None) -> Dataset:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CPS4Error(f"not valid JSON ({error})", path=index_path) from None
    if not isinstance(index, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("cases"), list) for v in index.values()
    ):
        raise CPS4Error('index must map set names to {"cases": [...]}', path=index_path)
    if subset is not None and subset not in index:
        raise CPS4Error(f"no set {subset!r} in the index (sets: {', '.join(index)})", path=index_path)
    root = index_path.parent
    scheme = mrspineseg_scheme()
    sets = [subset] if subset is not None else list(index)
    cases = []
    for name in sets:
        for entry in index[name]["cases"]:
            if not isinstance(entry, dict):
                raise CPS4Error(f"set {name!r}: every case entry must be an object with an 'image'", path=index_path)
            try:
                image = root / entry["image"]
                label = root / entry["label"] if entry.get("label") else None
                case_id = str(entry.get("case", nifti_stem(image)))
            except KeyError as error:
                raise CPS4Error(f"set {name!r}: case entry without {error}", path=index_path) from None
            except TypeError:
                raise CPS4Error(f"set {name!r}: a case entry's 'image' or 'label' is not a file name",
                                path=index_path) from None
            if not image.is_file():
                raise CPS4Error(f"set {name!r} case {case_id!r}: image file not found", path=image)
            if label is not None and not label.is_file():
                raise CPS4Error(f"set {name!r} case {case_id!r}: label file not found", path=label)
            painted = (
                _check_painted(entry["painted"], index_path, scheme)
                if entry.get("painted") is not None
                else (read_label_status(label) if label is not None else None)
            )
            cases.append(Case(case_id if subset is not None or len(sets) == 1 else f"{name}/{case_id}",
                              image, label, painted))
    return Dataset(root, "index", cases, subset=subset)


def open_dataset(path: str | Path, subset: str | None = None) -> Dataset:
    """Find the layout of a dataset and list its cases (nothing is read yet).

    Args:
        path: dataset folder, an index JSON, or a set folder under an index.
        subset: for index datasets, the set to use (all sets, in order, if None).

    Raises:
        CPS4Error: missing path, empty or unrecognised folder, orphan masks, or a bad
            index/sidecar; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise CPS4Error("dataset not found", path=path)
    if path.is_file():
        if path.name == NNUNET_DESCRIPTION:
            return _open_nnunet(path.parent)
        if path.suffix.lower() == ".json":
            return _open_index(path, subset)
        raise CPS4Error("is a file; give a dataset folder or an index .json", path=path)
    if (path / INDEX_NAME).is_file():
        return _open_index(path / INDEX_NAME, subset)
    parent_index = path.parent / INDEX_NAME
    if subset is None and parent_index.is_file():
        try:
            sets = json.loads(parent_index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            sets = {}
        if isinstance(sets, dict) and path.name in sets:
            return _open_index(parent_index, path.name)
    if subset is not None:
        raise CPS4Error(f"subset {subset!r} given but there is no {INDEX_NAME}", path=path)
    if (path / MRSPINESEG_IMAGES).is_dir():
        return _open_mrspineseg(path)
    if (any((path / images).is_dir() for images, _labels in NNUNET_FOLDERS)
            or (path / NNUNET_DESCRIPTION).is_file()):
        return _open_nnunet(path)
    files = _nifti_files(path)
    if files:
        return _open_folder(path, files)
    if not any(path.iterdir()):
        raise CPS4Error("dataset folder is empty", path=path)
    raise CPS4Error(
        "unrecognised dataset folder: expected MR/ + Mask/ (MRSpineSeg), imagesTr/ (nnU-Net), "
        "index.json, or NIfTI files",
        path=path,
    )


def load_case(case: Case, scheme: LabelScheme | None = None) -> tuple[Volume, Volume | None]:
    """Read and cross-check a case's image and mask.

    Args:
        case: the case.
        scheme: label values must be ids of this scheme (MRSpineSeg if None).

    Returns:
        ``(image, label)``; label is None for an unlabeled case. A partial case's label
        comes marked (:func:`cps4_engine.preprocess.mark_known_background`): int16, 0 only
        where background is known, :data:`~cps4_engine.preprocess.UNKNOWN_LABEL` where
        the class is unknown.

    Raises:
        CPS4Error: any problem :func:`~cps4_engine.io.read_volume` finds, a mask whose
            shape or affine differs from the image's, or label values outside the scheme.
    """
    image = read_volume(case.image_path, kind="image")
    if case.label_path is None:
        return image, None
    label = read_volume(case.label_path, kind="label")
    from cps4_engine.geometry import check_same_grid  # the one image-vs-mask check

    check_same_grid(image, label, what="mask")
    (scheme or mrspineseg_scheme()).check_values(np.unique(label.array), path=case.label_path)
    if case.is_partial:
        from cps4_engine.preprocess import mark_known_background

        label = Volume(mark_known_background(label.array, label.affine), label.affine, label.path)
    return image, label


@dataclass
class Split:
    """Which cases a run learns from, validates on and is tested on.

    Attributes:
        labeled: training volumes whose masks the run uses.
        unlabeled: training volumes used without masks (masks on disk stay hidden).
        validation: labeled volumes held out of training for model selection.
        test: volumes after the training range; never trained or validated on.
        seed: the seed that drew ``labeled`` and ``validation``.
        labeled_spec: the requested count or fraction.
    """

    labeled: list[Case]
    unlabeled: list[Case]
    validation: list[Case]
    test: list[Case]
    seed: int = 0
    labeled_spec: int | float = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "seed": self.seed,
            "labeled_spec": self.labeled_spec,
            **{name: [case.to_dict() for case in getattr(self, name)]
               for name in ("labeled", "unlabeled", "validation", "test")},
        }

    def save(self, path: str | Path) -> Path:
        """Write the split as JSON (atomically)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Split":
        """Read a split written by :meth:`save`.

        Raises:
            CPS4Error: missing or malformed file.
        """
        path = Path(path)
        if not path.is_file():
            raise CPS4Error("split file not found", path=path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                **{name: [Case.from_dict(c) for c in data[name]]
                   for name in ("labeled", "unlabeled", "validation", "test")},
                seed=int(data["seed"]),
                labeled_spec=data["labeled_spec"],
            )
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise CPS4Error(f"not a valid split file ({error})", path=path) from None


def _count(spec: int | float, total: int, option: str) -> int:
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise CPS4Error(f"{option} must be a count or a fraction, got {spec!r}")
    if isinstance(spec, float):
        if not 0.0 <= spec <= 1.0:
            raise CPS4Error(f"{option} fraction {spec} must be between 0 and 1")
        return max(1, int(round(spec * total))) if spec > 0 and total else 0
    if spec < 0:
        raise CPS4Error(f"{option} must not be negative, got {spec}")
    return int(spec)


def split_cases(
    cases: Sequence[Case],
    labeled: int | float,
    seed: int = 0,
    train: int | None = None,
    validation: int | float = 0,
) -> Split:
    """Draw a reproducible labeled/unlabeled/validation/test split, counted in volumes.

    The first ``train`` cases (all if None) are training volumes, the rest test volumes.
    Among training volumes with masks, a seeded permutation picks validation volumes from
    its end and labeled volumes from its start, so for one seed the labeled set for 2
    volumes is contained in the one for 4, and validation does not depend on ``labeled``.
    Complete masks are preferred for validation. Every other training volume is unlabeled.

    Args:
        cases: dataset cases in dataset order.
        labeled: count of labeled volumes (int) or fraction of training volumes (float,
            rounded, at least 1 when positive).
        seed: random seed.
        train: number of leading cases that are training volumes.
        validation: count or fraction of training volumes held out for validation; a
            fraction takes at most what is left after ``labeled``.

    Raises:
        CPS4Error: counts out of range or more labeled volumes than labeled cases.
    """
    cases = list(cases)
    if train is not None and not 0 < train <= len(cases):
        raise CPS4Error(f"train count {train} must be between 1 and the {len(cases)} cases")
    training = cases[:train] if train is not None else cases
    test = cases[train:] if train is not None else []
    n_labeled = _count(labeled, len(training), "--labeled")
    n_validation = _count(validation, len(training), "--validation")
    candidates = [case for case in training if case.is_labeled]
    if n_labeled > len(candidates):
        raise CPS4Error(f"--labeled {labeled} asks for {n_labeled} volumes but only {len(candidates)} "
                        "training volumes have masks")
    order = [candidates[i] for i in np.random.default_rng(seed).permutation(len(candidates))]
    room = len(candidates) - n_labeled
    if n_validation > room:
        if isinstance(validation, int):
            raise CPS4Error(f"--validation {validation} is more than the {room} labeled training "
                            f"volumes left after --labeled {labeled}")
        n_validation = room
    reserve = sorted(order[n_labeled:], key=lambda case: (case.is_partial, -order.index(case)))
    validation_cases = reserve[:n_validation]
    chosen = set(map(id, order[:n_labeled])) | set(map(id, validation_cases))
    in_order = {id(case): index for index, case in enumerate(training)}
    return Split(
        labeled=sorted(order[:n_labeled], key=lambda case: in_order[id(case)]),
        unlabeled=[case for case in training if id(case) not in chosen],
        validation=sorted(validation_cases, key=lambda case: in_order[id(case)]),
        test=test,
        seed=seed,
        labeled_spec=labeled,
    )


def plan_split(
    data: str | Path,
    labeled: int | float,
    seed: int = 0,
    train: int | None = None,
    validation: int | float = 0.1,
) -> Split:
    """The split a training run on ``data`` draws: :func:`split_cases` over the dataset's cases.

    Cheap (it lists files and reads partial-mask sidecars, no volume), so a GUI can check a
    run's options and warn before it starts.

    Raises:
        CPS4Error: what :func:`open_dataset` and :func:`split_cases` raise.
    """
    return split_cases(open_dataset(data).cases, labeled, seed=seed, train=train, validation=validation)


def split_warnings(split: Split) -> list[str]:
    """One-line warnings about a split that trains but teaches less than the user expects."""
    warnings = []
    if not split.validation:
        warnings.append("no validation volumes: no Dice is measured while training and no best "
                        "model is chosen; label more volumes or use fewer as labeled")
    if split.labeled and all(case.is_partial for case in split.labeled):
        warnings.append("every labeled mask is partial: background is learned only away from the "
                        "spine (beyond 30 mm of the painted structures), not between vertebrae; "
                        "complete one mask (every unpainted voxel background) for sharp outlines")
    return warnings
