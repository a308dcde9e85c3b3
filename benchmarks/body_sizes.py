"""Superior-inferior extent of the labelled structures of each mask, in mm and in model pixels.

    python benchmarks/body_sizes.py '../shared/realdata/vb3_l1l5_t1/case*_seg.nii.gz'

Prints one line per mask: the mean extent of its labelled structures along the superior
axis, in mm and in pixels of the ``cpu`` preset's letterboxed slice, which tells whether
test patients are larger than the training ones (the weak view's zoom must cover that).
"""

from __future__ import annotations

import argparse
import glob
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from cps4_engine.io import read_volume
    from cps4_engine.presets import get_preset
    from cps4_engine.preprocess import fit_box, sagittal_spacing, to_sagittal

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("masks", nargs="+", help="mask paths or glob patterns")
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args(argv)
    size = get_preset(args.preset).slice_size
    for path in sorted(p for pattern in args.masks for p in glob.glob(pattern)):
        mask = read_volume(path)
        sagittal = to_sagittal(np.asarray(mask.array).astype(np.int64), mask.affine)
        spacing = sagittal_spacing(mask.affine)
        box = fit_box(sagittal.shape[1:], spacing[1:], size)
        mm_per_pixel = sagittal.shape[1] * spacing[1] / box[2]
        rows = np.nonzero(sagittal)[1]
        labels = sagittal[np.nonzero(sagittal)]
        extents = [(np.ptp(rows[labels == c]) + 1) * spacing[1] for c in np.unique(labels)]
        mean = float(np.mean(extents)) if extents else 0.0
        print(f"{path}: {mean:.1f} mm, {mean / mm_per_pixel:.1f} px at {mm_per_pixel:.2f} mm/px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
