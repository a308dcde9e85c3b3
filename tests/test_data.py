"""Dataset layouts (reading and the file names written), partial-label sidecars, splits,
split warnings, bad datasets, and the option lists the CLI and the docks share."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from cps4_engine.data import (
    Case,
    Split,
    label_status_path,
    load_case,
    natural_key,
    open_dataset,
    plan_split,
    read_label_status,
    split_cases,
    split_warnings,
    write_label_status,
)
from cps4_engine import evaluate, layouts, options
from cps4_engine.errors import CPS4Error
from cps4_engine.io import write_volume

AFFINE = np.diag([1.0, 1.0, 4.0, 1.0])


def _pair(folder, image_name, label_name=None, shape=(8, 8, 3), label_value=3, affine=AFFINE):
    folder.mkdir(parents=True, exist_ok=True)
    write_volume(folder / image_name, np.ones(shape, np.float32), affine)
    if label_name:
        label = np.zeros(shape, np.uint8)
        label[2:4, 2:4, 1] = label_value
        write_volume(folder / label_name, label, affine)


def _mrspineseg(root, numbers=(1, 2, 10), unlabeled=()):
    for n in numbers:
        write_volume(root / "MR" / f"Case{n}.nii.gz", np.ones((8, 8, 3), np.float32), AFFINE)
        if n not in unlabeled:
            label = np.zeros((8, 8, 3), np.uint8)
            label[1:3, 1:3, 1] = 4
            write_volume(root / "Mask" / f"mask_case{n}.nii.gz", label, AFFINE)
    return root


def test_natural_order():
    assert sorted(["Case10", "Case2", "case1"], key=natural_key) == ["case1", "Case2", "Case10"]


def test_mrspineseg_layout_order_and_unlabeled(tmp_path):
    dataset = open_dataset(_mrspineseg(tmp_path, numbers=(10, 2, 1), unlabeled=(2,)))
    assert dataset.layout == "mrspineseg"
    assert [c.case_id for c in dataset.cases] == ["Case1", "Case2", "Case10"]
    assert [c.is_labeled for c in dataset.cases] == [True, False, True]
    assert dataset.cases[2].label_path.name == "mask_case10.nii.gz"
    assert dataset.counts() == {"labeled": 2, "partial": 0, "unlabeled": 1}


def test_partial_sidecar_round_trip(tmp_path):
    root = _mrspineseg(tmp_path)
    mask = root / "Mask" / "mask_case2.nii.gz"
    sidecar = write_label_status(mask, painted=[5, 4, 4], complete=False)
    assert sidecar == label_status_path(mask) == root / "Mask" / "mask_case2.cps4.json"
    assert json.loads(sidecar.read_text()) == {"painted": [4, 5], "complete": False}
    assert read_label_status(mask) == (4, 5)
    case = open_dataset(root).case("Case2")
    assert case.is_partial and case.painted == (4, 5)
    assert open_dataset(root).counts() == {"labeled": 2, "partial": 1, "unlabeled": 0}
    write_label_status(mask, None)
    assert read_label_status(mask) is None
    assert not open_dataset(root).case("Case2").is_partial


@pytest.mark.parametrize(
    "content, problem",
    [("{broken", "not valid JSON"), ('{"painted": [4, 25], "complete": false}', "25"),
     ('{"painted": "4", "complete": false}', "list of class ids")],
)
def test_bad_sidecar(tmp_path, content, problem):
    root = _mrspineseg(tmp_path)
    (root / "Mask" / "mask_case1.cps4.json").write_text(content)
    with pytest.raises(CPS4Error, match=problem) as error:
        open_dataset(root)
    assert "mask_case1.cps4.json" in str(error.value)


def test_nnunet_layout(tmp_path):
    _pair(tmp_path / "imagesTr", "spine_10_0000.nii.gz")
    _pair(tmp_path / "imagesTr", "spine_2_0000.nii.gz")
    _pair(tmp_path / "imagesTr", "spine_2_0001.nii.gz")
    _pair(tmp_path / "labelsTr", "spine_2.nii.gz")
    _pair(tmp_path / "labelsTr", "spine_10.nii.gz")
    _pair(tmp_path / "imagesTs", "spine_7_0000.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "file_ending": ".nii.gz"}))
    for target in (tmp_path, tmp_path / "dataset.json"):
        dataset = open_dataset(target)
        assert dataset.layout == "nnunet"
        assert [c.case_id for c in dataset.cases] == ["spine_2", "spine_10", "spine_7"]
        assert [c.is_labeled for c in dataset.cases] == [True, True, False]


def test_decathlon_names_without_channel_suffix(tmp_path):
    _pair(tmp_path / "imagesTr", "spine_1.nii.gz")
    _pair(tmp_path / "labelsTr", "spine_1.nii.gz")
    dataset = open_dataset(tmp_path)
    assert dataset.cases[0].case_id == "spine_1" and dataset.cases[0].is_labeled


def test_plain_folder_with_pairs(tmp_path):
    _pair(tmp_path, "b10_img.nii.gz", "b10_seg.nii.gz")
    _pair(tmp_path, "b2.nii", "b2_label.nii")
    _pair(tmp_path, "alone.nii.gz")
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "folder"
    assert [c.case_id for c in dataset.cases] == ["alone", "b2", "b10"]
    assert [c.is_labeled for c in dataset.cases] == [False, True, True]


def _index(tmp_path):
    _pair(tmp_path / "setA", "c2_img.nii.gz", "c2_seg.nii.gz")
    _pair(tmp_path / "setA", "c1_img.nii.gz", "c1_seg.nii.gz")
    _pair(tmp_path / "setB", "d1_img.nii.gz")
    index = {
        "setA": {"cases": [
            {"case": "02", "image": "setA/c2_img.nii.gz", "label": "setA/c2_seg.nii.gz"},
            {"case": "01", "image": "setA/c1_img.nii.gz", "label": "setA/c1_seg.nii.gz", "painted": [3]},
        ]},
        "setB": {"cases": [{"case": "01", "image": "setB/d1_img.nii.gz"}]},
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    return tmp_path


def test_index_layout_keeps_index_order_and_subsets(tmp_path):
    root = _index(tmp_path)
    whole = open_dataset(root)
    assert whole.layout == "index"
    assert [c.case_id for c in whole.cases] == ["setA/02", "setA/01", "setB/01"]
    subset = open_dataset(root / "index.json", subset="setA")
    assert [c.case_id for c in subset.cases] == ["02", "01"]
    assert subset.cases[1].painted == (3,)
    through_parent = open_dataset(root / "setA")
    assert through_parent.subset == "setA" and len(through_parent) == 2
    with pytest.raises(CPS4Error, match="no set 'setC'"):
        open_dataset(root, subset="setC")


def test_index_with_missing_file(tmp_path):
    root = _index(tmp_path)
    (root / "setA" / "c1_seg.nii.gz").unlink()
    with pytest.raises(CPS4Error, match="label file not found") as error:
        open_dataset(root, subset="setA")
    assert "c1_seg.nii.gz" in str(error.value)


def test_real_index(realdata):
    dataset = open_dataset(realdata, subset="vb3_l1l5_t1")
    assert len(dataset) == 20 and dataset.cases[0].case_id == "01"
    assert len(open_dataset(realdata / "vb2_t11l5_t2")) == 6
    image, label = load_case(open_dataset(realdata / "ivd_t2").cases[0])
    assert image.shape == label.shape == (221, 221, 67)
    assert set(np.unique(label.array)) == {0, 11, 12, 13, 14, 15}


def test_missing_dataset(tmp_path):
    with pytest.raises(CPS4Error, match="not found"):
        open_dataset(tmp_path / "nothing")


def test_empty_dataset_folder(tmp_path):
    with pytest.raises(CPS4Error, match="empty") as error:
        open_dataset(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_unrecognised_dataset_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "scans").mkdir()
    with pytest.raises(CPS4Error, match="unrecognised dataset folder"):
        open_dataset(tmp_path)


def test_orphan_masks(tmp_path):
    root = _mrspineseg(tmp_path / "mr")
    write_volume(root / "Mask" / "mask_case99.nii.gz", np.zeros((8, 8, 3), np.uint8), AFFINE)
    with pytest.raises(CPS4Error, match="no matching image") as error:
        open_dataset(root)
    assert "mask_case99" in str(error.value)
    _pair(tmp_path / "plain", "x_seg.nii.gz")
    with pytest.raises(CPS4Error, match="no matching image"):
        open_dataset(tmp_path / "plain")


def test_load_case_shape_mismatch(tmp_path):
    _pair(tmp_path, "a.nii.gz")
    write_volume(tmp_path / "a_seg.nii.gz", np.zeros((8, 8, 4), np.uint8), AFFINE)
    with pytest.raises(CPS4Error, match="differs from image shape") as error:
        load_case(open_dataset(tmp_path).cases[0])
    assert "a_seg.nii.gz" in str(error.value)


def test_load_case_affine_mismatch(tmp_path):
    _pair(tmp_path, "a.nii.gz")
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    write_volume(tmp_path / "a_seg.nii.gz", np.zeros((8, 8, 3), np.uint8), shifted)
    with pytest.raises(CPS4Error, match="affine"):
        load_case(open_dataset(tmp_path).cases[0])


def test_load_case_labels_outside_scheme(tmp_path):
    _pair(tmp_path, "a.nii.gz", "a_seg.nii.gz", label_value=33)
    with pytest.raises(CPS4Error, match="33 are outside") as error:
        load_case(open_dataset(tmp_path).cases[0])
    assert "a_seg.nii.gz" in str(error.value)


def test_load_case_non_finite_image(tmp_path):
    array = np.ones((8, 8, 3), np.float32)
    array[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(array, AFFINE), tmp_path / "a.nii.gz")
    with pytest.raises(CPS4Error, match="NaN"):
        load_case(open_dataset(tmp_path).cases[0])


def _cases(n, labeled=None):
    labeled = set(range(n)) if labeled is None else set(labeled)
    return [Case(f"Case{i + 1}", f"MR/Case{i + 1}.nii.gz",
                 f"Mask/mask_case{i + 1}.nii.gz" if i in labeled else None) for i in range(n)]


def test_split_counts_reproducibility_and_nesting():
    cases = _cases(60)
    split = split_cases(cases, labeled=2, seed=1, train=40, validation=4)
    assert len(split.labeled) == 2 and len(split.validation) == 4
    assert len(split.unlabeled) == 34 and split.test == cases[40:]
    training_ids = {c.case_id for c in cases[:40]}
    parts = split.labeled + split.unlabeled + split.validation
    assert {c.case_id for c in parts} == training_ids and len(parts) == 40
    again = split_cases(cases, labeled=2, seed=1, train=40, validation=4)
    assert again.labeled == split.labeled and again.validation == split.validation
    four = split_cases(cases, labeled=4, seed=1, train=40, validation=4)
    assert set(map(id, split.labeled)) <= set(map(id, four.labeled))
    assert four.validation == split.validation
    other = split_cases(cases, labeled=2, seed=2, train=40, validation=4)
    assert other.labeled != split.labeled
    fraction = split_cases(cases, labeled=0.05, seed=1, train=40)
    assert len(fraction.labeled) == 2 and fraction.labeled == split.labeled


def test_split_only_labels_cases_with_masks_and_prefers_complete_validation():
    cases = _cases(10, labeled=[0, 3, 5, 7])
    cases[3] = Case(cases[3].case_id, cases[3].image_path, cases[3].label_path, painted=(4,))
    split = split_cases(cases, labeled=2, seed=0, validation=0.5)
    assert len(split.validation) == 2
    assert all(c.is_labeled for c in split.labeled + split.validation)
    for seed in range(8):
        one = split_cases(cases, labeled=2, seed=seed, validation=1)
        assert len(one.validation) == 1 and not one.validation[0].is_partial
    with pytest.raises(CPS4Error, match="only 4 training volumes have masks"):
        split_cases(cases, labeled=5, seed=0)
    with pytest.raises(CPS4Error, match="--validation 3"):
        split_cases(cases, labeled=2, seed=0, validation=3)
    for bad in (-1, 1.5, "2"):
        with pytest.raises(CPS4Error):
            split_cases(cases, labeled=bad, seed=0)
    with pytest.raises(CPS4Error, match="train count"):
        split_cases(cases, labeled=1, seed=0, train=11)


def test_split_save_load(tmp_path):
    split = split_cases(_cases(8), labeled=0.25, seed=3, train=6, validation=1)
    path = split.save(tmp_path / "run" / "split.json")
    loaded = Split.load(path)
    assert [c.case_id for c in loaded.labeled] == [c.case_id for c in split.labeled]
    assert loaded.labeled[0].image_path == split.labeled[0].image_path
    assert loaded.seed == 3 and loaded.labeled_spec == 0.25
    assert [c.case_id for c in loaded.test] == ["Case7", "Case8"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CPS4Error, match="not a valid split"):
        Split.load(tmp_path / "bad.json")


# naming rules: what is written is what is read --------------------------------------------


@pytest.mark.parametrize(
    ("image", "layout", "mask"),
    [
        ("data/MR/Case3.nii.gz", "mrspineseg", "data/Mask/mask_case3.nii.gz"),
        ("data/MR/Spine_A.nii", "mrspineseg", "data/Mask/mask_spine_a.nii.gz"),
        ("data/imagesTr/spine_001_0000.nii.gz", "nnunet", "data/labelsTr/spine_001.nii.gz"),
        ("data/imagesTs/spine_009.nii.gz", "nnunet", "data/labelsTs/spine_009.nii.gz"),
        ("data/case01_img.nii.gz", "folder", "data/case01_seg.nii.gz"),
        ("data/case01_image.nii.gz", "folder", "data/case01_seg.nii.gz"),
        ("data/case01.nii.gz", "folder", "data/case01_seg.nii.gz"),
    ],
)
def test_mask_path_for_every_layout(tmp_path, image, layout, mask):
    assert layouts.layout_of_image(tmp_path / image) == layout
    assert layouts.mask_path_for_image(tmp_path / image) == tmp_path / mask
    assert layouts.mask_path_for_image(tmp_path / image, layout) == tmp_path / mask


@pytest.mark.parametrize(
    ("images", "labeled"),
    [
        (["MR/Case3.nii.gz", "MR/Spine_A.nii"], "MR/Case3.nii.gz"),
        (["imagesTr/spine_001_0000.nii.gz", "imagesTr/spine_002_0000.nii.gz"], "imagesTr/spine_002_0000.nii.gz"),
        (["case01_img.nii.gz", "case02.nii.gz"], "case01_img.nii.gz"),
        (["case01_img.nii.gz", "case02.nii.gz"], "case02.nii.gz"),
    ],
)
def test_a_mask_written_where_the_layout_says_is_read_back(tmp_path, images, labeled):
    for name in images:
        _pair(tmp_path, name)
    image = tmp_path / labeled
    label = np.zeros((8, 8, 3), np.uint8)
    label[1, 1, 1] = 4
    write_volume(layouts.mask_path_for_image(image), label, AFFINE)
    dataset = open_dataset(tmp_path)
    assert [case.image_path for case in dataset.cases if case.is_labeled] == [image]
    assert len(dataset) == len(images)


def test_plain_folder_reads_masks_named_after_the_whole_image_name(tmp_path):
    _pair(tmp_path, "case01_img.nii.gz", "case01_img_seg.nii.gz")
    [case] = open_dataset(tmp_path).cases
    assert case.case_id == "case01" and case.label_path == tmp_path / "case01_img_seg.nii.gz"


def test_two_masks_or_two_images_of_one_case_are_refused(tmp_path):
    _pair(tmp_path / "masks", "case01_img.nii.gz", "case01_seg.nii.gz")
    _pair(tmp_path / "masks", "case02.nii.gz", "case01_img_seg.nii.gz")
    with pytest.raises(CPS4Error, match="two masks of case 'case01'"):
        open_dataset(tmp_path / "masks")
    _pair(tmp_path / "images", "case01_img.nii.gz")
    _pair(tmp_path / "images", "case01.nii.gz")
    with pytest.raises(CPS4Error, match="two images of case 'case01'"):
        open_dataset(tmp_path / "images")


@pytest.mark.parametrize(
    ("image", "layout", "problem"),
    [
        ("x/case01_img.nii.gz", "index", "index dataset"),
        ("x/imagesTr/spine_001_0001.nii.gz", "nnunet", "not channel 0000"),
        ("x/case01_seg.nii.gz", "folder", "named like a mask"),
        ("x/case01.nii.gz", "zip", "unknown dataset layout 'zip'"),
    ],
)
def test_mask_paths_that_cannot_be_named(tmp_path, image, layout, problem):
    with pytest.raises(CPS4Error, match=problem) as info:
        layouts.mask_path_for_image(tmp_path / image, layout)
    assert "\n" not in str(info.value)


def test_new_mrspineseg_cases_take_the_next_free_number(tmp_path):
    assert layouts.next_mrspineseg_case(tmp_path) == (tmp_path / "MR" / "Case1.nii.gz", tmp_path / "Mask" / "mask_case1.nii.gz")
    _mrspineseg(tmp_path, numbers=(2, 10))
    image, mask = layouts.next_mrspineseg_case(tmp_path)
    assert (image.name, mask.name) == ("Case11.nii.gz", "mask_case11.nii.gz")
    with pytest.raises(CPS4Error, match="start at 1"):
        layouts.mrspineseg_case_paths(tmp_path, 0)


def test_case_paths_of_other_layouts_are_read_back(tmp_path):
    image, mask = layouts.nnunet_case_paths(tmp_path / "nn", "spine_004")
    _pair(image.parent, image.name)
    write_volume(mask, np.zeros((8, 8, 3), np.uint8), AFFINE)
    [case] = open_dataset(tmp_path / "nn").cases
    assert (case.case_id, case.label_path) == ("spine_004", mask)

    image, mask = layouts.folder_case_paths(tmp_path / "plain", "Case7", ".nii")
    _pair(image.parent, image.name)
    write_volume(mask, np.zeros((8, 8, 3), np.uint8), AFFINE)
    [case] = open_dataset(tmp_path / "plain").cases
    assert (case.case_id, case.image_path, case.label_path) == ("Case7", image, mask)


@pytest.mark.parametrize(
    "name",
    ["mask_Case3.nii.gz", "Case3_labels.nii.gz", "case11_img_labels.nii.gz", "case11_seg.nii",
     "spine_001_0000_labels.nii.gz", "seg_case4.nii.gz"],
)
def test_case_keys_match_those_evaluate_uses(name):
    assert layouts.case_key(name) == evaluate.case_key(name)
    assert layouts.case_name(name) == evaluate.case_name(name)


# planning a run ---------------------------------------------------------------------------


def test_plan_split_is_the_split_a_run_draws_and_warns_about_what_it_lacks(tmp_path):
    _mrspineseg(tmp_path, numbers=(1, 2, 3), unlabeled=(2, 3))
    split = plan_split(tmp_path, labeled=1)
    assert [case.case_id for case in split.labeled] == ["Case1"] and not split.validation
    assert split.to_dict() == split_cases(open_dataset(tmp_path).cases, 1, validation=0.1).to_dict()
    [warning] = split_warnings(split)
    assert warning.startswith("no validation volumes")

    write_label_status(tmp_path / "Mask" / "mask_case1.nii.gz", [3])
    warnings = split_warnings(plan_split(tmp_path, labeled=1))
    assert any(w.startswith("every labeled mask is partial") for w in warnings)
    with pytest.raises(CPS4Error, match="--labeled 2 asks for 2 volumes but only 1"):
        plan_split(tmp_path, labeled=2)


def test_a_split_with_validation_and_a_complete_mask_gets_no_warning(tmp_path):
    _mrspineseg(tmp_path, numbers=(1, 2, 3))
    assert split_warnings(plan_split(tmp_path, labeled=1, validation=1)) == []


# option lists -----------------------------------------------------------------------------


def test_option_lists_are_the_engines():
    from cps4_engine.presets import PRESET_NAMES
    from cps4_engine.stage2 import METHODS

    assert options.METHODS == METHODS and options.DEFAULT_METHOD in METHODS
    assert options.PRESETS == PRESET_NAMES and options.DEFAULT_PRESET in PRESET_NAMES
    assert options.DEFAULT_ROUND_METHOD in METHODS
    assert options.default_steps("tiny", 1) > 0 and options.default_steps("tiny", 2) > 0
    with pytest.raises(CPS4Error, match="stage must be 1 or 2"):
        options.default_steps("tiny", 3)
    with pytest.raises(CPS4Error, match="unknown preset"):
        options.default_steps("huge", 1)


def test_devices_offered_are_only_those_present(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert options.device_choices() == ["auto", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert options.device_choices() == ["auto", "cuda", "cpu"]


def test_the_command_line_offers_the_same_lists():
    from cps4_engine.cli import build_parser

    parser = build_parser()
    train = parser.parse_args(["train", "data", "--labeled", "2", "--out", "run"])
    assert (train.method, train.preset, train.device) == (options.DEFAULT_METHOD, options.DEFAULT_PRESET,
                                                          options.DEFAULT_DEVICE)
    assert train.validation == options.DEFAULT_VALIDATION


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ({"vb": {"cases": None}}, r'index must map set names to \{"cases": \[\.\.\.\]\}'),
        ({"vb": {"cases": [3]}}, "every case entry must be an object"),
        ({"vb": {"cases": [{"image": 7}]}}, "is not a file name"),
    ],
)
def test_malformed_index_entries_are_one_line_errors(tmp_path, index, message) -> None:
    from cps4_engine.data import open_dataset

    path = tmp_path / "index.json"
    path.write_text(json.dumps(index))
    with pytest.raises(CPS4Error, match=message):
        open_dataset(path)
