"""Spine-aware correction tools on label volumes, and a check of vertebra/disc order.

The commonest error of a spine segmenter is not a bad outline but a wrong *name*: every
level called one too high or too low. The tools here fix such errors in one step on a
whole label volume, whatever its orientation (they only rename voxels), and
:func:`check_order` finds the anatomical inconsistencies that reveal them.

Level order, a disc's two neighbouring vertebrae and the superior axis come from
:mod:`cps4_engine.levels`, the same anatomy the 3D level step of prediction keeps; a
neighbour the scheme does not have (T10 for ``T9/T10``) is simply not checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage

from cps4_engine.errors import CPS4Error
from cps4_engine.labels import LabelScheme
from cps4_engine.levels import disc_neighbours, spine_levels, superior_height

IssueKind = Literal["gap", "duplicate", "misordered", "disc_position"]

_FULL_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


def _check_label_values(labels: np.ndarray, scheme: LabelScheme) -> None:
    known = {info.id for info in scheme.classes}
    unknown = sorted(set(np.unique(labels).tolist()) - known)
    if unknown:
        raise CPS4Error(f"label values {unknown} are not classes of the {scheme.name} scheme")


def _check_class(class_id: int, scheme: LabelScheme, role: str) -> None:
    if class_id not in {info.id for info in scheme.classes}:
        raise CPS4Error(f"{role} {class_id} is not a class of the {scheme.name} scheme")


def shift_levels(labels: np.ndarray, offset: int, scheme: LabelScheme) -> np.ndarray:
    """Rename every vertebra and every disc ``offset`` levels up (positive) or down.

    ``offset=+1`` turns L4 into L3 and the L4/L5 disc into L3/L4; ``offset=-1`` turns L4
    into L5 and L5 into S. Background and classes of other kinds keep their ids. The
    voxels are only renamed, so the volume's orientation does not matter.

    At the ends of the scheme nothing is dropped silently: if a class present in
    ``labels`` would move past the top (T9 for MRSpineSeg) or the bottom (S) of its kind,
    the shift is refused with a :class:`CPS4Error` naming that class.

    Args:
        labels: integer label volume of any shape, values from ``scheme``.
        offset: number of levels; positive moves names superior (up the spine).
        scheme: the label scheme.

    Returns:
        A new label array, same shape and dtype.

    Raises:
        CPS4Error: unknown label values, or a class would fall off the scheme.
    """
    _check_label_values(labels, scheme)
    present = set(np.unique(labels).tolist())
    lookup = np.arange(max(info.id for info in scheme.classes) + 1, dtype=np.int64)
    for levels in spine_levels(scheme):
        for position, class_id in enumerate(levels):
            target = position + offset
            if not 0 <= target < len(levels):
                if class_id in present:
                    direction = "up" if offset > 0 else "down"
                    raise CPS4Error(
                        f"cannot shift {abs(offset)} level(s) {direction}: "
                        f"{scheme.by_id(class_id).name} has no level "
                        f"{'above' if offset > 0 else 'below'} it in the {scheme.name} scheme"
                    )
                continue
            lookup[class_id] = levels[target]
    return lookup[labels].astype(labels.dtype, copy=False)


def swap_classes(labels: np.ndarray, first: int, second: int, scheme: LabelScheme) -> np.ndarray:
    """Exchange two class ids everywhere in a label volume.

    Args:
        labels: integer label volume of any shape.
        first: a class id of ``scheme``.
        second: another class id of ``scheme``.
        scheme: the label scheme.

    Returns:
        A new label array, same shape and dtype.

    Raises:
        CPS4Error: a class is not in the scheme, or both are the same class.
    """
    _check_class(first, scheme, "class")
    _check_class(second, scheme, "class")
    if first == second:
        raise CPS4Error(f"swap needs two different classes (got {first} twice)")
    swapped = labels.copy()
    swapped[labels == first] = second
    swapped[labels == second] = first
    return swapped


def relabel_component(
    labels: np.ndarray, seed_voxel: Sequence[int], new_class: int, scheme: LabelScheme
) -> np.ndarray:
    """Give a new class to the connected structure that contains one voxel.

    The structure is the 3D connected component (face, edge and corner neighbours) of the
    seed voxel's class that contains the seed (``scipy.ndimage.label``); other
    components of the same class are left alone, which is how one fixes a duplicated
    level.

    Args:
        labels: integer label volume of shape ``(X, Y, Z)``.
        seed_voxel: voxel index ``(i, j, k)`` inside the structure.
        new_class: class id to give it (0 erases it).
        scheme: the label scheme.

    Returns:
        A new label array, same shape and dtype.

    Raises:
        CPS4Error: the seed is outside the volume or on background, or ``new_class`` is
            not in the scheme.
    """
    _check_class(new_class, scheme, "new class")
    seed = tuple(int(index) for index in seed_voxel)
    if len(seed) != labels.ndim or any(not 0 <= s < n for s, n in zip(seed, labels.shape)):
        raise CPS4Error(f"voxel {seed} is outside the label volume of shape {labels.shape}")
    seed_class = int(labels[seed])
    if seed_class == 0:
        raise CPS4Error(f"voxel {seed} is background; pick a voxel inside a structure")
    components, _ = ndimage.label(labels == seed_class, structure=_FULL_CONNECTIVITY)
    relabelled = labels.copy()
    relabelled[components == components[seed]] = new_class
    return relabelled


@dataclass(frozen=True)
class OrderIssue:
    """One anatomical inconsistency found by :func:`check_order`.

    Attributes:
        kind: ``gap`` (a level missing inside the visible run of its kind), ``duplicate``
            (one class in several separated components), ``misordered`` (a higher level
            found below a lower one) or ``disc_position`` (a disc not between its two
            vertebrae along the superior–inferior axis).
        classes: the class ids involved.
        message: a readable sentence with the class names.
    """

    kind: IssueKind
    classes: tuple[int, ...]
    message: str


@dataclass
class OrderReport:
    """The result of :func:`check_order`.

    Attributes:
        issues: every inconsistency found, gaps first, then duplicates, order and discs.
        heights_mm: superior–inferior world position (mm, larger is superior) of each
            class present, measured at the centroid of its largest component.
    """

    issues: list[OrderIssue] = field(default_factory=list)
    heights_mm: dict[int, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no issue was found."""
        return not self.issues

    def of_kind(self, kind: IssueKind) -> list[OrderIssue]:
        """The issues of one kind."""
        return [issue for issue in self.issues if issue.kind == kind]

    def __str__(self) -> str:
        if self.ok:
            return "vertebra and disc order: no problem found"
        return "\n".join(f"- {issue.message}" for issue in self.issues)


def check_order(
    labels: np.ndarray,
    affine: np.ndarray,
    scheme: LabelScheme,
    min_component_fraction: float = 0.1,
) -> OrderReport:
    """Check the order of vertebrae and discs in a label volume.

    The superior–inferior direction is world z of the NIfTI affine (RAS+), so the voxel
    axes may be in any order and direction. Each class is placed at the centroid of its
    largest connected component. Reported:

    - gaps: a vertebra (or disc) missing between the lowest and the highest one present;
    - duplicates: a class in several separated components, counting only components of at
      least ``min_component_fraction`` times the voxels of the class's largest one (so
      that specks of a few voxels are not reported);
    - misordering: a higher level lying below a lower level of the same kind;
    - disc position: a disc not above its lower vertebra or not below its upper vertebra.

    Args:
        labels: integer label volume of shape ``(X, Y, Z)``.
        affine: ``(4, 4)`` voxel-to-world matrix (mm) of the volume.
        scheme: the label scheme.
        min_component_fraction: size threshold for duplicates, in (0, 1].

    Returns:
        An :class:`OrderReport`.

    Raises:
        CPS4Error: unknown label values or a malformed affine.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise CPS4Error(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if labels.ndim != 3:
        raise CPS4Error(f"labels must be a 3D volume, got shape {labels.shape}")
    _check_label_values(labels, scheme)
    report = OrderReport()
    component_sizes: dict[int, list[int]] = {}
    vertebrae, discs = spine_levels(scheme)
    for class_id in vertebrae + discs:
        mask = labels == class_id
        if not mask.any():
            continue
        components, count = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
        sizes = np.bincount(components.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        centroid = np.array(ndimage.center_of_mass(components == largest))
        report.heights_mm[class_id] = float(superior_height(affine, centroid))
        component_sizes[class_id] = sorted(sizes.tolist(), reverse=True)

    for levels, noun in ((vertebrae, "vertebra"), (discs, "disc")):
        positions = [i for i, class_id in enumerate(levels) if class_id in report.heights_mm]
        if positions:
            for missing in levels[positions[0] : positions[-1] + 1]:
                if missing not in report.heights_mm:
                    report.issues.append(
                        OrderIssue(
                            "gap",
                            (missing,),
                            f"gap: {scheme.by_id(missing).name} is missing between the "
                            f"{noun}s present",
                        )
                    )

    for class_id, sizes in component_sizes.items():
        large = [size for size in sizes if size >= min_component_fraction * sizes[0]]
        if len(large) > 1:
            report.issues.append(
                OrderIssue(
                    "duplicate",
                    (class_id,),
                    f"duplicate: {scheme.by_id(class_id).name} appears in {len(large)} "
                    f"separate pieces ({', '.join(str(s) for s in large)} voxels)",
                )
            )

    for levels in (vertebrae, discs):
        present = [class_id for class_id in levels if class_id in report.heights_mm]
        for lower, upper in zip(present, present[1:]):
            if report.heights_mm[upper] <= report.heights_mm[lower]:
                report.issues.append(
                    OrderIssue(
                        "misordered",
                        (lower, upper),
                        f"order: {scheme.by_id(upper).name} lies below "
                        f"{scheme.by_id(lower).name}",
                    )
                )

    for disc, (above, below) in disc_neighbours(scheme).items():
        if disc not in report.heights_mm:
            continue
        height = report.heights_mm[disc]
        if above in report.heights_mm and height >= report.heights_mm[above]:
            report.issues.append(
                OrderIssue(
                    "disc_position",
                    (disc, above),
                    f"disc: {scheme.by_id(disc).name} is not below "
                    f"{scheme.by_id(above).name}",
                )
            )
        if below in report.heights_mm and height <= report.heights_mm[below]:
            report.issues.append(
                OrderIssue(
                    "disc_position",
                    (disc, below),
                    f"disc: {scheme.by_id(disc).name} is not above "
                    f"{scheme.by_id(below).name}",
                )
            )
    return report
