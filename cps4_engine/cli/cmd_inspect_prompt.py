"""``cps4 inspect-prompt``: the heat map of any text prompt over an image, from a stage-1 run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``inspect-prompt`` command."""
    parser = subparsers.add_parser(
        "inspect-prompt",
        help="heat map of a free-text prompt over an image (stage-1 run)",
        description=(
            "Write, in IMAGE's geometry, the probability that each voxel matches TEXT "
            "according to the stage-1 model in RUN, and print how the prompt's attention "
            "is shared between its tokens."
        ),
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="stage-1 run folder (cps4 pretrain)")
    parser.add_argument("image", type=Path, metavar="IMAGE", help="NIfTI image")
    parser.add_argument("text", metavar="TEXT", help="any prompt, e.g. 'L3 vertebra'")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="heat map to write (.nii.gz)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the heat map and print the token attention shares; returns 0."""
    from cps4_engine.classmaps import load_vlm, prompt_heatmap
    from cps4_engine.device import resolve_device
    from cps4_engine.errors import CPS4Error
    from cps4_engine.io import is_nifti_path, read_volume, write_volume

    if not is_nifti_path(args.out):
        raise CPS4Error("the heat map must be written as .nii or .nii.gz", path=args.out)
    vlm = load_vlm(args.run_dir, resolve_device(args.device))
    volume = read_volume(args.image, kind="image")
    result = prompt_heatmap(vlm, volume, args.text)
    write_volume(args.out, result.heatmap.astype("float32"), volume.affine)
    print(f"wrote {args.out} (max {float(result.heatmap.max()):.3f})")
    print("attention shares by word:")
    for word, share in result.word_attention():
        print(f"  {word:>16s}  {share:6.3f}")
    return 0
