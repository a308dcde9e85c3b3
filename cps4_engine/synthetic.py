"""Synthetic sagittal T2-like lumbar spine phantoms in the MRSpineSeg scheme.

Each case is drawn from its seed alone. The anatomy is laid out along a curved spine
centre line (sacral slope, lumbar lordosis, thoracic kyphosis) parameterised by arc
length ``s`` in mm (``s = 0`` at the top of the sacrum, increasing upwards): the sacrum,
then alternately a disc and a vertebral body, L5/S, L5, L4/L5, ... up to T9, and unlabeled
levels above T9 (drawn, labelled background, as in real scans). Every in-plane pixel gets
its arc length and its signed distance ``d`` from the centre line (posterior positive);
bodies and discs are superellipses in ``(s, d)`` whose depth shrinks with lateral distance
from the midline, so lateral slices show less spine, as real ones do. The spinal canal
(bright CSF, with the cord above the conus), posterior elements, pre-vertebral vessels,
psoas and paraspinal muscles, subcutaneous fat and air are drawn in the image but are
background in the mask.

Per case the generator varies the field of view (the top visible level lies between
about T9 and L1; the bottom sometimes cuts the sacrum), curvature, body and disc sizes,
disc degeneration, tissue intensities, slice count (12-18) and thickness (3.5-5 mm),
in-plane spacing (1.2-1.6 mm, at most 160 x 128 pixels), a multiplicative bias field and
Rician noise; slices average three lateral samples (partial volume). The voxel grid is
stored in one of several scanner-like axis orders with a small oblique tilt, so the
sagittal axis must be found from the affine.

Images are int16 scanner-like values; masks uint8 class ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from cps4_engine.errors import CPS4Error
from cps4_engine.io import write_text_atomic, write_volume
from cps4_engine.layouts import mrspineseg_case_paths

GENERATOR_VERSION = 1
MANIFEST_NAME = "synthetic.json"
# Vertebra ids from the bottom up (S, L5 ... T9) and the disc id above each of them.
_VERTEBRA_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
_DISC_ABOVE = {1: 11, 2: 12, 3: 13, 4: 14, 5: 15, 6: 16, 7: 17, 8: 18, 9: 19}
_UNLABELED_LEVELS_ABOVE = 4
_CENTRE_LINE_STEP_MM = 0.5
_LATERAL_SAMPLES = (-1 / 3, 0.0, 1 / 3)


@dataclass
class _Unit:
    """One spine unit along the centre line (a vertebral body or a disc)."""

    label: int
    kind: str
    start: float
    end: float
    depth: float
    width: float
    brightness: float

    @property
    def middle(self) -> float:
        return 0.5 * (self.start + self.end)

    @property
    def half_height(self) -> float:
        return 0.5 * (self.end - self.start)


@dataclass
class _Scene:
    """Everything needed to draw one in-plane slice at any lateral distance.

    Per-pixel arrays are flat ``(rows * cols,)``; distances in mm.
    """

    arc: np.ndarray
    depth_offset: np.ndarray
    unit: dict[str, np.ndarray]
    is_disc: np.ndarray
    in_column: np.ndarray
    body_depth: np.ndarray
    canal_front: np.ndarray
    canal_middle: np.ndarray
    canal_back: np.ndarray
    sacrum_length: float
    canal_depth: float
    spinous_length: float
    muscle_back: float
    fat_back: float
    conus: float
    tissue: dict[str, float]
    texture: np.ndarray
    bowel: np.ndarray


def _spine_units(rng: np.random.Generator, scale: float) -> tuple[list[_Unit], float]:
    """Lay out discs and bodies upwards from the sacrum top (s = 0); also the sacrum length."""
    units: list[_Unit] = []
    position = 0.0
    levels = list(_VERTEBRA_IDS[1:]) + [0] * _UNLABELED_LEVELS_ABOVE
    below = 1
    # bodies get shallower and narrower gradually from L5 upwards, as real ones do
    base_depth = scale * rng.uniform(31.0, 37.0)
    base_width = scale * rng.uniform(42.0, 50.0)
    for rank, vertebra in enumerate(levels):
        lumbar = rank < 5
        disc_height = scale * (rng.uniform(7.0, 11.0) if lumbar else rng.uniform(4.0, 6.0))
        degenerate = lumbar and rng.random() < 0.25
        if degenerate:
            disc_height *= 0.65
        depth = base_depth * (1.0 - 0.025 * rank) * rng.uniform(0.97, 1.03)
        width = base_width * (1.0 - 0.04 * rank) * rng.uniform(0.97, 1.03)
        disc_label = _DISC_ABOVE.get(below, 0)
        units.append(
            _Unit(disc_label, "disc", position, position + disc_height, depth, width * 0.95,
                  rng.uniform(0.25, 0.45) if degenerate else rng.uniform(0.6, 0.95))
        )
        position += disc_height
        body_height = scale * (rng.uniform(21.0, 26.0) if lumbar else rng.uniform(17.0, 21.0))
        units.append(
            _Unit(vertebra, "vertebra", position, position + body_height, depth, width,
                  rng.uniform(0.42, 0.62))
        )
        position += body_height
        below = vertebra
    sacrum_length = scale * rng.uniform(45.0, 58.0)
    return units, sacrum_length


def _centre_line(
    rng: np.random.Generator, s_min: float, s_max: float, s_thoracolumbar: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arc lengths, unit tangents (pointing up) and normals (pointing back) in (row, col) mm.

    The tangent's angle from vertical (positive: leaning anterior) starts at the sacral
    slope at s = 0, decreases through the lumbar lordosis and increases again above the
    thoracolumbar junction (kyphosis); below s = 0 the sacrum curves the other way.
    """
    s = np.arange(s_min, s_max + _CENTRE_LINE_STEP_MM, _CENTRE_LINE_STEP_MM)
    slope = np.deg2rad(rng.uniform(25.0, 45.0))
    lordosis = np.deg2rad(rng.uniform(0.25, 0.4))
    kyphosis = np.deg2rad(rng.uniform(0.15, 0.35))
    sacral_curve = np.deg2rad(rng.uniform(0.3, 0.7))
    angle = np.where(
        s < 0,
        slope - sacral_curve * s,
        slope - lordosis * np.minimum(s, s_thoracolumbar) + kyphosis * np.maximum(s - s_thoracolumbar, 0),
    )
    tangent = np.stack([-np.cos(angle), -np.sin(angle)], axis=1)
    normal = np.stack([-np.sin(angle), np.cos(angle)], axis=1)
    return s, tangent, normal


def _superellipse(a: np.ndarray, b: np.ndarray, power: float) -> np.ndarray:
    """``|a|^p + |b|^p``: <= 1 inside a rounded rectangle with half-sides 1."""
    return np.abs(a) ** power + np.abs(b) ** power


def _affine_and_layout(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, tuple[int, int, int], tuple[bool, bool, bool]]:
    """A scanner-like affine for a canonical (slice R->L, row S->I, col A->P) array.

    Returns the affine of the stored array, the permutation from canonical to stored
    axes and which stored axes are reversed.
    """
    thickness, row_mm, col_mm = spacing
    canonical = np.zeros((4, 4))
    canonical[0, 0] = -thickness
    canonical[2, 1] = -row_mm
    canonical[1, 2] = -col_mm
    canonical[3, 3] = 1.0
    canonical[:3, 3] = (
        0.5 * thickness * (shape[0] - 1) + rng.uniform(-20, 20),
        0.5 * col_mm * (shape[2] - 1) + rng.uniform(-30, 30),
        0.5 * row_mm * (shape[1] - 1) + rng.uniform(-40, 40),
    )
    layouts = ((2, 1, 0), (2, 0, 1), (1, 2, 0), (0, 1, 2))
    permutation = layouts[int(rng.integers(len(layouts)))]
    flips = tuple(bool(f) for f in rng.integers(0, 2, size=3))
    affine = canonical[:, list(permutation) + [3]]
    stored_shape = [shape[axis] for axis in permutation]
    for axis, flip in enumerate(flips):
        if flip:
            affine[:3, 3] += affine[:3, axis] * (stored_shape[axis] - 1)
            affine[:3, axis] *= -1
    tilt = np.deg2rad(rng.uniform(-8.0, 8.0))
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]]
    affine = (rotation @ affine).astype(np.float32).astype(np.float64)
    return affine, permutation, flips  # type: ignore[return-value]


def generate_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one phantom.

    Args:
        seed: any non-negative integer; the same seed always gives the same case.

    Returns:
        ``image`` int16 ``(X, Y, Z)``, ``label`` uint8 ``(X, Y, Z)`` (MRSpineSeg ids,
        0 background) and the 4x4 float64 ``affine`` (RAS mm; exactly representable in
        the NIfTI header). The sagittal axis is whichever voxel axis the affine says.
    """
    rng = np.random.default_rng(np.random.SeedSequence([GENERATOR_VERSION, int(seed)]))
    rows, cols = int(rng.integers(136, 161)), int(rng.integers(104, 129))
    pixel_mm = float(rng.uniform(1.2, 1.6))
    num_slices = int(rng.integers(12, 19))
    thickness = float(rng.uniform(3.5, 5.0))
    scale = float(rng.uniform(0.8, 1.0))

    units, sacrum_length = _spine_units(rng, scale)
    s_top = units[-1].end + 20.0
    s_thoracolumbar = next(u.middle for u in units if u.label == 16)
    s, tangent, normal = _centre_line(rng, -sacrum_length - 40.0, s_top, s_thoracolumbar)
    # the centre line starts at s = 0 and is integrated both ways from there
    origin = int(np.argmin(np.abs(s)))
    steps = tangent * _CENTRE_LINE_STEP_MM
    points = np.zeros_like(tangent)
    points[origin + 1 :] = np.cumsum(steps[origin:-1], axis=0)
    points[:origin] = -np.cumsum(steps[origin - 1 :: -1], axis=0)[::-1]
    fov_rows_mm, fov_cols_mm = rows * pixel_mm, cols * pixel_mm
    sacrum_top_row = fov_rows_mm - rng.uniform(15.0, 60.0)
    sacrum_top_col = fov_cols_mm * rng.uniform(0.5, 0.6) + 5.0
    points += np.array([sacrum_top_row, sacrum_top_col]) - points[origin]

    grid = np.stack(
        np.meshgrid((np.arange(rows) + 0.5) * pixel_mm, (np.arange(cols) + 0.5) * pixel_mm, indexing="ij"),
        axis=-1,
    ).reshape(-1, 2)
    _, nearest = cKDTree(points).query(grid)
    offset = grid - points[nearest]
    arc = s[nearest] + np.einsum("ij,ij->i", offset, tangent[nearest])
    depth_offset = np.einsum("ij,ij->i", offset, normal[nearest])

    boundaries = np.array([u.start for u in units] + [units[-1].end])
    unit_index = np.clip(np.searchsorted(boundaries, arc, side="right") - 1, 0, len(units) - 1)
    in_column = (arc >= 0) & (arc < units[-1].end)
    table = {
        name: np.array([getattr(u, name) for u in units])
        for name in ("label", "middle", "half_height", "depth", "width", "brightness")
    }
    is_disc = np.array([u.kind == "disc" for u in units])[unit_index]
    unit = {name: values[unit_index] for name, values in table.items()}
    smooth_depth = np.interp(arc, table["middle"], table["depth"])
    sacral_taper = 0.45 + 0.55 * np.clip(1 + arc / sacrum_length, 0, 1)
    body_depth = np.where(arc < 0, table["depth"][1] * sacral_taper, smooth_depth)
    canal_front = 0.5 * body_depth + 1.5
    canal_depth = scale * rng.uniform(13.0, 17.0)
    canal_middle = canal_front + 0.5 * canal_depth
    canal_back = canal_front + canal_depth
    spinous_length = scale * rng.uniform(22.0, 30.0)
    muscle_back = canal_back + spinous_length + rng.uniform(5.0, 15.0)
    fat_back = muscle_back + rng.uniform(8.0, 20.0)
    conus = next(u.middle for u in units if u.label == 5) + rng.uniform(-10.0, 25.0)
    lateral_sway = rng.uniform(-3.0, 3.0) * np.sin(arc / rng.uniform(80.0, 160.0) + rng.uniform(0, np.pi))
    midline = rng.uniform(-0.6, 0.6) * thickness

    tissue = {
        "marrow": rng.uniform(0.85, 1.15),
        "csf": rng.uniform(0.85, 1.0),
        "cord": rng.uniform(0.35, 0.5),
        "muscle": rng.uniform(0.15, 0.28),
        "fat": rng.uniform(0.6, 0.85),
        "abdomen": rng.uniform(0.3, 0.5),
        "vessel": rng.uniform(0.03, 0.1),
        "posterior": rng.uniform(0.3, 0.45),
        "annulus": rng.uniform(0.2, 0.32),
    }
    texture = 1.0 + 0.12 * gaussian_filter(rng.standard_normal((rows, cols)), 2.0).reshape(-1) * 4.0
    bowel = gaussian_filter(rng.standard_normal((rows, cols)), 3.0).reshape(-1) * 6.0

    scene = _Scene(
        arc=arc, depth_offset=depth_offset, unit=unit, is_disc=is_disc, in_column=in_column,
        body_depth=body_depth, canal_front=canal_front, canal_middle=canal_middle,
        canal_back=canal_back, sacrum_length=sacrum_length, canal_depth=canal_depth,
        spinous_length=spinous_length, muscle_back=muscle_back, fat_back=fat_back, conus=conus,
        tissue=tissue, texture=texture, bowel=bowel,
    )
    image = np.zeros((num_slices, rows * cols), np.float32)
    label = np.zeros((num_slices, rows * cols), np.uint8)
    for slice_index in range(num_slices):
        centre_x = (slice_index - 0.5 * (num_slices - 1)) * thickness - midline
        samples = []
        for fraction in _LATERAL_SAMPLES:
            intensity, classes = _draw(scene, np.abs(centre_x + fraction * thickness - lateral_sway))
            samples.append(intensity)
            if fraction == 0.0:
                label[slice_index] = classes
        image[slice_index] = np.mean(samples, axis=0)

    image = image.reshape(num_slices, rows, cols)
    label = label.reshape(num_slices, rows, cols)
    image = gaussian_filter(image, sigma=(0.0, 0.6, 0.6))
    image *= _bias_field(rng, image.shape)
    sigma = rng.uniform(0.015, 0.045)
    image = np.sqrt((image + sigma * rng.standard_normal(image.shape)) ** 2
                    + (sigma * rng.standard_normal(image.shape)) ** 2)
    gain = rng.uniform(800.0, 2400.0)
    image = np.clip(np.round(image * gain), 0, np.iinfo(np.int16).max).astype(np.int16)

    affine, permutation, flips = _affine_and_layout(
        rng, (num_slices, rows, cols), (thickness, pixel_mm, pixel_mm)
    )
    return _store(image, permutation, flips), _store(label, permutation, flips), affine


def _store(canonical: np.ndarray, permutation: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    """Reorder a canonical (slice, row, col) array into the stored voxel layout."""
    stored = np.transpose(canonical, permutation)
    for axis, flip in enumerate(flips):
        if flip:
            stored = np.flip(stored, axis=axis)
    return np.ascontiguousarray(stored)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth multiplicative field: exp of a random quadratic over normalised coordinates."""
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    log_field = np.zeros(shape)
    for axis in axes:
        log_field += rng.uniform(-0.2, 0.2) * axis + rng.uniform(-0.15, 0.15) * axis**2
    log_field += rng.uniform(-0.1, 0.1) * axes[1] * axes[2]
    return np.exp(log_field).astype(np.float32)


def _draw(scene: _Scene, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intensity and class id of every in-plane pixel at lateral distance ``x`` (mm).

    Returns:
        float32 intensities and uint8 class ids, both flat ``(rows * cols,)``.
    """
    arc, depth_offset, unit, is_disc = scene.arc, scene.depth_offset, scene.unit, scene.is_disc
    in_column, body_depth, sacrum_length = scene.in_column, scene.body_depth, scene.sacrum_length
    canal_front, canal_middle, canal_back = scene.canal_front, scene.canal_middle, scene.canal_back
    canal_depth, spinous_length, conus = scene.canal_depth, scene.spinous_length, scene.conus
    muscle_back, fat_back, tissue, texture = scene.muscle_back, scene.fat_back, scene.tissue, scene.texture
    bowel = scene.bowel
    lateral = np.sqrt(np.clip(1.0 - (2.0 * x / unit["width"]) ** 2, 0.0, 1.0))
    along = (arc - unit["middle"]) / unit["half_height"]
    across = depth_offset / np.maximum(0.5 * body_depth * lateral, 1e-3)
    body_shape = _superellipse(along, across, 6.0)
    disc_shape = _superellipse(along / 1.05, across, 4.0)
    vertebra = in_column & ~is_disc & (lateral > 0) & (body_shape <= 1.0)
    disc = in_column & is_disc & (lateral > 0) & (disc_shape <= 1.0)

    sacral_width = 0.5 * unit["width"] * 1.8
    sacral_lateral = np.sqrt(np.clip(1.0 - (x / sacral_width) ** 2, 0.0, 1.0))
    sacral_along = (arc + 0.5 * sacrum_length) / (0.5 * sacrum_length)
    sacral_across = depth_offset / np.maximum(0.5 * body_depth * sacral_lateral, 1e-3)
    sacrum = (arc < 0) & (sacral_lateral > 0) & (_superellipse(sacral_along, sacral_across, 4.0) <= 1.0)

    intensity = np.full(arc.shape, tissue["abdomen"], np.float32) * (1.0 + 0.25 * bowel)
    posterior_side = depth_offset > 0
    intensity = np.where(posterior_side, tissue["muscle"], intensity)
    intensity = np.where((depth_offset > muscle_back) & (depth_offset <= fat_back), tissue["fat"], intensity)
    intensity = np.where(depth_offset > fat_back, 0.02, intensity)
    vessel = (depth_offset < -0.5 * body_depth - 3.0) & (depth_offset > -0.5 * body_depth - 25.0) & (x < 12.0)
    intensity = np.where(vessel, tissue["vessel"], intensity)
    psoas = (depth_offset < 0.0) & (depth_offset > -0.5 * body_depth - 20.0) & (x > 20.0) & (arc > 0)
    intensity = np.where(psoas, tissue["muscle"], intensity)

    canal_width = 9.0
    canal = (((depth_offset - canal_middle) / (0.5 * canal_depth)) ** 2 + (x / canal_width) ** 2 <= 1.0) & (
        arc > -0.4 * sacrum_length
    )
    intensity = np.where(canal, tissue["csf"], intensity)
    cord = canal & (arc > conus) & (((depth_offset - canal_middle) / 4.0) ** 2 + (x / 5.0) ** 2 <= 1.0)
    intensity = np.where(cord, tissue["cord"], intensity)

    arch_along = arc - unit["middle"]
    arch_rows = (~is_disc) & in_column & (arch_along > -0.8 * unit["half_height"]) & (arch_along < 0.5 * unit["half_height"])
    spinous = arch_rows & (depth_offset > canal_back) & (depth_offset < canal_back + spinous_length) & (x < 4.0)
    facets = arch_rows & (x > 8.0) & (x < 22.0) & (depth_offset > canal_front + 0.3 * canal_depth) & (
        depth_offset < canal_back + 6.0
    )
    intensity = np.where(spinous | facets, tissue["posterior"] * texture, intensity)

    endplate = np.clip((body_shape - 0.7) / 0.3, 0.0, 1.0)
    marrow = unit["brightness"] * tissue["marrow"] * texture * (1.0 - 0.55 * endplate)
    nucleus = _superellipse(along / 0.75, across / 0.7, 2.0) <= 1.0
    disc_value = np.where(nucleus, unit["brightness"], tissue["annulus"])
    sacral_value = unit["brightness"] * tissue["marrow"] * 0.9 * texture
    intensity = np.where(sacrum, sacral_value, intensity)
    intensity = np.where(disc, disc_value, intensity)
    intensity = np.where(vertebra, marrow, intensity)

    classes = np.zeros(arc.shape, np.uint8)
    classes = np.where(sacrum, 1, classes)
    classes = np.where(disc, unit["label"], classes)
    classes = np.where(vertebra, unit["label"], classes)
    return intensity.astype(np.float32), classes.astype(np.uint8)


def sample_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom for napari's sample data: ``(image, label, affine)`` as :func:`generate_case`."""
    return generate_case(seed)


def case_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th case (0-based) of a dataset generated with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_synthetic_dataset(out: str | Path, cases: int, seed: int) -> list[tuple[Path, Path]]:
    """Write an MRSpineSeg-layout dataset: ``MR/Case{N}.nii.gz``, ``Mask/mask_case{N}.nii.gz``.

    Cases are numbered from 1; case ``N`` is :func:`generate_case` of
    ``case_seed(seed, N - 1)``. A ``synthetic.json`` records how the folder was made.
    Files are byte-identical for the same ``cases`` and ``seed``.

    Args:
        out: output folder; created if missing. A non-empty folder is only written into
            if it holds an earlier synthetic dataset (its ``synthetic.json``).
        cases: number of cases, at least 1.
        seed: dataset seed.

    Returns:
        ``(image path, mask path)`` per case, in case order.

    Raises:
        CPS4Error: bad count or seed, or ``out`` is a file or a non-empty foreign folder.
    """
    out = Path(out)
    if cases < 1:
        raise CPS4Error(f"--cases must be at least 1, got {cases}")
    if seed < 0:
        raise CPS4Error(f"--seed must be non-negative, got {seed}")
    if out.exists() and not out.is_dir():
        raise CPS4Error("exists and is not a folder", path=out)
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise CPS4Error("folder is not empty and holds no synthetic dataset; choose an empty folder", path=out)
    written = []
    for number in range(1, cases + 1):
        image, label, affine = generate_case(case_seed(seed, number - 1))
        image_target, mask_target = mrspineseg_case_paths(out, number)
        image_path = write_volume(image_target, image, affine)
        mask_path = write_volume(mask_target, label, affine)
        written.append((image_path, mask_path))
    manifest = {"generator": "cps4_engine.synthetic", "version": GENERATOR_VERSION, "seed": seed, "cases": cases}
    write_text_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return written
