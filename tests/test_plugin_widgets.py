"""Viewer tests: the manifest's widgets open, sample data, labeling from scratch, review, save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cps4_engine.active.workspace import Workspace, mask_versions
from cps4_engine.data import open_dataset
from cps4_engine.errors import CPS4Error
from cps4_engine.io import read_volume, sagittal_layout, write_volume
from cps4_engine.labels import mrspineseg_scheme
from cps4_engine.synthetic import sample_volume
from napari_cps4._data_widget import DataWidget
from napari_cps4._inspector_widget import InspectorWidget
from napari_cps4._layers import AFFINE_KEY
from napari_cps4._review_widget import STATUS_COLUMN, ReviewWidget
from napari_cps4._training_widget import TrainingWidget

pytestmark = pytest.mark.viewer

WIDGETS = {
    "Data and labeling": DataWidget,
    "Training": TrainingWidget,
    "Per-class review": ReviewWidget,
    "Prompt inspector": InspectorWidget,
}


@pytest.fixture
def viewer_with_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cps4", "spine")
    return viewer


def test_every_widget_opens_from_the_manifest(viewer_with_sample) -> None:
    viewer = viewer_with_sample
    for name, widget_class in WIDGETS.items():
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-cps4", name)
        assert isinstance(widget, widget_class)
    image, labels = viewer.layers
    assert image.__class__.__name__ == "Image" and labels.__class__.__name__ == "Labels"
    np.testing.assert_allclose(image.scale, labels.scale)
    _, _, affine = sample_volume(seed=0)
    np.testing.assert_allclose(image.metadata[AFFINE_KEY], affine)
    assert labels.features.set_index("index").loc[1, "class"] == "sacrum"


def test_painting_classes_and_adding_the_case_writes_a_partial_mask(viewer_with_sample, tmp_path: Path) -> None:
    viewer = viewer_with_sample
    image = viewer.layers[0]
    widget = DataWidget(viewer)
    widget.image_combo.select_layer(image)
    labels = widget.create_labels_layer()
    assert labels.data.shape == image.data.shape
    np.testing.assert_allclose(labels.scale, image.scale)
    for class_id in (4, 13):
        widget.class_combo.setCurrentIndex(widget.class_combo.findData(class_id))
        assert labels.selected_label == class_id
        labels.brush_size = 3
        centre = np.array(image.data.shape) // 2 + (class_id - 8)
        labels.paint(tuple(int(c) for c in centre), labels.selected_label, refresh=True)
    widget.labeled_set_edit.setText(str(tmp_path / "labeled"))
    mask_path = widget.add_to_labeled_set()

    assert mask_path == tmp_path / "labeled" / "Mask" / "mask_case1.nii.gz"
    mask = read_volume(mask_path, kind="label")
    np.testing.assert_allclose(mask.affine, image.metadata[AFFINE_KEY], atol=1e-5)
    assert set(np.unique(mask.array)) == {0, 4, 13}
    dataset = open_dataset(tmp_path / "labeled")
    [case] = dataset.cases
    assert case.is_partial and tuple(case.painted) == (4, 13)
    assert widget.case_table.rowCount() == 1
    assert widget.case_table.item(0, 1).text() == "partial"


def test_nothing_painted_is_refused(viewer_with_sample) -> None:
    widget = DataWidget(viewer_with_sample)
    widget.image_combo.select_layer(viewer_with_sample.layers[0])
    widget.create_labels_layer()
    with pytest.raises(CPS4Error, match="nothing is painted"):
        widget.add_to_labeled_set()


def test_dataset_table_loads_a_case_as_layers(make_napari_viewer, tmp_path: Path) -> None:
    image, label, affine = sample_volume(seed=1)
    write_volume(tmp_path / "MR" / "Case1.nii.gz", image, affine)
    write_volume(tmp_path / "Mask" / "mask_case1.nii.gz", label, affine)
    write_volume(tmp_path / "MR" / "Case2.nii.gz", image, affine)
    viewer = make_napari_viewer()
    widget = DataWidget(viewer)
    widget.open_dataset(tmp_path)
    assert [widget.case_table.item(r, 1).text() for r in range(2)] == ["labeled", "unlabeled"]
    layers = widget.load_case(widget.dataset.cases[0])
    assert [type(layer).__name__ for layer in layers] == ["Image", "Labels"]
    np.testing.assert_array_equal(layers[1].data, label)
    assert viewer.dims.order[0] == read_volume(tmp_path / "MR" / "Case1.nii.gz").sagittal_axis


def test_viewer_open_and_save_round_trip_keeps_the_affine(make_napari_viewer, tmp_path: Path) -> None:
    _, label, affine = sample_volume(seed=0)
    source = write_volume(tmp_path / "mask_case7.nii.gz", label, affine)
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(source), plugin="napari-cps4")
    assert type(layer).__name__ == "Labels"
    layer.data[layer.data == 4] = 0
    target = tmp_path / "saved.nii.gz"
    layer.save(str(target), plugin="napari-cps4")
    saved = read_volume(target, kind="label")
    np.testing.assert_allclose(saved.affine, affine, atol=1e-5)
    assert 4 not in np.unique(saved.array)
    assert set(np.unique(saved.array)) == set(np.unique(label)) - {4}


def test_review_accept_reject_and_save_keeps_previous_version(viewer_with_sample, tmp_path: Path) -> None:
    viewer = viewer_with_sample
    image, labels = viewer.layers
    widget = ReviewWidget(viewer)
    widget.review(labels, image)
    present = sorted(int(v) for v in np.unique(labels.data) if v != 0)
    assert widget.class_ids == present
    assert [widget.class_table.item(r, STATUS_COLUMN).text() for r in range(len(present))] == ["pending"] * len(present)

    accepted, rejected = present[0], present[1]
    widget.class_table.selectRow(0)
    widget.shortcuts["accept"].activated.emit()
    widget.set_status(rejected, "rejected")
    assert widget.class_table.item(0, STATUS_COLUMN).text() == "accepted"

    widget.jump_to_class(accepted)
    axis = viewer.dims.not_displayed[0]
    centroid = np.argwhere(labels.data == accepted).mean(axis=0)[axis]
    assert viewer.dims.point[axis] == pytest.approx(round(centroid) * labels.scale[axis])

    target = tmp_path / "reviewed.nii.gz"
    widget.save(target)
    saved = read_volume(target, kind="label")
    assert set(np.unique(saved.array)) == {0, accepted}
    np.testing.assert_allclose(saved.affine, image.metadata[AFFINE_KEY], atol=1e-5)

    widget.set_status(present[2], "needs edit")
    widget.save(target)
    assert set(np.unique(read_volume(target, kind="label").array)) == {0, accepted, present[2]}
    first, second = mask_versions(target)
    assert set(np.unique(read_volume(first, kind="label").array)) == {0, accepted}
    assert set(np.unique(read_volume(second, kind="label").array)) == {0, accepted, present[2]}


def test_review_class_layers_toggle_and_solo(viewer_with_sample) -> None:
    viewer = viewer_with_sample
    image, labels = viewer.layers
    widget = ReviewWidget(viewer)
    widget.review(labels, image)
    class_layers = widget.split_class_layers()
    assert sorted(class_layers) == widget.class_ids
    first = widget.class_ids[0]
    assert set(np.unique(class_layers[first].data)) == {0, first}
    widget.solo(first)
    assert [layer.visible for layer in class_layers.values()] == [i == first for i in class_layers]
    widget.solo(None)
    assert all(layer.visible for layer in class_layers.values())


def test_saving_with_nothing_reviewed_is_refused(viewer_with_sample, tmp_path: Path) -> None:
    viewer = viewer_with_sample
    widget = ReviewWidget(viewer)
    widget.review(viewer.layers[1], viewer.layers[0])
    with pytest.raises(CPS4Error, match="no class is accepted"):
        widget.save(tmp_path / "x.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()


def test_workspace_cases_show_review_state_and_take_new_label_versions(make_napari_viewer, tmp_path: Path) -> None:
    image, label, affine = sample_volume(seed=2)
    write_volume(tmp_path / "data" / "MR" / "Case1.nii.gz", image, affine)
    write_volume(tmp_path / "data" / "Mask" / "mask_case1.nii.gz", label, affine)
    write_volume(tmp_path / "data" / "MR" / "Case2.nii.gz", image, affine)
    cases = open_dataset(tmp_path / "data").cases
    Workspace.create(tmp_path / "ws", cases, mrspineseg_scheme())

    viewer = make_napari_viewer()
    widget = DataWidget(viewer)
    widget.open_dataset(tmp_path / "ws")
    assert [widget.case_table.item(r, 1).text() for r in range(2)] == ["reviewed", "unlabeled"]

    image_layer, = widget.load_case(widget.cases[1])
    labels = widget.create_labels_layer(image_layer)
    labels.data[label == 5] = 5
    widget.complete_check.setChecked(False)
    version_path = widget.add_to_labeled_set(labels, image_layer)
    workspace = Workspace.open(tmp_path / "ws")
    np.testing.assert_array_equal(read_volume(version_path, kind="label").array, np.where(label == 5, 5, 0))
    assert not workspace.is_complete("Case2")
    assert workspace.human_classes("Case2") == [5]
    assert widget.case_table.item(1, 2).text() == "L2"


def test_first_image_opened_turns_the_view_sagittal(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    widget = DataWidget(viewer)
    viewer.open_sample("napari-cps4", "spine")
    image = viewer.layers[0]
    sagittal_axis = sagittal_layout(image.metadata[AFFINE_KEY]).axes[0]
    assert viewer.dims.not_displayed == (sagittal_axis,)
    middle = image.data.shape[sagittal_axis] // 2
    assert viewer.dims.point[sagittal_axis] == pytest.approx(middle * image.scale[sagittal_axis])
    viewer.dims.order = (0, 1, 2)
    widget.image_combo.select_layer(image)
    widget.sagittal_button.click()
    assert viewer.dims.not_displayed == (sagittal_axis,)


def test_user_mistakes_get_one_line_errors(viewer_with_sample, tmp_path: Path) -> None:
    viewer = viewer_with_sample
    image, labels = viewer.layers
    data_widget = DataWidget(viewer)
    data_widget.image_combo.select_layer(image)
    painted = data_widget.create_labels_layer()
    painted.data[labels.data == 3] = 3
    review = ReviewWidget(viewer)
    inspector = InspectorWidget(viewer)
    mistakes = [
        (lambda: data_widget.add_to_labeled_set(painted, image), "labeled-set folder"),
        (lambda: data_widget.open_dataset(tmp_path / "nowhere"), "nowhere"),
        (lambda: review.jump_to_class(3), "nothing to review"),
        (lambda: review.run_inference(), "stage-2 run"),
        (lambda: inspector.inspect("the L3 vertebra"), "stage-1 run"),
    ]
    for action, expected in mistakes:
        with pytest.raises(CPS4Error, match=expected) as info:
            action()
        assert "\n" not in str(info.value)
    review.review(painted, image)
    assert review.class_ids == [3]
    with pytest.raises(CPS4Error, match="no voxels"):
        review.jump_to_class(4)
