"""Spine levels in 3D: which structure is which vertebra or disc, and keeping them consistent.

A 2D segmenter labels every sagittal slice on its own, so one vertebral body can come out
L3 in some slices and L4 in others, a level can appear twice, and a whole run of levels can
be named one off. This module holds the anatomy those errors break, once, for every user:

- :func:`spine_levels` and :func:`disc_neighbours`: the scheme's vertebrae and discs from
  the most inferior level up, and each disc's two vertebrae (read from its short name,
  ``"L4/L5"``: L4 above, L5 below);
- :func:`superior_height`: the position along the superior axis of the affine (NIfTI world
  space is RAS+, so world z grows superior), whatever the voxel axes' order;
- :func:`find_structures`: the connected structures of a label volume, each with its
  height and the labels voted for it;
- :func:`make_levels_consistent` — the 3D level step of prediction: every vertebral body
  and every disc gets a single label across slices, the vertebrae are named consecutively
  from the caudal end, and each disc the name of the vertebrae it lies between.

The correction tools' order check (:func:`cps4_engine.active.correction.check_order`) reads
the same anatomy from here.

How the step names the vertebrae. Structures are sorted from inferior to superior and
given consecutive levels, skipping a level where the gap between two neighbours is 1.75
times the usual one (a vertebra not segmented there, :func:`level_steps`). Where the lowest structure is by majority the sacrum or L5 (the
caudal end is in view), the count starts from its own label; otherwise the start is the
one that agrees with the most voxels' labels overall. A structure that narrows sharply along the superior axis, with at
least half a typical body on each side, is bodies the network fused (their labels mixed
across slices, so they cannot be told apart by label): it is cut at those waists, where
the disc spaces are (:func:`split_fused_bodies`); a vertebra structure as long as two bodies
(a thin disc space painted as bone, no waist: measured against its neighbours, since bodies shrink
towards the head) is cut in two (:func:`split_long_bodies`); structures closer than half the usual gap are pieces of
one body and are joined (:func:`merge_close_pieces`). Discs take the level between their neighbouring vertebrae; with no vertebra in the volume, discs are counted like vertebrae.
Specks (below 10 % of the largest structure of their kind) and then structures smaller
than ``min_fraction`` of the median of the rest are fragments, not bodies (specks, a piece of the sacrum painted L5 in two slices) and become
background: a fragment below L5 would otherwise be counted as the lowest level and shift
every name by one (seen on real vb3 predictions, where fragments were 13–17 % of the median
body). Size cannot tell such a fragment from the remnant of an L5 the network left mostly
unpainted, where dropping it names every level one up; their height can: the structure
just below the lowest level is kept as a level where it lies about one usual gap below it,
where a part of the missing level lies, not the 0.76–0.89 gaps of the top of the sacrum
(:func:`caudal_remnant`). Where the sacrum is no class of the training masks (vb3, vb2), a
network may paint the top of the sacrum L5 instead and name every body above it one level
low; that piece lies closer below the next body than any L5 lies below L4, so it becomes
background and the body above it is L5 (:func:`sacrum_piece`). A structure that reaches the superior end of the field of view is a level the field
of view cuts, however small its visible part (phantom predictions kept 270–560 voxels of
such bodies, a quarter of the median or less); it stays unless it is a speck of under
:data:`EDGE_MIN_FRACTION` of the median, and where it lies beside a level rather than above
it (a part of that body painted apart), it joins that level (:func:`join_side_pieces`). Counting starts at the caudal end, so a structure
kept at the cranial end cannot rename any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from cps4_engine.labels import LabelScheme

# Face connectivity: two vertebral bodies that touch only at a corner across a thin disc
# space stay two structures.
_FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)
# Labels of one component whose superior-axis extents overlap by more than this share of
# the shorter extent belong to one body (labels that differ across sagittal slices);
# labels stacked along the axis are vertebrae merged into one component.
_SAME_BODY_OVERLAP = 0.5
# A missing level leaves a gap of about two pitches; an oversized neighbour (a body that
# swallowed part of the next one) moves a centroid by less: 1.57 pitches were seen on a
# real vb3 prediction with every level present.
MISSING_LEVEL_GAP = 1.75
# Two structures closer along the superior axis than this share of the usual gap are pieces
# of one body (its upper part painted the next level), not two levels: bodies cannot overlap.
SAME_BODY_GAP = 0.5
# Structures below this share of the largest of their kind are specks, left out of the
# median body size the fragment rule compares with.
SPECK_FRACTION = 0.1
# Each piece of a cut structure holds at least this share of the median structure's voxels
# (the median itself is inflated where most structures are fused) and of the structure cut.
MIN_PIECE_FRACTION = 0.25
# A structure cut by the superior end of the field of view is kept down to this share of the
# median structure of its kind; below it, it is a speck (1-9 voxels in phantom predictions).
# Phantom predictions had edge bodies of 3.7-4.9 % of the median (their truth 105-139
# voxels), which 0.05 dropped; at 0.02 the dev and training phantoms gained, none lost.
EDGE_MIN_FRACTION = 0.02
MIN_PIECE_OF_STRUCTURE = 0.2
# A structure too small to be a level (not a speck) whose gap to the lowest level lies in this
# range of usual gaps is the caudal level painted only in part, not a fragment: the remnant
# of an L5 a 2-labeled network left mostly unpainted lay 1.08 gaps below the next body (real
# vb3, 15 % of a body), where dropping it named every level one up. A piece of the top of
# the sacrum painted L5 lies 0.76-0.89 gaps below L5 (estimated from the 20 vb3 masks: L5's
# inferior end, the L4/L5 disc's height below it, and a 10 mm piece), so it stays a
# fragment; and a part of a body lies within half a body's height (0.36 gaps on vb3) of its
# centre, so one further down than 1.35 gaps is not a part of the level below.
CAUDAL_REMNANT_GAPS = (0.95, 1.35)
# A lowest structure painted L5 that lies closer than this many usual gaps below the next
# one is the top of the sacrum, not L5: on the 20 vb3, 6 vb2 and 60 phantom masks the gap
# from L5 to L4 is at least 0.90, 0.88 and 0.84 usual gaps (benchmarks/caudal_anatomy.py), while a 2-labeled network's
# sacrum painted L5 lay 0.60-0.78 gaps below the true L5 (vb3 training volumes). Between
# 0.7 and 0.8 the dev volumes held one of each (an L5 with the sacrum painted on at 0.76,
# the sacrum at 0.78), so 0.7 would trade one for the other.
SACRUM_PIECE_GAP = 0.8
# A lowest structure painted L5 holding less than this share of the next structure's voxels,
# under a next structure painted L5 as well, is the top of the sacrum as far down as an L5
# remnant could begin (CAUDAL_REMNANT_GAPS[0]): such pieces held 28-58 % of the body above
# at 0.79-0.89 usual gaps (real vb3 dev volumes, with and without test-time shifts), while
# an L5 painted in part below an L4 painted L5 lay 1.00 gaps below it; whole neighbouring
# lumbar bodies hold 74-130 % of each other's voxels.
SACRUM_PIECE_SIZE = 2 / 3
LOWEST_LUMBAR_SHORT_NAME = "L5"
# A vertebra structure whose extent along the superior axis (5th-95th percentile of its
# voxels' heights) reaches this many times its neighbouring bodies' is two bodies fused with
# no waist (thin thoracic discs the network paints as bone, seen on the phantoms). Two bodies
# and a disc are about twice a neighbour; one body with its disc painted on measured 1.55
# (a dev phantom) and must stay whole, hence midway. The neighbours, not the median of the
# whole spine: bodies shrink towards the head, so a fused thoracic pair reached only 1.38
# times the median of a thoracolumbar view and a single lumbar body 1.87.
LONG_BODY_EXTENT = 1.75
# Each half of a long structure must hold this share of the median body's voxels: a body
# with a thin tail (sacrum painted L5 in a few slices) is not two bodies.
LONG_BODY_MIN_PIECE = 0.4
# Height histogram bin (mm) and smoothing (mm) used to find the waist between fused bodies.
_WAIST_BIN_MM = 1.0
_WAIST_SMOOTHING_MM = 2.0
# A waist is a cut only where the structure narrows to this share of the bodies on both
# sides (a disc space between fused bodies, not the ragged tail of one body).
_WAIST_DEPTH = 0.5
SACRUM_SHORT_NAME = "S"
CAUDAL_ANCHOR_SHORT_NAMES = (SACRUM_SHORT_NAME, "L5")
CAUDAL_DISC_SHORT_NAMES = ("L5/S",)


def spine_levels(scheme: LabelScheme) -> tuple[list[int], list[int]]:
    """The scheme's vertebra ids and disc ids, each ordered from inferior to superior.

    Within each kind the scheme's ids increase from the most inferior level to the most
    superior (the MRSpineSeg convention: 1 S, 2 L5, …, 10 T9; 11 L5/S, …, 19 T9/T10).

    Returns:
        ``(vertebrae, discs)``: two lists of class ids.
    """
    vertebrae = sorted(info.id for info in scheme.classes if info.kind == "vertebra")
    discs = sorted(info.id for info in scheme.classes if info.kind == "disc")
    return vertebrae, discs


def disc_neighbours(scheme: LabelScheme) -> dict[int, tuple[int | None, int | None]]:
    """Each disc's vertebra above and below it, None where the scheme lacks that vertebra.

    Returns:
        disc id → ``(above, below)`` vertebra ids, from the disc's short name ("L4/L5").
    """
    by_short = {info.short: info.id for info in scheme.classes if info.kind == "vertebra"}
    neighbours = {}
    for info in scheme.classes:
        if info.kind == "disc":
            above, _, below = info.short.partition("/")
            neighbours[info.id] = (by_short.get(above), by_short.get(below))
    return neighbours


def superior_height(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """World z in mm (larger is superior) of voxel positions.

    Args:
        affine: ``(4, 4)`` voxel-to-world matrix (RAS+ mm).
        voxels: ``(..., 3)`` voxel coordinates (fractional allowed).

    Returns:
        ``(...)`` heights in mm.
    """
    affine = np.asarray(affine, dtype=np.float64)
    return np.asarray(voxels, dtype=np.float64) @ affine[2, :3] + affine[2, 3]


@dataclass
class Structure:
    """One connected vertebra or disc of a label volume.

    Attributes:
        kind: ``vertebra`` or ``disc``.
        index: flat voxel indices (C order) of the structure.
        height_mm: superior-axis position of its centroid in mm.
        votes: class id → voxels carrying that label.
        label: the label the level step gives it (the majority vote until then).
    """

    kind: str
    index: np.ndarray
    height_mm: float
    votes: dict[int, int]
    label: int = 0

    @property
    def majority(self) -> int:
        """The label most of its voxels carry (the lowest id on a tie)."""
        return max(sorted(self.votes), key=lambda class_id: self.votes[class_id])

    @property
    def size(self) -> int:
        """Voxels in the structure."""
        return int(self.index.size)


def _split_component(
    labels_flat: np.ndarray, index: np.ndarray, heights: np.ndarray, kind: str
) -> list[Structure]:
    """Split one component into bodies: labels stacked along the superior axis part ways."""
    values = labels_flat[index]
    present, counts = np.unique(values, return_counts=True)
    groups: list[dict] = []
    for class_id in present[np.argsort(-counts, kind="stable")]:
        own = values == class_id
        low, high = np.percentile(heights[own], [10, 90])
        for group in groups:
            overlap = min(high, group["high"]) - max(low, group["low"])
            shorter = max(min(high - low, group["high"] - group["low"]), 1e-6)
            if overlap / shorter > _SAME_BODY_OVERLAP:
                group["members"].append(class_id)
                break
        else:
            groups.append({"low": low, "high": high, "members": [class_id]})
    structures = []
    for group in groups:
        inside = np.isin(values, group["members"])
        member_values, member_counts = np.unique(values[inside], return_counts=True)
        structure = Structure(
            kind=kind, index=index[inside], height_mm=float(heights[inside].mean()),
            votes={int(v): int(c) for v, c in zip(member_values, member_counts)},
        )
        structure.label = structure.majority
        structures.append(structure)
    return structures


def find_structures(
    labels: np.ndarray, affine: np.ndarray, scheme: LabelScheme, kind: str
) -> list[Structure]:
    """The connected structures of one kind, sorted from inferior to superior.

    Components are face-connected voxels of any label of the kind; a component whose
    labels lie stacked along the superior axis (two vertebrae touching) is split by label.

    Args:
        labels: integer label volume ``(X, Y, Z)``.
        affine: its ``(4, 4)`` voxel-to-world matrix.
        scheme: the label scheme.
        kind: ``vertebra`` or ``disc``.
    """
    vertebrae, discs = spine_levels(scheme)
    ids = vertebrae if kind == "vertebra" else discs
    mask = np.isin(labels, ids)
    if not mask.any():
        return []
    components, count = ndimage.label(mask, structure=_FACE_CONNECTIVITY)
    flat_components = components.ravel()
    labels_flat = labels.ravel()
    order = np.argsort(flat_components, kind="stable")
    bounds = np.searchsorted(flat_components[order], np.arange(1, count + 2))
    structures: list[Structure] = []
    for component in range(count):
        index = order[bounds[component] : bounds[component + 1]]
        voxels = np.stack(np.unravel_index(index, labels.shape), axis=-1)
        structures += _split_component(labels_flat, index, superior_height(affine, voxels), kind)
    return sorted(structures, key=lambda structure: structure.height_mm)


def reaches_superior_end(structure: Structure, shape: tuple[int, ...], affine: np.ndarray) -> bool:
    """Whether ``structure`` has voxels in the volume's most superior plane (the voxel axis
    closest to the affine's superior direction, at its superior end): the field of view
    cuts it there."""
    column = np.asarray(affine, dtype=np.float64)[2, :3]
    axis = int(np.argmax(np.abs(column)))
    end = shape[axis] - 1 if column[axis] > 0 else 0
    return bool((np.unravel_index(structure.index, shape)[axis] == end).any())


def _heights(structure: Structure, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Superior-axis height in mm of every voxel of ``structure``."""
    return superior_height(affine, np.stack(np.unravel_index(structure.index, shape), axis=-1))


def _bin_mm(affine: np.ndarray) -> float:
    """Height bin of a profile: 1 mm, or a voxel's height where voxels are taller."""
    return max(_WAIST_BIN_MM, float(np.abs(np.asarray(affine, dtype=np.float64)[2, :3]).max()))


def _height_profile(heights: np.ndarray, bin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """``(bin centres, smoothed voxel counts)`` of a structure along the superior axis."""
    edges = np.arange(heights.min(), heights.max() + 2 * bin_mm, bin_mm)
    counts, _ = np.histogram(heights, bins=edges)
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), max(_WAIST_SMOOTHING_MM / bin_mm, 1.0))
    return (edges[:-1] + edges[1:]) / 2, smooth


def _waists(heights: np.ndarray, min_piece: float, bin_mm: float = _WAIST_BIN_MM) -> list[float]:
    """The heights where a structure is several bodies fused: its deep waists.

    The voxels' heights are histogrammed in ``bin_mm`` bins (1 mm, or a voxel's height
    where voxels are taller, so no bin falls between two voxel rows) and smoothed. A local
    minimum that falls to :data:`_WAIST_DEPTH` of the widest parts on both sides (a disc
    space between two bodies) is a cut, deepest first, as long as every piece keeps at
    least ``min_piece`` voxels (a body on each side, not the ragged tail of one body).
    """
    centres, smooth = _height_profile(heights, bin_mm)
    minima = [
        i for i in range(1, len(smooth) - 1)
        if smooth[i] <= smooth[i - 1] and smooth[i] <= smooth[i + 1]
        and smooth[i] <= _WAIST_DEPTH * min(smooth[:i].max(), smooth[i + 1 :].max())
    ]
    cuts: list[float] = []
    for i in sorted(minima, key=lambda i: smooth[i]):
        trial = np.sort(np.asarray([*cuts, centres[i]]))
        if np.bincount(np.searchsorted(trial, heights), minlength=trial.size + 1).min() >= min_piece:
            cuts.append(float(centres[i]))
    return sorted(cuts)


def split_fused_bodies(
    structures: Sequence[Structure], labels_flat: np.ndarray, shape: tuple[int, ...], affine: np.ndarray
) -> list[Structure]:
    """Cut structures that are several bodies fused into one, at their deep waists.

    Along the superior axis a vertebral body's cross-section stays wide from end plate to
    end plate; two bodies fused through their disc space narrow sharply between them. A
    structure is cut at every waist of its voxel count along the superior axis that falls
    to half of the widest parts on both sides, provided each piece keeps at least
    :data:`MIN_PIECE_FRACTION` of the median structure's voxels and
    :data:`MIN_PIECE_OF_STRUCTURE` of the structure's own (:func:`_waists`); each
    piece gets the labels its voxels vote. With fewer than three structures there is no
    typical size and nothing is cut.

    Args:
        structures: structures of one kind (:func:`find_structures`).
        labels_flat: the label volume, flattened in C order.
        shape: the label volume's shape.
        affine: its voxel-to-world matrix.

    Returns:
        The structures, fused ones replaced by their pieces, sorted inferior to superior.
    """
    if len(structures) < 3:
        return list(structures)
    bin_mm = _bin_mm(affine)
    typical = float(np.median([structure.size for structure in structures]))
    result: list[Structure] = []
    for structure in structures:
        own = _heights(structure, shape, affine)
        min_piece = max(MIN_PIECE_FRACTION * typical, MIN_PIECE_OF_STRUCTURE * structure.size)
        cuts = _waists(own, min_piece, bin_mm) if structure.size >= 2 * min_piece else []
        if not cuts:
            result.append(structure)
            continue
        result += _cut(structure, own, cuts, labels_flat)
    return sorted(result, key=lambda structure: structure.height_mm)


def _cut(structure: Structure, heights: np.ndarray, cuts: Sequence[float], labels_flat: np.ndarray) -> list[Structure]:
    """The pieces of ``structure`` between the heights ``cuts`` (mm), each with the labels
    its voxels vote; ``heights`` are its voxels' heights."""
    piece_of = np.searchsorted(np.asarray(cuts), heights)
    pieces = []
    for piece in range(len(cuts) + 1):
        inside = piece_of == piece
        values, counts = np.unique(labels_flat[structure.index[inside]], return_counts=True)
        part = Structure(
            kind=structure.kind, index=structure.index[inside], height_mm=float(heights[inside].mean()),
            votes={int(v): int(c) for v, c in zip(values, counts)},
        )
        part.label = part.majority
        pieces.append(part)
    return pieces


def _extent(heights: np.ndarray) -> float:
    """Extent in mm along the superior axis, robust to a few stray voxels."""
    low, high = np.percentile(heights, [5, 95])
    return float(high - low)


def split_long_bodies(
    structures: Sequence[Structure], labels_flat: np.ndarray, shape: tuple[int, ...], affine: np.ndarray,
    sacrum_id: int | None,
) -> list[Structure]:
    """Cut in two the vertebra structures that are as long as two bodies.

    Where the network paints a thin disc space as bone with one label, two bodies form one
    structure with no waist for :func:`split_fused_bodies` to find, and every level above
    it is named one low. A structure (not the sacrum) whose extent along the superior axis
    reaches :data:`LONG_BODY_EXTENT` times the median extent of its reference bodies is cut
    once, at the least populated height of its middle third (the middle on a tie), provided
    each half keeps :data:`LONG_BODY_MIN_PIECE` of the median structure's voxels. The
    reference bodies are its nearest neighbours below and above (the sacrum left out). A
    body wrongly cut in two has halves closer than half a pitch, which
    :func:`merge_close_pieces` joins again. With fewer than three structures besides the
    sacrum nothing is cut.

    Args:
        structures: vertebra structures, e.g. after :func:`split_fused_bodies`.
        labels_flat: the label volume, flattened in C order.
        shape: the label volume's shape.
        affine: its voxel-to-world matrix.
        sacrum_id: the scheme's sacrum label (longer than a body by nature), or None.

    Returns:
        The structures, long ones replaced by their halves, sorted inferior to superior.
    """
    heights = {id(structure): _heights(structure, shape, affine) for structure in structures}
    bodies = sorted((s for s in structures if s.majority != sacrum_id), key=lambda s: s.height_mm)
    if len(bodies) < 3:
        return sorted(structures, key=lambda structure: structure.height_mm)
    extent = {id(body): _extent(heights[id(body)]) for body in bodies}
    min_piece = LONG_BODY_MIN_PIECE * float(np.median([body.size for body in bodies]))
    bin_mm = _bin_mm(affine)
    result: list[Structure] = []
    for structure in structures:
        own = heights[id(structure)]
        if structure.majority == sacrum_id or extent[id(structure)] < LONG_BODY_EXTENT * _reference_extent(
            structure, bodies, extent
        ):
            result.append(structure)
            continue
        low, high = np.percentile(own, [5, 95])
        centres, smooth = _height_profile(own, bin_mm)
        middle = np.abs(centres - (low + high) / 2) <= (high - low) / 6
        centres, smooth = centres[middle], smooth[middle]
        cut = float(centres[np.lexsort((np.abs(centres - (low + high) / 2), smooth))[0]])
        if min(int((own < cut).sum()), int((own >= cut).sum())) < min_piece:
            result.append(structure)
            continue
        result += _cut(structure, own, [cut], labels_flat)
    return sorted(result, key=lambda structure: structure.height_mm)


def _reference_extent(structure: Structure, bodies: Sequence[Structure], extent: dict[int, float]) -> float:
    """Median extent of ``structure``'s nearest bodies below and above it (``bodies`` sorted
    inferior to superior, at least three)."""
    others = [body for body in bodies if body is not structure]
    below = [body for body in others if body.height_mm < structure.height_mm][-1:]
    above = [body for body in others if body.height_mm >= structure.height_mm][:1]
    return float(np.median([extent[id(body)] for body in below + above]))


def _joined(body: Structure, piece: Structure) -> Structure:
    """``body`` and ``piece`` as one structure, labelled by the joint majority."""
    votes = dict(body.votes)
    for class_id, count in piece.votes.items():
        votes[class_id] = votes.get(class_id, 0) + count
    joined = Structure(
        kind=body.kind, index=np.concatenate([body.index, piece.index]),
        height_mm=(body.height_mm * body.size + piece.height_mm * piece.size) / (body.size + piece.size),
        votes=votes,
    )
    joined.label = joined.majority
    return joined


def join_side_pieces(
    levels_kept: Sequence[Structure], pieces: Sequence[Structure], shape: tuple[int, ...], affine: np.ndarray
) -> list[Structure]:
    """Join each small structure the field of view cuts to the level beside it, if any.

    A structure kept only because the superior end of the view cuts it is a level of its own
    above the others, or a part of the body beside it that the network painted apart (seen
    on a real vb3 prediction: 2,482 voxels of L1 at its height, 0.8 mm from its centre,
    which the count took for T12). It is that part where its median height lies within the
    5th-95th percentile heights of a level; it then joins that level.

    Args:
        levels_kept: the structures kept as levels by size.
        pieces: the structures kept because the view cuts them.
        shape: the label volume's shape.
        affine: its voxel-to-world matrix.

    Returns:
        The levels, sorted inferior to superior.
    """
    result = list(levels_kept)
    ranges = [np.percentile(_heights(level, shape, affine), [5, 95]) for level in result]
    for piece in pieces:
        middle = float(np.median(_heights(piece, shape, affine)))
        beside = [i for i, (low, high) in enumerate(ranges) if low <= middle <= high]
        if beside:
            result[beside[0]] = _joined(result[beside[0]], piece)
        else:
            result.append(piece)
    return sorted(result, key=lambda structure: structure.height_mm)


def merge_close_pieces(structures: Sequence[Structure]) -> list[Structure]:
    """Join structures that lie too close along the superior axis to be two levels.

    Where two neighbours' centroids are less than :data:`SAME_BODY_GAP` times the median
    gap apart, the smaller is a piece of the larger (a body whose upper part the network
    painted with the next level's label, split off by :func:`find_structures`): it joins
    the neighbour it is closest to, repeatedly, until every gap is plausible. With fewer
    than three structures there is no usual gap and nothing is joined.

    Args:
        structures: structures of one kind, sorted inferior to superior.

    Returns:
        The structures after joining, sorted inferior to superior.
    """
    result = sorted(structures, key=lambda structure: structure.height_mm)
    while len(result) >= 3:
        gaps = np.diff([structure.height_mm for structure in result])
        pitch = float(np.median(gaps))
        close = int(np.argmin(gaps))
        if pitch <= 0 or gaps[close] >= SAME_BODY_GAP * pitch:
            break
        first, second = result[close], result[close + 1]
        piece, body = (first, second) if first.size < second.size else (second, first)
        result[close : close + 2] = [_joined(body, piece)]
    return result


def caudal_remnant(levels_kept: Sequence[Structure], dropped: Sequence[Structure]) -> Structure | None:
    """The dropped structure that is the caudal level painted only in part, if any.

    A network that leaves most of the lowest level unpainted keeps a remnant too small to
    be a level; dropping it makes the next body the caudal end, so the count from there
    names every level one off. The highest dropped structure below the lowest kept level is
    that remnant when its gap to the lowest level, in median gaps of the kept levels, lies
    within :data:`CAUDAL_REMNANT_GAPS`. With fewer than three kept levels there is no usual
    gap and there is no remnant.

    Args:
        levels_kept: the structures kept as levels, sorted inferior to superior.
        dropped: structures dropped as fragments (specks left out).

    Returns:
        The remnant, or None.
    """
    if len(levels_kept) < 3:
        return None
    pitch = float(np.median(np.diff([structure.height_mm for structure in levels_kept])))
    lowest = levels_kept[0].height_mm
    below = sorted((s for s in dropped if s.height_mm < lowest), key=lambda s: s.height_mm)
    if pitch <= 0 or not below:
        return None
    gap = lowest - below[-1].height_mm
    nearest, furthest = CAUDAL_REMNANT_GAPS
    return below[-1] if nearest * pitch <= gap <= furthest * pitch else None


def sacrum_piece(levels_kept: Sequence[Structure], lowest_lumbar: int) -> Structure | None:
    """The lowest structure, when it is the top of the sacrum painted as the lowest lumbar level.

    Where the sacrum is not a class of the training masks (vb3, vb2), a network may paint
    its top as L5 and name every body above it one level low. Vertebral bodies stand about
    a usual gap apart; the top of the sacrum, behind the L5/S disc, lies closer to L5. The
    lowest structure, with majority ``lowest_lumbar``, is that piece when it lies

    - less than :data:`SACRUM_PIECE_GAP` times the usual gap below the next structure, or
    - less than ``CAUDAL_REMNANT_GAPS[0]`` usual gaps below a next structure that is painted
      ``lowest_lumbar`` too, and holds less than :data:`SACRUM_PIECE_SIZE` of its voxels:
      the network itself names the body above L5, and the piece is a part of a body.

    The usual gap is the median of at least three gaps of the kept structures, so neither
    this gap nor a missing level's sets it. With fewer than four structures there is no
    usual gap to compare.

    Args:
        levels_kept: the structures kept as levels, sorted inferior to superior.
        lowest_lumbar: the scheme's L5 id.

    Returns:
        The piece, or None.
    """
    if len(levels_kept) < 4 or levels_kept[0].majority != lowest_lumbar:
        return None
    lowest, above = levels_kept[0], levels_kept[1]
    gaps = np.diff([structure.height_mm for structure in levels_kept])
    pitch, gap = float(np.median(gaps)), float(gaps[0])
    if pitch <= 0:
        return None
    if gap < SACRUM_PIECE_GAP * pitch:
        return lowest
    below_named_l5 = above.majority == lowest_lumbar and lowest.size < SACRUM_PIECE_SIZE * above.size
    return lowest if below_named_l5 and gap < CAUDAL_REMNANT_GAPS[0] * pitch else None


@dataclass
class LevelReport:
    """What :func:`make_levels_consistent` did.

    Attributes:
        structures: ``(kind, height_mm, voxels, before, after)`` per structure kept, from
            inferior to superior; ``before`` is its majority label.
        removed_voxels: voxels of fragments set to background.
        changed_voxels: voxels whose label changed (specks included).
        anchor: how the vertebrae were counted: ``caudal`` (from the sacrum or L5 in
            view), ``sacrum`` (L5 is the body above a piece of the sacrum painted L5),
            ``vote`` (the count most voxels agree with) or ``none``.
    """

    structures: list[tuple[str, float, int, int, int]] = field(default_factory=list)
    removed_voxels: int = 0
    changed_voxels: int = 0
    anchor: str = "none"

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "anchor": self.anchor,
            "removed_voxels": self.removed_voxels,
            "changed_voxels": self.changed_voxels,
            "structures": [
                {"kind": kind, "height_mm": round(height, 2), "voxels": voxels, "before": before, "after": after}
                for kind, height, voxels, before, after in self.structures
            ],
        }


def level_steps(heights_mm: Sequence[float]) -> list[int]:
    """Levels each structure lies above the lowest one, from their heights (inferior first).

    Neighbouring structures are one level apart, unless the gap between them is at least
    :data:`MISSING_LEVEL_GAP` times the median gap: then a level is missing there (not
    segmented), and the gap counts ``round(gap / median)`` levels.
    """
    gaps = np.diff(np.asarray(heights_mm, dtype=np.float64))
    if gaps.size == 0:
        return [0]
    pitch = float(np.median(gaps))
    steps = [1 if pitch <= 0 or gap < MISSING_LEVEL_GAP * pitch else int(round(gap / pitch)) for gap in gaps]
    return [0, *np.cumsum(steps).tolist()]


def _count_levels(
    structures: Sequence[Structure], ids: Sequence[int], anchors: Sequence[int], first: int | None = None
) -> str:
    """Give ``structures`` (inferior first) levels in order; returns the anchor used.

    ``first``: the position in ``ids`` of the lowest structure where anatomy fixes it (the
    body above the sacrum is L5); otherwise the caudal anchor or the voxels' votes decide."""
    if not structures:
        return "none"
    steps = level_steps([s.height_mm for s in structures])
    starts = list(range(0, max(1, len(ids) - steps[-1])))
    lowest = structures[0].majority
    if first is not None and first in starts:
        start, anchor = first, "sacrum"
    elif lowest in anchors and ids.index(lowest) in starts:
        start, anchor = ids.index(lowest), "caudal"
    else:
        def agreement(first: int) -> int:
            return sum(
                s.votes.get(ids[first + step], 0) for s, step in zip(structures, steps) if first + step < len(ids)
            )

        start, anchor = max(starts, key=lambda first: (agreement(first), -first)), "vote"
    for structure, step in zip(structures, steps):
        position = start + step
        structure.label = ids[position] if position < len(ids) else structure.majority
    return anchor


def _name_discs(discs: Sequence[Structure], vertebrae: Sequence[Structure], scheme: LabelScheme) -> None:
    """Each disc the level between its two neighbouring vertebrae, by height."""
    between = {pair: disc for disc, pair in disc_neighbours(scheme).items()}
    below_of = {below: disc for disc, (_, below) in disc_neighbours(scheme).items() if below is not None}
    above_of = {above: disc for disc, (above, _) in disc_neighbours(scheme).items() if above is not None}
    for disc in discs:
        lower = [v for v in vertebrae if v.height_mm < disc.height_mm]
        upper = [v for v in vertebrae if v.height_mm > disc.height_mm]
        name = None
        if lower and upper:
            name = between.get((upper[0].label, lower[-1].label))
        if name is None and lower:
            name = below_of.get(lower[-1].label)
        if name is None and upper:
            name = above_of.get(upper[0].label)
        disc.label = name if name is not None else disc.majority


def make_levels_consistent(
    labels: np.ndarray, affine: np.ndarray, scheme: LabelScheme, min_fraction: float = 0.25
) -> tuple[np.ndarray, LevelReport]:
    """The 3D level step: one label per structure, levels in anatomical order.

    Args:
        labels: integer label volume ``(X, Y, Z)`` (a prediction in the image's grid).
        affine: its ``(4, 4)`` voxel-to-world matrix; the superior axis comes from it.
        scheme: the label scheme (vertebra and disc ids, disc names).
        min_fraction: structures smaller than this share of the median structure of their
            kind (specks below 10 % of the largest left out of the median) become background,
            except those the superior end of the field of view cuts
            (:data:`EDGE_MIN_FRACTION`).

    Returns:
        ``(labels, report)``: a new volume of the input's shape and dtype, and a
        :class:`LevelReport`.
    """
    result = np.array(labels, order="C", copy=True)
    flat = result.reshape(-1)
    report = LevelReport()
    kept: dict[str, list[Structure]] = {}
    by_short = {info.short: info.id for info in scheme.classes}
    sacrum = by_short.get(SACRUM_SHORT_NAME)
    lowest_lumbar = by_short.get(LOWEST_LUMBAR_SHORT_NAME)
    above_sacrum = False
    for kind in ("vertebra", "disc"):
        structures = find_structures(labels, affine, scheme, kind)
        largest = max((s.size for s in structures), default=0)
        specks = [s for s in structures if s.size < SPECK_FRACTION * largest]
        bodies = [s for s in structures if s.size >= SPECK_FRACTION * largest]
        bodies = split_fused_bodies(bodies, labels.reshape(-1), labels.shape, affine)
        if kind == "vertebra":
            bodies = split_long_bodies(bodies, labels.reshape(-1), labels.shape, affine, sacrum)
        bodies = merge_close_pieces(bodies)
        typical = float(np.median([s.size for s in bodies])) if bodies else 0.0
        speck_ids = {id(s) for s in specks}

        def kept_because(structure: Structure) -> str | None:
            """``size``, ``edge`` (small, but the superior end of the view cuts it) or None."""
            if structure.size >= min_fraction * typical and id(structure) not in speck_ids:
                return "size"
            if structure.size >= EDGE_MIN_FRACTION * typical and reaches_superior_end(structure, labels.shape, affine):
                return "edge"
            return None

        reasons = [(structure, kept_because(structure)) for structure in bodies + specks]
        dropped = [s for s, reason in reasons if reason is None]
        by_size = [s for s, reason in reasons if reason == "size"]
        at_edge = [s for s, reason in reasons if reason == "edge"]
        kept[kind] = join_side_pieces(by_size, at_edge, labels.shape, affine)
        remnant = caudal_remnant(kept[kind], [s for s in dropped if id(s) not in speck_ids])
        if remnant is not None:
            kept[kind].insert(0, remnant)
            dropped = [s for s in dropped if s is not remnant]
        if kind == "vertebra" and lowest_lumbar is not None:
            above_sacrum = sacrum_piece(kept[kind], lowest_lumbar) is not None
            if above_sacrum:
                dropped.append(kept[kind].pop(0))
        for structure in dropped:
            flat[structure.index] = 0
            report.removed_voxels += structure.size
    vertebra_ids, disc_ids = spine_levels(scheme)
    vertebra_anchors = [by_short[name] for name in CAUDAL_ANCHOR_SHORT_NAMES if name in by_short]
    disc_anchors = [by_short[name] for name in CAUDAL_DISC_SHORT_NAMES if name in by_short]
    first = vertebra_ids.index(lowest_lumbar) if above_sacrum else None
    report.anchor = _count_levels(kept["vertebra"], vertebra_ids, vertebra_anchors, first)
    if kept["vertebra"]:
        _name_discs(kept["disc"], kept["vertebra"], scheme)
    else:
        report.anchor = _count_levels(kept["disc"], disc_ids, disc_anchors)
    for structure in sorted(kept["vertebra"] + kept["disc"], key=lambda s: s.height_mm):
        flat[structure.index] = structure.label
        report.structures.append(
            (structure.kind, structure.height_mm, structure.size, structure.majority, structure.label)
        )
    report.changed_voxels = int(np.count_nonzero(result != labels))
    return result, report
