"""Where L5 and the top of the sacrum lie, in usual gaps, on the ground-truth masks.

    python benchmarks/caudal_anatomy.py MASKS_GLOB [MASKS_GLOB ...]

For each glob (e.g. ``../shared/realdata/vb3_l1l5_t1/case*_seg.nii.gz``) prints the gap from
L5 to L4 as a share of the median gap between neighbouring vertebra structures (the sacrum
left out), and, where the mask has L5 and L4, where a 10 mm piece at the top of the sacrum
would lie below L5's centre: L5's inferior end (3rd percentile of its heights), minus the
L4/L5 disc's height (L4's inferior end to L5's superior end), minus 5 mm. These set
``levels.SACRUM_PIECE_GAP`` and the lower end of ``levels.CAUDAL_REMNANT_GAPS``.
"""

from __future__ import annotations

import glob
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from cps4_engine import levels
    from cps4_engine.io import read_volume
    from cps4_engine.labels import mrspineseg_scheme

    scheme = mrspineseg_scheme()
    by_short = {info.short: info.id for info in scheme.classes}
    l5, l4, sacrum = by_short["L5"], by_short["L4"], by_short["S"]
    for pattern in argv if argv is not None else sys.argv[1:]:
        l5_l4, sacrum_piece = [], []
        for path in sorted(glob.glob(pattern)):
            mask = read_volume(path, kind="label")
            labels = mask.array.astype(np.int64)
            bodies = [s for s in levels.find_structures(labels, mask.affine, scheme, "vertebra") if s.majority != sacrum]
            gaps = np.diff([s.height_mm for s in bodies])
            l5_l4.append(gaps[0] / np.median(gaps))
            heights = {c: levels.superior_height(mask.affine, np.argwhere(labels == c)) for c in (l5, l4)}
            if all(h.size for h in heights.values()):
                centre, low, high = heights[l5].mean(), *np.percentile(heights[l5], [3, 97])
                disc = np.percentile(heights[l4], 3) - high
                sacrum_piece.append((centre - (low - disc - 5.0)) / (heights[l4].mean() - centre))
        print(f"{pattern}: {len(l5_l4)} masks; L5-L4 gap / median gap: min {min(l5_l4):.2f}, median {np.median(l5_l4):.2f}"
              + (f"; top of the sacrum below L5: {min(sacrum_piece):.2f}-{max(sacrum_piece):.2f} gaps (L5-L4 gap)" if sacrum_piece else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
