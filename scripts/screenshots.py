"""Screenshots of each napari-cps4 widget in use, for the README and docs/walkthrough.md.

Run under a virtual X server with a laptop-sized screen from the project root::

    xvfb-run -a -s "-screen 0 1366x768x24" .venv/bin/python scripts/screenshots.py --out docs/images

It writes a small synthetic dataset and trains stage 1 and stage 2 briefly (tiny preset,
CPU) through the Training widget itself, then opens the sample volume and captures:
``data_widget.png`` (labeling from scratch), ``training_widget.png`` (live curves after a
run), ``review_widget.png`` (the per-class review of the prediction) and
``inspector_widget.png`` (a class prompt's heat map), each of the whole 1366 x 768 window,
saved with a 256-colour palette to stay well under 300 KB.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from cps4_engine.data import write_label_status
from cps4_engine.synthetic import write_synthetic_dataset
from napari_cps4._training_widget import STAGES

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--stage1-steps", type=int, default=60)
    parser.add_argument("--stage2-steps", type=int, default=300)
    parser.add_argument("--max-width", type=int, default=1366)
    args = parser.parse_args(argv)
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
    viewer.open_sample("napari-cps4", "spine")
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
    for stage, steps, out in ((STAGE1, args.stage1_steps, work / "stage1"), (STAGE2, args.stage2_steps, work / "stage2")):
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
    viewer.layers.remove(labels)
    save_screenshot(viewer, args.out / "training_widget.png", args.max_width)

    review = widgets["Per-class review"]
    show_only(viewer, docks, "Per-class review")
    review.image_combo.select_layer(image)
    prediction = training.prediction_layer
    review.review(prediction, image)
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
    inspector.run_edit.setText(str(work / "stage1"))
    inspector.device_combo.setCurrentText("cpu")
    inspector.choose_class(4)
    inspector.inspect()
    wait_for(lambda: inspector.worker is None, 600)
    save_screenshot(viewer, args.out / "inspector_widget.png", args.max_width)
    viewer.close()


if __name__ == "__main__":
    main()
