"""Class schemes (ids, names, colours, prompts) and label-map files.

A :class:`LabelScheme` is data: every structure the models segment, with its id, a full
name ("L3 vertebra"), a short name for tables and menus ("L3"), its kind (vertebra or
disc), a display colour, an anatomical description and its default prompt. The built-in
scheme is the MRSpineSeg one (0 background, 1 S, 2-10 L5...T9, 11-19 L5/S...T9/T10); other
schemes load from JSON written by :meth:`LabelScheme.to_dict`.

Prompts. A class's *description* says what the structure is, where it lies and what
neighbours it ("the L3 vertebral body, the third lumbar vertebra, below L2 and above
L4"), because class prompts that differ in one word ("... of the L3 vertebra") stand
almost on top of each other in a text encoder's space. A *prompt template* turns a class
into its prompt: ``{description}`` is replaced by the description and ``{name}`` by the
name; a template needs at least one of them. The default template is ``"{description}"``
(the descriptions alone); ``"a T1 image of the {name}"`` gives the short name-only
prompts; ``"a sagittal MR slice of {description}"`` adds context to every description.
The background (class 0) is filled the same way, with name ``"background"``. No default
names an MR sequence: the data are T1- and T2-weighted.

A :class:`LabelMap` renumbers masks made with another scheme (TotalSegmentator,
TotalSpineSeg, SPINEPS, VerSe) into ours. Label-map files are JSON::

    {"name": "...", "source": "TotalSegmentator", "map": {"26": 1, "27": 2}}

Source ids missing from ``map`` become background (``unmapped="background"``) or raise
(``unmapped="error"``); source id 0 is always background.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

from cps4_engine.errors import CPS4Error

ClassKind = Literal["background", "vertebra", "disc"]
UnmappedPolicy = Literal["background", "error"]

CLASS_KINDS: tuple[str, ...] = ("background", "vertebra", "disc")
DEFAULT_PROMPT_TEMPLATE = "{description}"
PROMPT_FIELDS: tuple[str, ...] = ("name", "description")
LABEL_MAP_DIR = Path(__file__).resolve().parent / "resources" / "label_maps"

# Vertebrae in warm colours, discs in cool ones, so the two families never look alike.
_VERTEBRA_COLORS = (
    (230, 25, 75),
    (245, 130, 48),
    (255, 225, 25),
    (170, 110, 40),
    (240, 50, 230),
    (250, 190, 212),
    (128, 0, 0),
    (255, 215, 180),
    (210, 245, 60),
    (128, 128, 0),
)
_DISC_COLORS = (
    (0, 130, 200),
    (70, 240, 240),
    (60, 180, 75),
    (145, 30, 180),
    (0, 128, 128),
    (170, 255, 195),
    (0, 0, 128),
    (230, 190, 255),
    (100, 149, 237),
)
_VERTEBRA_SHORT = ("S", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9")
_ORDINALS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth", 7: "seventh",
             8: "eighth", 9: "ninth", 10: "tenth", 11: "eleventh", 12: "twelfth"}
_REGIONS = {"L": "lumbar", "T": "thoracic"}
BACKGROUND_DESCRIPTION = "the background: everything that is not a vertebral body or an intervertebral disc of the spine"
SACRUM_DESCRIPTION = "the sacrum, the fused sacral vertebrae at the base of the spine, below the L5 vertebral body"


def check_prompt_template(template: str) -> str:
    """Return ``template`` if it can make class prompts (see the module doc).

    Raises:
        CPS4Error: it has neither a ``{name}`` nor a ``{description}`` placeholder, or
            another ``{...}`` field.
    """
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as error:
        raise CPS4Error(f"prompt template {template!r} is malformed ({error})") from None
    unknown = sorted(fields - set(PROMPT_FIELDS))
    if unknown or not fields:
        problem = f"has an unknown placeholder {{{unknown[0]}}}" if unknown else "has no placeholder"
        raise CPS4Error(f"prompt template {template!r} {problem}; use {{name}} and/or {{description}}")
    return template


def fill_prompt(template: str, name: str, description: str) -> str:
    """The prompt ``template`` gives a class of this name and description."""
    return check_prompt_template(template).format(name=name, description=description)


def _vertebra_level(short: str) -> str:
    """``"L3"`` -> ``"the third lumbar vertebra"``."""
    return f"the {_ORDINALS[int(short[1:])]} {_REGIONS[short[0]]} vertebra"


def _neighbour_above(short: str) -> str:
    """The vertebra just above ``short`` (towards the head): L1 -> T12, T9 -> T8."""
    region, number = short[0], int(short[1:])
    if region == "L" and number == 1:
        return "T12"
    return f"{region}{number - 1}"


def _vertebra_description(short: str) -> str:
    """Where a vertebral body lies: ``"the L3 vertebral body, the third lumbar vertebra,
    below L2 and above L4"``; the sacrum has its own."""
    if short == "S":
        return SACRUM_DESCRIPTION
    below = "the sacrum" if short == "L5" else _VERTEBRA_SHORT[_VERTEBRA_SHORT.index(short) - 1]
    return f"the {short} vertebral body, {_vertebra_level(short)}, below {_neighbour_above(short)} and above {below}"


def _disc_description(upper: str, lower: str) -> str:
    """Where a disc lies: ``"the L3/L4 intervertebral disc, between the L3 and L4 vertebral
    bodies"``; the lowest one sits on the sacrum."""
    if lower == "S":
        return f"the L5/S1 intervertebral disc, between the {upper} vertebral body and the sacrum"
    return f"the {upper}/{lower} intervertebral disc, between the {upper} and {lower} vertebral bodies"


@dataclass(frozen=True)
class ClassInfo:
    """One class of a scheme.

    Attributes:
        id: integer label value in masks (0 is background).
        name: full name, e.g. ``"L3 vertebra"`` (a template's ``{name}``).
        short: short name for menus and tables, e.g. ``"L3"``.
        kind: ``"background"``, ``"vertebra"`` or ``"disc"``.
        color: display colour as RGB integers in 0-255.
        prompt: the default class prompt (the scheme's template filled with this class).
        description: what and where the structure is, e.g. ``"the L3 vertebral body, the
            third lumbar vertebra, below L2 and above L4"`` (a template's
            ``{description}``).
    """

    id: int
    name: str
    short: str
    kind: str
    color: tuple[int, int, int]
    prompt: str
    description: str = ""

    def fill(self, template: str) -> str:
        """This class's prompt under ``template`` (see the module doc).

        Raises:
            CPS4Error: the template has no ``{name}`` or ``{description}`` placeholder.
        """
        return fill_prompt(template, self.name, self.description or f"the {self.name}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form of this class."""
        return {
            "id": self.id,
            "name": self.name,
            "short": self.short,
            "kind": self.kind,
            "color": list(self.color),
            "prompt": self.prompt,
            "description": self.description,
        }


@dataclass(frozen=True)
class LabelScheme:
    """An ordered set of classes, background first, with a prompt template.

    Attributes:
        name: scheme name, e.g. ``"mrspineseg"``.
        classes: classes ordered by id; ids must be ``0..num_classes-1``.
        prompt_template: prompt text with ``{name}`` and/or ``{description}``
            placeholders (module doc).
    """

    name: str
    classes: tuple[ClassInfo, ...]
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE

    def __post_init__(self) -> None:
        ids = [info.id for info in self.classes]
        if ids != list(range(len(ids))) or not ids:
            raise CPS4Error(f"scheme {self.name!r}: class ids must be 0, 1, 2, ... in order, got {ids}")
        if self.classes[0].kind != "background":
            raise CPS4Error(f"scheme {self.name!r}: class 0 must be the background")
        for info in self.classes:
            if info.kind not in CLASS_KINDS:
                raise CPS4Error(
                    f"scheme {self.name!r}: class {info.id} has kind {info.kind!r}; "
                    f"use one of {', '.join(CLASS_KINDS)}"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes)

    @property
    def foreground_ids(self) -> tuple[int, ...]:
        """Ids of every class except background, ascending."""
        return tuple(info.id for info in self.classes[1:])

    def by_id(self, class_id: int) -> ClassInfo:
        """The class with this id.

        Raises:
            CPS4Error: no such id in the scheme.
        """
        if not 0 <= int(class_id) < self.num_classes:
            raise CPS4Error(f"scheme {self.name!r} has no class id {class_id}")
        return self.classes[int(class_id)]

    def by_short(self, short: str) -> ClassInfo:
        """The class with this short name (case-insensitive), e.g. ``"l3"``.

        Raises:
            CPS4Error: no class has that short name.
        """
        for info in self.classes:
            if info.short.lower() == short.lower():
                return info
        raise CPS4Error(f"scheme {self.name!r} has no class named {short!r}")

    def names(self) -> dict[int, str]:
        """Full class names by id, background included."""
        return {info.id: info.name for info in self.classes}

    def short_names(self) -> dict[int, str]:
        """Short class names by id, background included."""
        return {info.id: info.short for info in self.classes}

    def napari_colors(self) -> dict[int | None, tuple[float, float, float, float]]:
        """Colours for a napari Labels layer: id -> RGBA floats in [0, 1].

        Background (0) is transparent; the ``None`` key colours ids outside the scheme grey.
        """
        colors: dict[int | None, tuple[float, float, float, float]] = {
            None: (0.5, 0.5, 0.5, 1.0),
            0: (0.0, 0.0, 0.0, 0.0),
        }
        for info in self.classes[1:]:
            red, green, blue = (channel / 255.0 for channel in info.color)
            colors[info.id] = (red, green, blue, 1.0)
        return colors

    def prompts(self, template: str | None = None) -> dict[int, str]:
        """Prompt text for every foreground class, by id.

        Args:
            template: a text with ``{name}`` and/or ``{description}`` placeholders; None
                uses each class's own default prompt.

        Raises:
            CPS4Error: the template has neither placeholder.
        """
        return {class_id: prompt for class_id, prompt in enumerate(self.class_prompts(template)) if class_id}

    def class_prompts(self, template: str | None = None) -> list[str]:
        """One prompt per class, background first (index = class id): what stage 1 trains.

        Args:
            template: as for :meth:`prompts`; None uses each class's own default prompt.

        Raises:
            CPS4Error: the template has neither placeholder.
        """
        if template is None:
            return [info.prompt for info in self.classes]
        check_prompt_template(template)
        return [info.fill(template) for info in self.classes]

    def check_values(self, values: Iterable[int], path: str | Path | None = None) -> None:
        """Raise if any label value is not an id of this scheme.

        Raises:
            CPS4Error: naming ``path`` and the offending values.
        """
        unknown = sorted({int(v) for v in values} - set(range(self.num_classes)))
        if unknown:
            shown = ", ".join(str(v) for v in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
            raise CPS4Error(
                f"label values {shown} are outside the {self.name} scheme (0-{self.num_classes - 1});"
                " renumber the mask with a label-map file",
                path=path,
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, readable by :meth:`from_dict`."""
        return {
            "name": self.name,
            "prompt_template": self.prompt_template,
            "classes": [info.to_dict() for info in self.classes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> "LabelScheme":
        """Build a scheme from :meth:`to_dict` output.

        A class without ``description`` is described as ``"the {name}"``; without ``prompt``
        it gets the template filled with it; without ``short`` it uses its name.

        Raises:
            CPS4Error: a required field is missing or malformed, or the prompt template
                has no placeholder (naming ``source``).
        """
        try:
            template = check_prompt_template(str(data.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)))
            classes = []
            for entry in data["classes"]:
                name = str(entry["name"])
                description = str(entry.get("description") or f"the {name}")
                color = tuple(int(c) for c in entry.get("color", (128, 128, 128)))
                if len(color) != 3 or not all(0 <= c <= 255 for c in color):
                    raise ValueError(f"class {name!r} colour must be three integers in 0-255")
                classes.append(
                    ClassInfo(
                        id=int(entry["id"]),
                        name=name,
                        short=str(entry.get("short", name)),
                        kind=str(entry["kind"]),
                        color=color,  # type: ignore[arg-type]
                        prompt=str(entry.get("prompt") or fill_prompt(template, name, description)),
                        description=description,
                    )
                )
            return cls(name=str(data["name"]), classes=tuple(classes), prompt_template=template)
        except (KeyError, TypeError, ValueError) as error:
            raise CPS4Error(f"not a valid label scheme ({error})", path=source) from None
        except CPS4Error as error:
            raise CPS4Error(str(error), path=source) from None


def mrspineseg_scheme(prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> LabelScheme:
    """The MRSpineSeg scheme: 0 background, 1 S, 2-10 L5...T9, 11-19 L5/S...T9/T10.

    Every class carries its anatomical description (module doc).

    Args:
        prompt_template: template with ``{name}`` and/or ``{description}`` placeholders
            for the default prompts.

    Raises:
        CPS4Error: the template has neither placeholder.
    """
    check_prompt_template(prompt_template)
    entries = [(0, "background", "BG", "background", (0, 0, 0), BACKGROUND_DESCRIPTION)]
    for index, short in enumerate(_VERTEBRA_SHORT):
        name = "sacrum" if short == "S" else f"{short} vertebra"
        entries.append((index + 1, name, short, "vertebra", _VERTEBRA_COLORS[index], _vertebra_description(short)))
    for index in range(9):
        upper, lower = _VERTEBRA_SHORT[index + 1], _VERTEBRA_SHORT[index]
        entries.append((index + 11, f"{upper}/{lower} intervertebral disc", f"{upper}/{lower}", "disc",
                        _DISC_COLORS[index], _disc_description(upper, lower)))
    classes = tuple(
        ClassInfo(class_id, name, short, kind, color, fill_prompt(prompt_template, name, description), description)
        for class_id, name, short, kind, color, description in entries
    )
    return LabelScheme("mrspineseg", classes, prompt_template)


NUM_CLASSES = mrspineseg_scheme().num_classes


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CPS4Error(f"{what} file not found", path=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CPS4Error(f"{what} file is not valid JSON ({error})", path=path) from None


def load_scheme(path: str | Path) -> LabelScheme:
    """Read a scheme JSON file written from :meth:`LabelScheme.to_dict`.

    Raises:
        CPS4Error: missing, unreadable or malformed file.
    """
    data = _read_json(path, "label scheme")
    if not isinstance(data, dict):
        raise CPS4Error("label scheme file must hold a JSON object", path=path)
    return LabelScheme.from_dict(data, source=path)


@dataclass(frozen=True)
class LabelMap:
    """A renumbering from another scheme's ids to ours.

    Attributes:
        name: what the map is, e.g. ``"TotalSegmentator vertebrae"``.
        source: the scheme it maps from, e.g. ``"TotalSegmentator"``.
        mapping: source id -> our id.
        unmapped: what non-zero source ids missing from ``mapping`` become:
            ``"background"`` (0) or ``"error"`` (raise).
    """

    name: str
    source: str
    mapping: dict[int, int]
    unmapped: str = "background"

    def apply(self, labels: np.ndarray, path: str | Path | None = None) -> np.ndarray:
        """Renumber a mask.

        Args:
            labels: integer mask of any shape, in the source scheme's ids.
            path: the mask's file, named in errors.

        Returns:
            Mask of the same shape in our ids, dtype uint8.

        Raises:
            CPS4Error: ``unmapped="error"`` and the mask holds ids missing from the map.
        """
        values, inverse = np.unique(np.asarray(labels), return_inverse=True)
        missing = [int(v) for v in values if int(v) != 0 and int(v) not in self.mapping]
        if missing and self.unmapped == "error":
            raise CPS4Error(
                f"source ids {missing} have no entry in label map {self.name!r}", path=path
            )
        targets = np.array([self.mapping.get(int(v), 0) for v in values], dtype=np.uint8)
        return targets[inverse].reshape(np.shape(labels))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the label-map file format)."""
        return {
            "name": self.name,
            "source": self.source,
            "map": {str(key): value for key, value in sorted(self.mapping.items())},
        }


def load_label_map(
    path: str | Path, unmapped: UnmappedPolicy = "background", scheme: LabelScheme | None = None
) -> LabelMap:
    """Read a label-map file; a bare name loads a bundled map (see :func:`bundled_label_maps`).

    Args:
        path: a JSON file, or the stem of a file in ``cps4_engine/resources/label_maps/``
            such as ``"totalsegmentator_vertebrae"``.
        unmapped: ``"background"`` turns source ids missing from the map into 0,
            ``"error"`` makes :meth:`LabelMap.apply` raise on them.
        scheme: target scheme the map's values must belong to (MRSpineSeg if None).

    Raises:
        CPS4Error: missing or malformed file, or target ids outside the scheme.
    """
    if unmapped not in ("background", "error"):
        raise CPS4Error(f"unmapped must be 'background' or 'error', got {unmapped!r}")
    path = Path(path)
    if not path.suffix and not path.exists() and (LABEL_MAP_DIR / f"{path}.json").is_file():
        path = LABEL_MAP_DIR / f"{path}.json"
    data = _read_json(path, "label map")
    try:
        mapping = {int(key): int(value) for key, value in data["map"].items()}
        label_map = LabelMap(
            name=str(data.get("name", path.stem)),
            source=str(data.get("source", "unknown")),
            mapping=mapping,
            unmapped=unmapped,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CPS4Error(f"not a valid label map ({error})", path=path) from None
    (scheme or mrspineseg_scheme()).check_values(mapping.values(), path=path)
    return label_map


def bundled_label_maps() -> dict[str, Path]:
    """Label-map files shipped with the package, by name (file stem)."""
    return {file.stem: file for file in sorted(LABEL_MAP_DIR.glob("*.json"))}
