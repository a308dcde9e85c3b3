"""Prototype test-time augmentations, scored like ``score_run.py`` (the fourteenth session's dev rows).

    python benchmarks/test_time_variants.py RUN --views 1:0:0,1:0.1:0,1:-0.1:0 --split unlabeled+validation
    python benchmarks/test_time_variants.py RUN --views 0.9:0:0,1:0:0,1.1:0:0 --split unlabeled+validation
    python benchmarks/test_time_variants.py RUN --smooth 0.25 --split unlabeled+validation

Each view ``zoom:dy:dx`` resamples every slice (bilinear, ``torch.nn.functional.grid_sample``)
zoomed by ``zoom`` about the centre and moved by ``dy`` (rows, superior to inferior) and ``dx``
(columns) in units of half the slice (``affine_grid``'s coordinates), segments it, and
resamples the probabilities back (edge rows repeated where a view left the frame); the views'
probabilities are averaged with equal weight. ``--smooth w`` then mixes each slice's
probabilities with its two sagittal neighbours' (weight ``w`` each). The engine's own
test-time shifts (``cps4 predict --test-time-shifts``, whole rows, each pixel averaged over
the copies that kept it in view) are scored with ``score_run.py --test-time-shifts``. Every
other argument is ``score_run.py``'s, and it writes ``score_run.py``'s scores file: run it on a
copy of the run folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def _theta(count: int, zoom: float, dy: float, dx: float, inverse: bool) -> torch.Tensor:
    theta = torch.zeros(count, 2, 3)
    scale = zoom if inverse else 1.0 / zoom
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, 1, 2], theta[:, 0, 2] = (-dy * zoom, -dx * zoom) if inverse else (dy, dx)
    return theta


def _resample(tensor: torch.Tensor, zoom: float, dy: float, dx: float, inverse: bool) -> torch.Tensor:
    grid = F.affine_grid(_theta(tensor.shape[0], zoom, dy, dx, inverse), list(tensor.shape), align_corners=False)
    padding = "border" if inverse else "zeros"
    return F.grid_sample(tensor, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def main(argv: list[str] | None = None) -> int:
    import cps4_engine.inference as inference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--views", default="1:0:0", help="zoom:dy:dx,… (default: one plain view)")
    parser.add_argument("--smooth", type=float, default=0.0, help="weight of each sagittal neighbour")
    args, rest = parser.parse_known_args(argv)
    views = [tuple(float(part) for part in view.split(":")) for view in args.views.split(",") if view]
    plain = inference.predict_slices

    def averaged(model, images: torch.Tensor, batch_size: int = 8, shifts=(0.0,)) -> torch.Tensor:
        total = sum(_resample(plain(model, _resample(images, *view, inverse=False), batch_size), *view, inverse=True)
                    for view in views)
        probabilities = total / len(views)
        if args.smooth > 0:
            padded = torch.cat([probabilities[:1], probabilities, probabilities[-1:]])
            probabilities = (1 - 2 * args.smooth) * probabilities + args.smooth * (padded[:-2] + padded[2:])
        return probabilities

    inference.predict_slices = averaged
    sys.path.insert(0, str(Path(__file__).parent))
    import score_run

    return score_run.main(rest)


if __name__ == "__main__":
    sys.exit(main())
