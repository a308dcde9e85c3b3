"""Do partial masks teach background? One real vb3 case, three vertebrae painted.

Builds two plain-folder datasets from ``../shared/realdata/vb3_l1l5_t1`` (or
``$CPS4_REALDATA``):

- ``complete/``: ``case01`` with its full mask (L1-L5) for training, ``case02`` (full
  mask) for validation;
- ``partial/``: the same, but ``case01``'s mask keeps only L1, L2 and L3 (ids 6, 5, 4)
  and its sidecar marks it partial (``{"painted": [4, 5, 6], "complete": false}``).

``run`` trains ``cps4 train DATA --labeled 1 --validation 1 --method supervised --preset
cpu --max-steps N`` on one of them, predicts ``case03`` (never seen) with and without
the level step off, and prints the predicted foreground fraction of that volume next
to its true fraction.

Usage::

    python benchmarks/partial_masks.py build OUT
    python benchmarks/partial_masks.py run OUT/partial RUN --max-steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PAINTED = (4, 5, 6)  # L3, L2, L1 in the MRSpineSeg scheme


def _realdata() -> Path:
    root = Path(os.environ.get("CPS4_REALDATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata"))
    return root / "vb3_l1l5_t1"


def build(out: Path) -> None:
    """Write the ``complete`` and ``partial`` datasets under ``out``."""
    from cps4_engine.data import write_label_status
    from cps4_engine.io import read_volume, write_volume

    source = _realdata()
    for name in ("complete", "partial"):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for case in ("case01", "case02"):
            shutil.copyfile(source / f"{case}_img.nii.gz", folder / f"{case}_img.nii.gz")
            shutil.copyfile(source / f"{case}_seg.nii.gz", folder / f"{case}_seg.nii.gz")
    mask = read_volume(source / "case01_seg.nii.gz", kind="label")
    kept = np.where(np.isin(mask.array, PAINTED), mask.array, 0).astype(np.uint8)
    partial_mask = out / "partial" / "case01_seg.nii.gz"
    write_volume(partial_mask, kept, mask.affine)
    write_label_status(partial_mask, PAINTED)
    print(f"wrote {out / 'complete'} and {out / 'partial'}")


def run(data: Path, run_dir: Path, max_steps: int) -> dict[str, float]:
    """Train, predict ``case03`` and return foreground fractions (0-1)."""
    from cps4_engine.io import read_volume

    cps4 = [sys.executable, "-m", "cps4_engine"]
    start = time.time()
    subprocess.run(cps4 + ["train", str(data), "--labeled", "1", "--validation", "1", "--method", "supervised",
                           "--preset", "cpu", "--max-steps", str(max_steps), "--out", str(run_dir)], check=True)
    train_seconds = time.time() - start
    image = _realdata() / "case03_img.nii.gz"
    results = {"train_seconds": round(train_seconds, 1)}
    for flag, key in (([], "predicted"), (["--no-level-step"], "predicted_no_level_step")):
        out = run_dir / ("predict" + ("_raw" if flag else ""))
        subprocess.run(cps4 + ["predict", str(run_dir), str(image), "--out", str(out), "--overwrite", *flag], check=True)
        labels = read_volume(out / "case03_img_labels.nii.gz", kind="label").array
        results[key] = float((labels > 0).mean())
    truth = read_volume(_realdata() / "case03_seg.nii.gz", kind="label").array
    results["truth"] = float((truth > 0).mean())
    print(json.dumps(results))
    (run_dir / "foreground.json").write_text(json.dumps(results) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="write the two datasets")
    build_parser.add_argument("out", type=Path)
    run_parser = commands.add_parser("run", help="train on one dataset and measure")
    run_parser.add_argument("data", type=Path)
    run_parser.add_argument("run_dir", type=Path)
    run_parser.add_argument("--max-steps", type=int, default=300)
    args = parser.parse_args()
    if args.command == "build":
        build(args.out)
    else:
        run(args.data, args.run_dir, args.max_steps)


if __name__ == "__main__":
    main()
