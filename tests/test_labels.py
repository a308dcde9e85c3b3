"""Label schemes, prompts, colours and label-map files."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest

from cps4_engine.errors import CPS4Error
from cps4_engine.labels import (
    LabelScheme,
    bundled_label_maps,
    load_label_map,
    load_scheme,
    mrspineseg_scheme,
)


def test_mrspineseg_ids_names_and_kinds():
    scheme = mrspineseg_scheme()
    assert scheme.num_classes == 20
    assert scheme.foreground_ids == tuple(range(1, 20))
    assert scheme.by_id(1).short == "S"
    assert scheme.by_id(4).name == "L3 vertebra"
    assert scheme.by_id(4).short == "L3"
    assert scheme.by_id(10).short == "T9"
    assert scheme.by_id(11).short == "L5/S"
    assert scheme.by_id(12).name == "L4/L5 intervertebral disc"
    assert scheme.by_id(19).short == "T9/T10"
    assert [scheme.by_id(i).kind for i in range(20)] == ["background"] + ["vertebra"] * 10 + ["disc"] * 9
    assert scheme.by_short("t12/l1").id == 16
    with pytest.raises(CPS4Error):
        scheme.by_id(20)


def test_colours_distinct_and_in_two_families():
    scheme = mrspineseg_scheme()
    colours = {info.id: np.array(info.color, dtype=float) for info in scheme.classes[1:]}
    closest = min(np.linalg.norm(colours[a] - colours[b]) for a, b in combinations(colours, 2))
    assert closest > 40
    for info in scheme.classes[1:]:
        red, _, blue = info.color
        assert (red > blue) if info.kind == "vertebra" else (blue > red)
    napari = scheme.napari_colors()
    assert napari[0][3] == 0.0
    assert napari[4] == pytest.approx(tuple(c / 255 for c in scheme.by_id(4).color) + (1.0,))


def test_prompts_default_and_template():
    scheme = mrspineseg_scheme()
    prompts = scheme.prompts()
    assert prompts[4] == "a sagittal T2-weighted MR image of the L3 vertebra"
    assert set(prompts) == set(range(1, 20))
    custom = scheme.prompts("{name} on MRI")
    assert custom[12] == "L4/L5 intervertebral disc on MRI"
    with pytest.raises(CPS4Error, match="placeholder"):
        scheme.prompts("no placeholder")


def test_scheme_round_trip_through_json(tmp_path):
    scheme = mrspineseg_scheme("a T1 image of the {name}")
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps(scheme.to_dict()))
    loaded = load_scheme(path)
    assert loaded == scheme
    assert loaded.by_id(6).prompt == "a T1 image of the L1 vertebra"


def test_small_custom_scheme_fills_prompts(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"name": "two", "classes": [
        {"id": 0, "name": "background", "kind": "background"},
        {"id": 1, "name": "L3 vertebral body", "kind": "vertebra", "color": [255, 0, 0]},
    ]}))
    scheme = load_scheme(path)
    assert scheme.num_classes == 2
    assert scheme.prompts()[1] == "a sagittal T2-weighted MR image of the L3 vertebral body"


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"name": "x", "classes": [{"id": 1, "name": "a", "kind": "vertebra"}]}), "ids"),
        (json.dumps({"name": "x", "classes": [{"id": 0, "name": "a", "kind": "organ"}]}), "background"),
        (json.dumps({"classes": []}), "not a valid label scheme"),
    ],
)
def test_bad_scheme_files_name_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CPS4Error, match=problem) as info:
        load_scheme(path)
    assert "\n" not in str(info.value)


def test_missing_scheme_file(tmp_path):
    with pytest.raises(CPS4Error, match="not found"):
        load_scheme(tmp_path / "absent.json")


def test_totalsegmentator_vertebrae_map():
    assert "totalsegmentator_vertebrae" in bundled_label_maps()
    label_map = load_label_map("totalsegmentator_vertebrae")
    assert label_map.source == "TotalSegmentator"
    source = np.array([[0, 26, 27, 28], [29, 30, 31, 32], [33, 5, 90, 0]])
    mapped = label_map.apply(source)
    expected = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 0, 0, 0]])
    np.testing.assert_array_equal(mapped, expected)
    strict = load_label_map(bundled_label_maps()["totalsegmentator_vertebrae"], unmapped="error")
    with pytest.raises(CPS4Error, match=r"\[5, 90\]"):
        strict.apply(source, path="seg.nii.gz")
    np.testing.assert_array_equal(strict.apply(source[:2]), expected[:2])


def test_label_map_targets_must_be_in_scheme(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"name": "m", "source": "VerSe", "map": {"20": 2, "21": 42}}))
    with pytest.raises(CPS4Error, match="42"):
        load_label_map(path)
    with pytest.raises(CPS4Error, match="unmapped"):
        load_label_map(path, unmapped="zero")  # type: ignore[arg-type]


def test_check_values_reports_outside_ids():
    scheme = mrspineseg_scheme()
    scheme.check_values([0, 1, 19])
    with pytest.raises(CPS4Error, match="mask.nii.gz: label values 20, 25"):
        scheme.check_values([0, 20, 25], path="mask.nii.gz")


def test_scheme_rejects_bad_class_table():
    scheme = mrspineseg_scheme()
    with pytest.raises(CPS4Error):
        LabelScheme("broken", scheme.classes[1:])
