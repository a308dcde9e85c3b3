"""How every dataset layout names its image and mask files, for reading and for writing.

One module owns these rules so that a file the plugin or the engine writes is always
found again by :func:`cps4_engine.data.open_dataset` (and matched by ``cps4 evaluate``):

=============  =================================  ======================================
layout         image                              mask
=============  =================================  ======================================
``mrspineseg`` ``MR/Case{N}.nii.gz``              ``Mask/mask_case{N}.nii.gz``
               (any ``MR/<stem>``)                (``Mask/mask_<stem lower-cased>``)
``nnunet``     ``imagesTr/<case>_0000.nii.gz``    ``labelsTr/<case>.nii.gz``
               (or ``<case>.nii.gz``; ``imagesTs``  (``labelsTs``)
               likewise)
``folder``     ``<key>.nii.gz``, ``<key>_img``,   ``<key>_seg.nii.gz`` (read also:
               ``<key>_image``, ``<key>_0000``    ``_label``, ``_labels``, ``_mask``, and
                                                  an image name plus one of those)
``index``      listed in ``index.json``           listed in ``index.json`` (read-only)
=============  =================================  ======================================

Masks are always written as ``.nii.gz``. The folder layout reads ``case01_img_seg`` as
the mask of ``case01_img`` too, so folders written by earlier versions stay readable.
"""

from __future__ import annotations

import re
from pathlib import Path

from cps4_engine.errors import CPS4Error
from cps4_engine.io import nifti_stem

LAYOUTS = ("index", "mrspineseg", "nnunet", "folder")
WRITABLE_LAYOUTS = ("mrspineseg", "nnunet", "folder")
MASK_EXTENSION = ".nii.gz"

MRSPINESEG_IMAGES = "MR"
MRSPINESEG_MASKS = "Mask"
MRSPINESEG_MASK_PREFIX = "mask_"
_MRSPINESEG_CASE = re.compile(r"^Case(\d+)$", re.IGNORECASE)

NNUNET_FOLDERS = (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"))
NNUNET_DESCRIPTION = "dataset.json"
NNUNET_FIRST_CHANNEL = "0000"
_NNUNET_CHANNEL = re.compile(r"_(\d{4})$")

# The first mask suffix is the one written; the others are read.
FOLDER_MASK_SUFFIXES = ("_seg", "_label", "_labels", "_mask")
FOLDER_IMAGE_SUFFIXES = ("_img", "_image", "_0000")

_KEY_PREFIX = re.compile(r"^(mask|labels?|seg)_", re.IGNORECASE)
_KEY_SUFFIX = re.compile(r"(_labels|_label|_mask|_seg|_pred|_img|_image|_0000)+$", re.IGNORECASE)


def image_extension(image_path: str | Path) -> str:
    """``.nii`` or ``.nii.gz``, as the image file has it (copies keep their compression)."""
    return ".nii" if str(image_path).lower().endswith(".nii") else ".nii.gz"


# MRSpineSeg ------------------------------------------------------------------------------


def mrspineseg_mask_stem(image_stem: str) -> str:
    """The mask name (no extension) of an ``MR/<image_stem>`` image: ``Case3`` -> ``mask_case3``."""
    return f"{MRSPINESEG_MASK_PREFIX}{image_stem.lower()}"


def mrspineseg_case_paths(root: str | Path, number: int, image_ext: str = ".nii.gz") -> tuple[Path, Path]:
    """Image and mask paths of case ``number``: ``MR/Case{N}`` and ``Mask/mask_case{N}``."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise CPS4Error(f"MRSpineSeg case numbers start at 1, got {number!r}", path=root)
    root = Path(root)
    image = root / MRSPINESEG_IMAGES / f"Case{number}{image_ext}"
    return image, root / MRSPINESEG_MASKS / f"{mrspineseg_mask_stem(f'Case{number}')}{MASK_EXTENSION}"


def next_mrspineseg_case(root: str | Path) -> tuple[Path, Path]:
    """Image and mask paths of the next free ``Case{N}`` number under ``root``."""
    images = Path(root) / MRSPINESEG_IMAGES
    numbers = [
        int(match.group(1))
        for path in (images.iterdir() if images.is_dir() else ())
        if (match := _MRSPINESEG_CASE.match(nifti_stem(path)))
    ]
    return mrspineseg_case_paths(root, max(numbers, default=0) + 1)


# nnU-Net ---------------------------------------------------------------------------------


def nnunet_case_id(image_stem: str) -> str | None:
    """The case of an nnU-Net image name, or None for a channel other than ``0000``.

    ``spine_001_0000`` -> ``spine_001``; ``spine_001`` -> ``spine_001``;
    ``spine_001_0001`` -> None.
    """
    channel = _NNUNET_CHANNEL.search(image_stem)
    if channel is None:
        return image_stem
    return image_stem[: channel.start()] if channel.group(1) == NNUNET_FIRST_CHANNEL else None


def nnunet_labels_folder(images_folder: str | Path) -> Path:
    """``imagesTr`` -> ``labelsTr`` (``imagesTs`` -> ``labelsTs``) beside it."""
    images_folder = Path(images_folder)
    return images_folder.parent / images_folder.name.replace("images", "labels", 1)


def nnunet_case_paths(root: str | Path, case_id: str, image_ext: str = ".nii.gz", test: bool = False) -> tuple[Path, Path]:
    """Image and mask paths of a case: ``imagesTr/<case>_0000`` and ``labelsTr/<case>``."""
    images_name, labels_name = NNUNET_FOLDERS[1 if test else 0]
    root = Path(root)
    return (
        root / images_name / f"{case_id}_{NNUNET_FIRST_CHANNEL}{image_ext}",
        root / labels_name / f"{case_id}{MASK_EXTENSION}",
    )


# plain folder ----------------------------------------------------------------------------


def _strip_suffix(stem: str, suffixes: tuple[str, ...]) -> tuple[str, bool]:
    for suffix in suffixes:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)], True
    return stem, False


def folder_case_key(stem: str) -> tuple[str, bool]:
    """The case key of a file in a plain folder and whether the file is a mask.

    ``case01_img`` -> (``case01``, False); ``case01_seg`` and ``case01_img_seg`` ->
    (``case01``, True); ``case01`` -> (``case01``, False).
    """
    key, is_mask = _strip_suffix(stem, FOLDER_MASK_SUFFIXES)
    return _strip_suffix(key, FOLDER_IMAGE_SUFFIXES)[0], is_mask


def folder_mask_path(image_path: str | Path) -> Path:
    """The mask written beside a plain-folder image: ``case01_img`` -> ``case01_seg.nii.gz``."""
    image_path = Path(image_path)
    key, is_mask = folder_case_key(nifti_stem(image_path))
    if is_mask:
        raise CPS4Error("is named like a mask, not an image", path=image_path)
    return image_path.parent / f"{key}{FOLDER_MASK_SUFFIXES[0]}{MASK_EXTENSION}"


def folder_case_paths(folder: str | Path, case_id: str, image_ext: str = ".nii.gz") -> tuple[Path, Path]:
    """Image and mask paths of a case in a plain folder: ``<case>`` and ``<case>_seg``."""
    folder = Path(folder)
    return folder / f"{case_id}{image_ext}", folder / f"{case_id}{FOLDER_MASK_SUFFIXES[0]}{MASK_EXTENSION}"


# every layout ----------------------------------------------------------------------------


def layout_of_image(image_path: str | Path) -> str:
    """The layout an image file sits in, judged from its folder names alone.

    ``.../MR/<x>`` is MRSpineSeg, ``.../imagesTr/<x>`` (``imagesTs``) nnU-Net, anything
    else a plain folder (index datasets cannot be told from a path).
    """
    folder = Path(image_path).parent.name
    if folder == MRSPINESEG_IMAGES:
        return "mrspineseg"
    if folder in (images for images, _labels in NNUNET_FOLDERS):
        return "nnunet"
    return "folder"


def mask_path_for_image(image_path: str | Path, layout: str | None = None) -> Path:
    """Where the mask of ``image_path`` goes so that the dataset reader pairs the two.

    Args:
        image_path: the image file.
        layout: the dataset's layout (one of :data:`LAYOUTS`); judged from the path by
            :func:`layout_of_image` when None.

    Raises:
        CPS4Error: an unknown layout, an ``index`` dataset (its masks are whatever its
            JSON lists), or an image named like a mask.
    """
    image_path = Path(image_path)
    layout = layout or layout_of_image(image_path)
    if layout not in LAYOUTS:
        raise CPS4Error(f"unknown dataset layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "index":
        raise CPS4Error("belongs to an index dataset, whose index.json names its masks; "
                        "save the mask elsewhere or add the case to another dataset", path=image_path)
    stem = nifti_stem(image_path)
    if layout == "mrspineseg":
        return image_path.parent.parent / MRSPINESEG_MASKS / f"{mrspineseg_mask_stem(stem)}{MASK_EXTENSION}"
    if layout == "nnunet":
        case_id = nnunet_case_id(stem)
        if case_id is None:
            raise CPS4Error(f"is not channel {NNUNET_FIRST_CHANNEL}, the image channel masks belong to",
                            path=image_path)
        return nnunet_labels_folder(image_path.parent) / f"{case_id}{MASK_EXTENSION}"
    return folder_mask_path(image_path)


def case_name(path: str | Path) -> str:
    """A file's case name across layouts and predictions, case kept: ``mask_Case3`` -> ``Case3``.

    The stem without the prefixes ``mask_``, ``label_``, ``labels_``, ``seg_`` and any
    trailing run of ``_labels``, ``_label``, ``_mask``, ``_seg``, ``_pred``, ``_img``,
    ``_image``, ``_0000``; so ``Case3_labels`` (``cps4 predict`` of ``MR/Case3``) and
    ``mask_case3`` name one case, as do ``case11_img_labels`` and ``case11_seg``.
    """
    stem = nifti_stem(path)
    return _KEY_SUFFIX.sub("", _KEY_PREFIX.sub("", stem)) or stem


def case_key(path: str | Path) -> str:
    """:func:`case_name` lower-cased: the name files of one case are matched by."""
    return case_name(path).lower()

