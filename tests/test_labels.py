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


def test_default_prompts_describe_where_each_structure_lies():
    scheme = mrspineseg_scheme()
    prompts = scheme.class_prompts()
    assert len(prompts) == 20 and len(set(prompts)) == 20
    assert prompts[4] == "the L3 vertebral body, the third lumbar vertebra, below L2 and above L4"
    assert prompts[3] == "the L4 vertebral body, the fourth lumbar vertebra, below L3 and above L5"
    assert prompts[2] == "the L5 vertebral body, the fifth lumbar vertebra, below L4 and above the sacrum"
    assert prompts[6] == "the L1 vertebral body, the first lumbar vertebra, below T12 and above L2"
    assert prompts[7] == "the T12 vertebral body, the twelfth thoracic vertebra, below T11 and above L1"
    assert prompts[10] == "the T9 vertebral body, the ninth thoracic vertebra, below T8 and above T10"
    assert "sacrum" in prompts[1] and "L5" in prompts[1]
    assert prompts[13] == "the L3/L4 intervertebral disc, between the L3 and L4 vertebral bodies"
    assert prompts[11] == "the L5/S1 intervertebral disc, between the L5 vertebral body and the sacrum"
    assert prompts[16] == "the T12/L1 intervertebral disc, between the T12 and L1 vertebral bodies"
    assert prompts[0].startswith("the background: everything that is not a vertebral body")
    # The data are T1- and T2-weighted: no default prompt may name a sequence.
    for prompt in prompts:
        assert not any(word in prompt for word in ("T1-", "T2", "weighted", "FLAIR", "STIR")), prompt
    assert scheme.prompts() == {class_id: prompts[class_id] for class_id in range(1, 20)}
    assert scheme.by_id(4).description == prompts[4] and scheme.prompt_template == "{description}"


def test_templates_combine_name_and_description():
    scheme = mrspineseg_scheme()
    named = scheme.prompts("{name} on MRI")
    assert named[12] == "L4/L5 intervertebral disc on MRI"
    assert scheme.class_prompts("a T1 image of the {name}")[0] == "a T1 image of the background"
    both = scheme.class_prompts("a sagittal MR slice of {description} ({name})")
    assert both[4] == "a sagittal MR slice of the L3 vertebral body, the third lumbar vertebra, below L2 and above L4 (L3 vertebra)"
    rebuilt = mrspineseg_scheme("a T1 image of the {name}")
    assert rebuilt.by_id(6).prompt == "a T1 image of the L1 vertebra" and rebuilt.by_id(6).description == scheme.by_id(6).description
    hint = r"; use \{name\} and/or \{description\}$"
    for bad, problem in (("no placeholder", "has no placeholder" + hint),
                         ("the {level}", r"has an unknown placeholder \{level\}" + hint),
                         ("the {name", "is malformed")):
        with pytest.raises(CPS4Error, match=problem) as info:
            scheme.prompts(bad)
        assert "\n" not in str(info.value)
        with pytest.raises(CPS4Error, match=problem):
            mrspineseg_scheme(bad)


def test_scheme_round_trip_through_json(tmp_path):
    scheme = mrspineseg_scheme("a T1 image of the {name}")
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps(scheme.to_dict()))
    loaded = load_scheme(path)
    assert loaded == scheme
    assert loaded.by_id(6).prompt == "a T1 image of the L1 vertebra"
    assert loaded.by_id(13).description == "the L3/L4 intervertebral disc, between the L3 and L4 vertebral bodies"


def test_small_custom_scheme_fills_prompts(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"name": "two", "classes": [
        {"id": 0, "name": "background", "kind": "background"},
        {"id": 1, "name": "L3 vertebral body", "kind": "vertebra", "color": [255, 0, 0]},
        {"id": 2, "name": "L4 vertebral body", "kind": "vertebra", "description": "the body below L3"},
    ]}))
    scheme = load_scheme(path)
    assert scheme.num_classes == 3
    assert scheme.class_prompts() == ["the background", "the L3 vertebral body", "the body below L3"]
    templated = {"name": "t", "prompt_template": "a T1 image of the {name}", "classes": json.loads(path.read_text())["classes"]}
    path.write_text(json.dumps(templated))
    assert load_scheme(path).prompts() == {1: "a T1 image of the L3 vertebral body", 2: "a T1 image of the L4 vertebral body"}
    path.write_text(json.dumps({**templated, "prompt_template": "a T1 image"}))
    with pytest.raises(CPS4Error, match="two.json: .*prompt template 'a T1 image' has no placeholder"):
        load_scheme(path)


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
