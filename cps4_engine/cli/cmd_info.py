"""``cps4 info PATH``: describe a NIfTI file or a dataset folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a NIfTI volume or a dataset",
        description=(
            "For a NIfTI file: shape, voxel spacing (mm), orientation codes (the direction "
            "each voxel axis runs towards), the sagittal axis, dtype, intensity range and, "
            "for integer-valued volumes, voxel counts per class name. For a dataset folder "
            "or index JSON: the layout found and the labeled / partial / unlabeled cases."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="a .nii/.nii.gz file, a dataset folder or an index .json")
    parser.add_argument("--subset", help="set of an index dataset (default: all sets)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps; info reads files only (default: cpu)")
    parser.set_defaults(func=run)


def describe_volume(path: Path) -> list[str]:
    """Report lines for one NIfTI file."""
    import numpy as np

    from cps4_engine.io import header_notes, read_volume, sagittal_layout
    from cps4_engine.labels import mrspineseg_scheme

    volume = read_volume(path, kind="image")
    array = volume.array
    spacing = " x ".join(f"{s:g}" for s in volume.spacing)
    lines = [
        f"file:         {path}",
        f"shape:        {' x '.join(str(n) for n in volume.shape)}",
        f"spacing:      {spacing} mm",
        f"orientation:  {','.join(volume.orientation)}",
        f"sagittal:     voxel axis {sagittal_layout(volume.affine, path).axes[0]} "
        f"({volume.shape[volume.sagittal_axis]} sagittal slices)",
        f"dtype:        {array.dtype}",
        f"intensity:    {array.min():g} .. {array.max():g}",
        *(f"note:         {note}" for note in header_notes(path)),
    ]
    integer_valued = np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array))
    values, counts = np.unique(array, return_counts=True) if integer_valued else (None, None)
    scheme = mrspineseg_scheme()
    if values is not None and len(values) <= scheme.num_classes and values.min() >= 0 and values.max() < scheme.num_classes:
        names = scheme.names()
        lines.append("labels:")
        lines.extend(f"  {int(v):>3} {names[int(v)]:<28} {int(c):>10} voxels" for v, c in zip(values, counts))
    return lines


def describe_dataset(path: Path, subset: str | None) -> list[str]:
    """Report lines for a dataset."""
    from cps4_engine.data import open_dataset

    dataset = open_dataset(path, subset=subset)
    counts = dataset.counts()
    lines = [
        f"dataset:      {dataset.root}",
        f"layout:       {dataset.layout}" + (f" (set {dataset.subset})" if dataset.subset else ""),
        f"cases:        {len(dataset)} ({counts['labeled']} labeled, {counts['partial']} partial, "
        f"{counts['unlabeled']} unlabeled)",
    ]
    for case in dataset.cases:
        status = "partial " + ",".join(map(str, case.painted)) if case.is_partial else (
            "labeled" if case.is_labeled else "unlabeled")
        lines.append(f"  {case.case_id:<16} {status:<20} {case.image_path.name}")
    return lines


def run(args: argparse.Namespace) -> int:
    from cps4_engine.device import resolve_device
    from cps4_engine.io import is_nifti_path

    resolve_device(args.device)
    path = Path(args.path)
    is_volume = is_nifti_path(path) or (path.is_file() and path.suffix.lower() != ".json")
    lines = describe_volume(path) if is_volume else describe_dataset(path, args.subset)
    print("\n".join(lines))
    return 0
