"""Class schemes (ids, names, colours, prompts) and label-map files.

A :class:`LabelScheme` is data: every structure the models segment, with its id, a full
name used in prompts ("L3 vertebra"), a short name for tables and menus ("L3"), its kind
(vertebra or disc), a display colour and its default prompt. The built-in scheme is the
MRSpineSeg one (0 background, 1 S, 2-10 L5...T9, 11-19 L5/S...T9/T10); other schemes load
from JSON written by :meth:`LabelScheme.to_dict`.

A :class:`LabelMap` renumbers masks made with another scheme (TotalSegmentator,
TotalSpineSeg, SPINEPS, VerSe) into ours. Label-map files are JSON::

    {"name": "...", "source": "TotalSegmentator", "map": {"26": 1, "27": 2}}

Source ids missing from ``map`` become background (``unmapped="background"``) or raise
(``unmapped="error"``); source id 0 is always background.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

from cps4_engine.errors import CPS4Error

ClassKind = Literal["background", "vertebra", "disc"]
UnmappedPolicy = Literal["background", "error"]

CLASS_KINDS: tuple[str, ...] = ("background", "vertebra", "disc")
DEFAULT_PROMPT_TEMPLATE = "a sagittal T2-weighted MR image of the {name}"
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


@dataclass(frozen=True)
class ClassInfo:
    """One class of a scheme.

    Attributes:
        id: integer label value in masks (0 is background).
        name: full name used in prompts, e.g. ``"L3 vertebra"``.
        short: short name for menus and tables, e.g. ``"L3"``.
        kind: ``"background"``, ``"vertebra"`` or ``"disc"``.
        color: display colour as RGB integers in 0-255.
        prompt: the default class prompt (the scheme's template filled with ``name``).
    """

    id: int
    name: str
    short: str
    kind: str
    color: tuple[int, int, int]
    prompt: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form of this class."""
        return {
            "id": self.id,
            "name": self.name,
            "short": self.short,
            "kind": self.kind,
            "color": list(self.color),
            "prompt": self.prompt,
        }


@dataclass(frozen=True)
class LabelScheme:
    """An ordered set of classes, background first, with a prompt template.

    Attributes:
        name: scheme name, e.g. ``"mrspineseg"``.
        classes: classes ordered by id; ids must be ``0..num_classes-1``.
        prompt_template: prompt text with a ``{name}`` placeholder.
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
        """Prompt text for every foreground class.

        Args:
            template: a text with a ``{name}`` placeholder; None uses each class's own
                default prompt.

        Raises:
            CPS4Error: the template has no ``{name}`` placeholder.
        """
        if template is None:
            return {info.id: info.prompt for info in self.classes[1:]}
        if "{name}" not in template:
            raise CPS4Error(f"prompt template {template!r} has no {{name}} placeholder")
        return {info.id: template.format(name=info.name) for info in self.classes[1:]}

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

        A foreground class without ``prompt`` gets the template filled with its name; without
        ``short`` it uses its name.

        Raises:
            CPS4Error: a required field is missing or malformed (naming ``source``).
        """
        try:
            template = str(data.get("prompt_template", DEFAULT_PROMPT_TEMPLATE))
            classes = []
            for entry in data["classes"]:
                name = str(entry["name"])
                kind = str(entry["kind"])
                default_prompt = "" if kind == "background" else template.format(name=name)
                color = tuple(int(c) for c in entry.get("color", (128, 128, 128)))
                if len(color) != 3 or not all(0 <= c <= 255 for c in color):
                    raise ValueError(f"class {name!r} colour must be three integers in 0-255")
                classes.append(
                    ClassInfo(
                        id=int(entry["id"]),
                        name=name,
                        short=str(entry.get("short", name)),
                        kind=kind,
                        color=color,  # type: ignore[arg-type]
                        prompt=str(entry.get("prompt") or default_prompt),
                    )
                )
            return cls(name=str(data["name"]), classes=tuple(classes), prompt_template=template)
        except (KeyError, TypeError, ValueError) as error:
            raise CPS4Error(f"not a valid label scheme ({error})", path=source) from None


def mrspineseg_scheme(prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> LabelScheme:
    """The MRSpineSeg scheme: 0 background, 1 S, 2-10 L5...T9, 11-19 L5/S...T9/T10.

    Args:
        prompt_template: template with a ``{name}`` placeholder for the default prompts.
    """
    if "{name}" not in prompt_template:
        raise CPS4Error(f"prompt template {prompt_template!r} has no {{name}} placeholder")
    classes = [ClassInfo(0, "background", "BG", "background", (0, 0, 0), "")]
    for index, short in enumerate(_VERTEBRA_SHORT):
        name = "sacrum" if short == "S" else f"{short} vertebra"
        classes.append(
            ClassInfo(
                index + 1, name, short, "vertebra", _VERTEBRA_COLORS[index],
                prompt_template.format(name=name),
            )
        )
    for index in range(9):
        short = f"{_VERTEBRA_SHORT[index + 1]}/{_VERTEBRA_SHORT[index]}"
        name = f"{short} intervertebral disc"
        classes.append(
            ClassInfo(
                index + 11, name, short, "disc", _DISC_COLORS[index],
                prompt_template.format(name=name),
            )
        )
    return LabelScheme("mrspineseg", tuple(classes), prompt_template)


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
