"""``cps4 predict RUN IMAGE… --out DIR``: label volumes from a trained stage-2 run."""

from __future__ import annotations

import argparse

from cps4_engine.options import DEFAULT_TEST_TIME_SHIFTS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment images with a trained stage-2 run",
        description=(
            "Segment NIfTI images with a stage-2 run. For each image NAME.nii[.gz] writes "
            "NAME_labels.nii.gz (class ids) and NAME_confidence.nii.gz (probability of the "
            "chosen class) in the image's own voxel grid and affine; with --probabilities "
            "also NAME_probs.nii.gz (X×Y×Z×20 class probabilities)."
        ),
    )
    parser.add_argument("run", metavar="RUN", help="stage-2 run folder (from cps4 train)")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="NIfTI images or folders of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--probabilities", action="store_true", help="also write 4D class probabilities")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass (default: 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--no-level-step", dest="level_step", action="store_false",
        help="keep the network's per-slice labels: no 3D step giving each vertebra and disc one "
             "label in anatomical order (NAME_levels.json records which ran)",
    )
    parser.add_argument(
        "--test-time-shifts", default=",".join(f"{shift:g}" for shift in DEFAULT_TEST_TIME_SHIFTS),
        metavar="F,F,…",
        help="average the network over copies of each slice moved along the spine by these fractions "
             "of the slice height, e.g. 0,-0.1,0.1 (default: %(default)s, one plain pass)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cps4_engine.errors import CPS4Error
    from cps4_engine.inference import PredictedFiles, load_segmenter, predict_files
    from cps4_engine.options import parse_test_time_shifts

    if args.batch_size < 1:
        raise CPS4Error(f"--batch-size must be at least 1, got {args.batch_size}")
    shifts = parse_test_time_shifts(args.test_time_shifts)
    model = load_segmenter(args.run, args.device)
    print(f"segmenter from {args.run} on {model.device}, slices {model.slice_size[0]}×{model.slice_size[1]}", flush=True)

    def report(result: PredictedFiles) -> None:
        print(f"{result.image.name} -> {result.labels} ({result.seconds:.1f} s)", flush=True)

    written = predict_files(
        model, args.images, args.out, args.batch_size, args.probabilities, args.overwrite, progress=report,
        level_step=args.level_step, shifts=shifts,
    )
    print(f"predicted {len(written)} image(s) into {args.out}")
    return 0
