"""Screenshots of each napari-cps4 widget in use, for the README and docs/walkthrough.md.

Run under a virtual X server with a laptop-sized screen from the project root::

    xvfb-run -a -s "-screen 0 1366x768x24" .venv/bin/python scripts/screenshots.py --out docs/images

It writes a small synthetic dataset and trains stage 1 and stage 2 briefly (tiny preset,
CPU) through the Training widget itself, then opens the sample volume and captures:
``data_widget.png`` (labeling from scratch), ``training_widget.png`` (live curves after a
run), ``review_widget.png`` (the per-class review of the prediction) and
``inspector_widget.png`` (a class prompt's heat map), each of the whole 1366 x 768 window,
saved with a 256-colour palette to stay well under 300 KB.

With ``--run RUN`` (a trained stage-2 run folder, e.g. one at the real budget) no stage 2
is trained here: the Training dock shows that run's own curves (its ``history.json``) and
the review dock segments the shown volume with that run (its *Run inference* button).
With ``--stage1-run RUN1`` (a trained stage-1 run folder) no stage 1 is trained here and the
prompt inspector shows that run's class maps. ``--image`` and ``--labels`` show a real
volume and its mask instead of the sample (a model trained on vb3 should be shown on a vb3
volume it never saw)::

    xvfb-run -a -s "-screen 0 1366x768x24" .venv/bin/python scripts/screenshots.py \
        --out docs/images --run RUN --stage1-run RUN1 \
        --image ../shared/realdata/vb3_l1l5_t1/case20_img.nii.gz \
        --labels ../shared/realdata/vb3_l1l5_t1/case20_seg.nii.gz
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from cps4_engine.data import write_label_status
from cps4_engine.synthetic import write_synthetic_dataset
from napari_cps4._training_widget import DICE_AXIS, LOSS_AXIS, STAGES

STAGE1, STAGE2 = list(STAGES)
WIDGETS = ("Data and labeling", "Training", "Per-class review", "Prompt inspector")


def wait_for(condition, timeout_s: float) -> None:
    """Process Qt events until ``condition()`` holds (a worker finished)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"still waiting after {timeout_s:.0f} s")
        QApplication.processEvents()
        time.sleep(0.02)


def save_screenshot(viewer: napari.Viewer, path: Path, max_width: int) -> None:
    """Capture the whole window (canvas and docks) and write a downscaled PNG."""
    from PIL import Image as PILImage

    for _ in range(10):
        QApplication.processEvents()
    pixels = viewer.screenshot(canvas_only=False, flash=False)
    picture = PILImage.fromarray(np.asarray(pixels)[..., :3])
    if picture.width > max_width:
        picture = picture.resize((max_width, round(picture.height * max_width / picture.width)), PILImage.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.quantize(colors=256, method=PILImage.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {picture.width}x{picture.height}, {path.stat().st_size // 1024} KB")


def show_only(viewer: napari.Viewer, docks: dict, name: str) -> None:
    """Show one plugin dock, hide the others, so each screenshot shows one widget."""
    for other, dock in docks.items():
        dock.setVisible(other == name)


def show_run_history(training, run: Path) -> None:
    """Fill the Training dock's fields and curves from a finished stage-2 run folder."""
    config = json.loads((run / "config.json").read_text())
    history = json.loads((run / "history.json").read_text())
    training.stage_combo.setCurrentText(STAGE2)
    training.out_edit.setText(str(run))
    training.steps_spin.setValue(int(config["max_steps"]))
    training.method_combo.setCurrentText(str(config["method"]))
    training.plot.reset(f"{STAGE2}: {run.parent.name}/{run.name}")
    for record in history["steps"]:
        training.plot.add(LOSS_AXIS, int(record["step"]), float(record["losses"]["total"]))
    for record in history["validation"]:
        training.plot.add(DICE_AXIS, int(record["step"]), float(record["dice"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--stage1-steps", type=int, default=60)
    parser.add_argument("--stage2-steps", type=int, default=300)
    parser.add_argument("--max-width", type=int, default=1366)
    parser.add_argument("--run", type=Path, default=None,
                        help="a trained stage-2 run folder to show instead of training one here")
    parser.add_argument("--stage1-run", type=Path, default=None,
                        help="a trained stage-1 run folder for the prompt inspector instead of training one here")
    parser.add_argument("--image", type=Path, default=None, help="a NIfTI volume to show instead of the sample")
    parser.add_argument("--labels", type=Path, default=None, help="its mask (painted from in the data dock)")
    args = parser.parse_args(argv)
    if args.run is not None and not (args.run / "model.safetensors").is_file():
        parser.error(f"--run {args.run}: no model.safetensors there (a finished stage-2 run is needed)")
    if args.stage1_run is not None and not (args.stage1_run / "model.safetensors").is_file():
        parser.error(f"--stage1-run {args.stage1_run}: no model.safetensors there (a finished stage-1 run is needed)")
    if (args.image is None) != (args.labels is None):
        parser.error("--image and --labels go together")
    work = args.work or Path(tempfile.mkdtemp(prefix="cps4-screens-"))
    data = work / "data"
    write_synthetic_dataset(data, cases=6, seed=7)
    labeling = work / "labeling"
    write_synthetic_dataset(labeling, cases=5, seed=11)
    write_label_status(labeling / "Mask" / "mask_case2.nii.gz", painted=[3, 4])
    for number in (3, 4, 5):
        (labeling / "Mask" / f"mask_case{number}.nii.gz").unlink()

    viewer = napari.Viewer(title="napari-cps4")
    viewer.window.resize(1366, 768)  # a laptop screen: the docks must fit it
    docks = {}
    widgets = {}
    for name in WIDGETS:
        docks[name], widgets[name] = viewer.window.add_plugin_dock_widget("napari-cps4", name, tabify=False)
    if args.image is None:
        viewer.open_sample("napari-cps4", "spine")
    else:
        viewer.open([str(args.image), str(args.labels)], plugin="napari-cps4")
    image, truth = viewer.layers
    truth.visible = False

    data_widget = widgets["Data and labeling"]
    show_only(viewer, docks, "Data and labeling")
    data_widget.open_dataset(labeling)
    data_widget.image_combo.select_layer(image)
    labels = data_widget.create_labels_layer()
    axis = viewer.dims.not_displayed[0]
    shown = int(round(viewer.dims.point[axis] / image.scale[axis]))
    painted = np.take(truth.data, shown, axis=axis)
    for class_id in (3, 4, 12):
        index = [slice(None)] * 3
        index[axis] = shown
        target = labels.data[tuple(index)]
        target[painted == class_id] = class_id
    labels.refresh()
    data_widget.class_combo.setCurrentIndex(data_widget.class_combo.findData(12))
    save_screenshot(viewer, args.out / "data_widget.png", args.max_width)

    training = widgets["Training"]
    show_only(viewer, docks, "Training")
    stage1_run = args.stage1_run or work / "stage1"
    runs = [] if args.stage1_run is not None else [(STAGE1, args.stage1_steps, stage1_run)]
    if args.run is None:
        runs.append((STAGE2, args.stage2_steps, work / "stage2"))
    for stage, steps, out in runs:
        training.stage_combo.setCurrentText(stage)
        training.data_edit.setText(str(data))
        training.labeled_edit.setText("2")
        training.steps_spin.setValue(steps)
        training.preset_combo.setCurrentText("tiny")
        training.device_combo.setCurrentText("cpu")
        training.text_encoder_edit.setText("tiny")
        training.out_edit.setText(str(out))
        training.preview_combo.select_layer(image)
        training.start()
        wait_for(lambda: training.worker is None, 1800)
    if args.run is not None:
        show_run_history(training, args.run)
    labels.visible = False  # removing it made vispy crash in a later repaint under Xvfb
    save_screenshot(viewer, args.out / "training_widget.png", args.max_width)

    review = widgets["Per-class review"]
    show_only(viewer, docks, "Per-class review")
    review.image_combo.select_layer(image)
    if args.run is None:
        prediction = training.prediction_layer
        review.review(prediction, image)
    else:
        review.run_edit.setText(str(args.run))
        review.run_inference()
        wait_for(lambda: review.worker is None, 1800)
        prediction = review.labels_layer
    review.save_edit.setText(str(work / "reviewed" / "Case1_seg.nii.gz"))
    for row, class_id in enumerate(review.class_ids[:3]):
        review.set_status(class_id, ("accepted", "needs edit", "rejected")[row])
    if review.class_ids:
        review.jump_to_class(review.class_ids[0])
        review.class_table.selectRow(0)
    save_screenshot(viewer, args.out / "review_widget.png", args.max_width)

    inspector = widgets["Prompt inspector"]
    show_only(viewer, docks, "Prompt inspector")
    prediction.visible = False
    inspector.image_combo.select_layer(image)
    inspector.run_edit.setText(str(stage1_run))
    inspector.device_combo.setCurrentText("cpu")
    inspector.choose_class(4)
    inspector.inspect()
    wait_for(lambda: inspector.worker is None, 600)
    save_screenshot(viewer, args.out / "inspector_widget.png", args.max_width)
    viewer.close()


if __name__ == "__main__":
    main()
