"""NIfTI volumes with their geometry, atomic saves, and sagittal slicing.

Reading validates everything a user or a broken scanner export can get wrong (missing
file, not NIfTI, truncated or corrupt gzip, header fields that would invent a geometry,
impossible dimensions, wrong number of dimensions, NaN/inf intensities, label values
that are not class ids) and raises a one-line :class:`~cps4_engine.errors.CPS4Error`
naming the file; :func:`header_notes` says what is merely unusual about a header.

Display orientation of sagittal slices (:func:`to_sagittal`): the output array is
``(S, rows, cols)``. ``S`` runs along the voxel axis the affine says is left-right, in the
file's own voxel order (slice ``s`` is voxel index ``s`` on that axis). Within a slice,
row 0 is the most superior row (rows run superior -> inferior) and column 0 the most
anterior column (columns run anterior -> posterior): the patient faces left, head up.
:func:`from_sagittal` undoes it exactly; both are pure permutations and flips.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from cps4_engine.errors import CPS4Error

if TYPE_CHECKING:
    from cps4_engine.labels import LabelScheme

VolumeKind = Literal["image", "label"]
NIFTI_SUFFIXES = (".nii", ".nii.gz")
GZIP_MTIME = 0
_NIFTI2_HEADER_BYTES = 544
# Spacing below a micrometre, or voxel axes this close to collinear, is a broken header.
_MIN_SPACING_MM = 1e-3
_COLLINEAR = 1e-6
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write a file so that readers see the old file or the complete new one, never half.

    Yields a temporary path in the same folder (its name ends with the final name, so
    writers that look at the extension, such as nibabel, work). Write to it; on a clean
    exit it is flushed to disk and renamed over ``path``; on an exception it is removed and
    ``path`` is untouched. Parent folders are created.

    Example::

        with atomic_write(run / "config.json") as tmp:
            tmp.write_text(json.dumps(config))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{secrets.token_hex(4)}-{path.name}"
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Atomically replace ``path`` with UTF-8 ``text``."""
    write_bytes_atomic(path, text.encode("utf-8"))


def is_nifti_path(path: str | Path) -> bool:
    """Whether the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """File name without ``.nii``/``.nii.gz``: ``mask_case3.nii.gz`` -> ``mask_case3``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def axis_codes(affine: np.ndarray, path: str | Path | None = None) -> tuple[str, str, str]:
    """Anatomical direction each voxel axis increases towards, e.g. ``("I", "P", "L")``.

    Oblique affines get the nearest anatomical axis.

    Raises:
        CPS4Error: the affine is singular or not 4x4 (naming ``path``).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise CPS4Error("affine must be a finite 4x4 matrix", path=path)
    codes = nib.aff2axcodes(affine)
    if len(codes) != 3 or any(code is None for code in codes):
        raise CPS4Error("affine is singular; the voxel axes have no anatomical direction", path=path)
    return tuple(codes)  # type: ignore[return-value]


@dataclass(frozen=True)
class SagittalLayout:
    """How voxel axes map onto the sagittal display ``(S, rows, cols)``.

    Attributes:
        axes: voxel axes (sagittal, superior-inferior, anterior-posterior).
        flip_rows: the SI voxel axis runs inferior -> superior and must be reversed.
        flip_cols: the AP voxel axis runs posterior -> anterior and must be reversed.
    """

    axes: tuple[int, int, int]
    flip_rows: bool
    flip_cols: bool


def sagittal_layout(affine: np.ndarray, path: str | Path | None = None) -> SagittalLayout:
    """Where the sagittal, SI and AP axes are in the voxel grid, from the affine."""
    codes = axis_codes(affine, path)
    sagittal = next(i for i, code in enumerate(codes) if code in ("L", "R"))
    superior_inferior = next(i for i, code in enumerate(codes) if code in ("S", "I"))
    anterior_posterior = next(i for i, code in enumerate(codes) if code in ("A", "P"))
    return SagittalLayout(
        axes=(sagittal, superior_inferior, anterior_posterior),
        flip_rows=codes[superior_inferior] == "S",
        flip_cols=codes[anterior_posterior] == "A",
    )


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Millimetres per voxel along each voxel axis (column norms of the affine)."""
    lengths = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return tuple(float(length) for length in lengths)  # type: ignore[return-value]


def sagittal_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Millimetres per step along (slice, row, column) of :func:`to_sagittal` output."""
    spacing = voxel_spacing(affine)
    return tuple(spacing[axis] for axis in sagittal_layout(affine).axes)  # type: ignore[return-value]


def to_sagittal(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Cut a 3D voxel array into sagittal slices in display orientation.

    Args:
        array: ``(X, Y, Z)`` voxel array (any dtype) in the grid the affine describes.
        affine: 4x4 voxel-to-world (RAS mm) matrix.

    Returns:
        ``(S, rows, cols)`` view of ``array``: rows superior -> inferior, columns
        anterior -> posterior, slices in voxel order along the sagittal axis.
    """
    layout = sagittal_layout(affine)
    slices = np.transpose(np.asarray(array), layout.axes)
    if layout.flip_rows:
        slices = slices[:, ::-1, :]
    if layout.flip_cols:
        slices = slices[:, :, ::-1]
    return slices


def from_sagittal(slices: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Put ``(S, rows, cols)`` display-orientation slices back into the voxel grid.

    Args:
        slices: array as produced by :func:`to_sagittal` (any dtype); extra leading axes
            are not allowed.
        affine: the volume's 4x4 affine.
        shape: the volume's voxel shape ``(X, Y, Z)``.

    Returns:
        ``(X, Y, Z)`` array, exactly the inverse of :func:`to_sagittal`.

    Raises:
        ValueError: ``slices`` does not have the sagittal shape of ``shape``.
    """
    layout = sagittal_layout(affine)
    expected = tuple(int(shape[axis]) for axis in layout.axes)
    slices = np.asarray(slices)
    if slices.shape != expected:
        raise ValueError(f"sagittal slices have shape {slices.shape}, expected {expected}")
    if layout.flip_rows:
        slices = slices[:, ::-1, :]
    if layout.flip_cols:
        slices = slices[:, :, ::-1]
    return np.ascontiguousarray(np.transpose(slices, np.argsort(layout.axes)))


@dataclass
class Volume:
    """A 3D NIfTI volume with its geometry.

    Attributes:
        array: ``(X, Y, Z)`` voxel values, dtype as stored (scaled data become float).
        affine: 4x4 float64 voxel-to-world (RAS mm) matrix.
        path: file it came from, or None for volumes made in memory.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel shape ``(X, Y, Z)``."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Millimetres per voxel along each voxel axis."""
        return voxel_spacing(self.affine)

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Anatomical direction of each voxel axis, e.g. ``("I", "P", "L")``."""
        return axis_codes(self.affine, self.path)

    @property
    def sagittal_axis(self) -> int:
        """Voxel axis that runs left-right (the one sagittal slices are cut along)."""
        return sagittal_layout(self.affine, self.path).axes[0]

    def sagittal(self) -> np.ndarray:
        """``(S, rows, cols)`` slices in display orientation (see :func:`to_sagittal`)."""
        return to_sagittal(self.array, self.affine)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CPS4Error("file not found", path=path)
    if not path.is_file():
        raise CPS4Error("is a folder, expected a NIfTI file (.nii or .nii.gz)", path=path)
    if not is_nifti_path(path):
        raise CPS4Error("not a NIfTI file (expected .nii or .nii.gz)", path=path)


def _open_stream(path: Path):
    """The file's decompressed bytes, whatever its suffix says (nibabel sniffs the same way)."""
    with open(path, "rb") as raw:
        magic = raw.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _raw_header(path: Path) -> nib.Nifti1Header:
    """The header exactly as stored: nibabel's loader silently "fixes" zero or negative
    pixdims, so the checks must see the fields before it does."""
    try:
        with _open_stream(path) as stream:
            start = stream.read(_NIFTI2_HEADER_BYTES)
    except EOFError:
        raise CPS4Error("file is truncated (the gzip stream ends early)", path=path) from None
    except (OSError, zlib.error) as error:
        raise CPS4Error(f"not a readable NIfTI file ({_short(error)})", path=path) from None
    header_size = {int.from_bytes(start[:4], order) for order in ("little", "big")}
    header_class = nib.Nifti1Header if 348 in header_size else nib.Nifti2Header if 540 in header_size else None
    if header_class is None or len(start) < header_class.sizeof_hdr:
        raise CPS4Error("not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header)", path=path)
    # Only the fixed fields: extensions are nibabel's business when it loads the file.
    fields = start[: header_class.sizeof_hdr] + bytes(4)
    try:
        return header_class.from_fileobj(io.BytesIO(fields), check=False)
    except (HeaderDataError, ValueError, EOFError) as error:
        raise CPS4Error(f"not a readable NIfTI header ({_short(error)})", path=path) from None


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _check_header(header: nib.Nifti1Header, path: Path) -> None:
    """Refuse headers that would give invented geometry or an unreadable array."""
    try:
        dtype = header.get_data_dtype()
    except (KeyError, HeaderDataError):
        raise CPS4Error(f"unknown voxel datatype code {int(header['datatype'])}", path=path) from None
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) >= 3 and any(n <= 0 for n in shape):
        raise CPS4Error(f"has a dimension of 0 (shape {'x'.join(map(str, shape))}); no voxels to read", path=path)
    needed = int(np.prod(shape, dtype=np.float64) * max(dtype.itemsize, 8))
    if needed > _memory_bytes():
        raise CPS4Error(
            f"declares {'x'.join(map(str, shape))} voxels ({needed / 2**30:.0f} GiB to read), more than "
            f"this machine's {_memory_bytes() / 2**30:.0f} GiB of memory; the header is probably corrupt",
            path=path,
        )
    if header["magic"] in (b"n+1", b"n+2"):
        header_end = int(header["sizeof_hdr"]) + 4
        if not np.isfinite(header["vox_offset"]) or float(header["vox_offset"]) < header_end:
            raise CPS4Error(
                f"vox_offset {float(header['vox_offset']):g} points inside the header (voxels start at "
                f"byte {header_end} or later)",
                path=path,
            )
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    if sform_code == 0 and qform_code == 0:
        raise CPS4Error(
            "has no usable sform or qform (both codes are 0), so its orientation is unknown; "
            "write the scanner geometry into the header",
            path=path,
        )
    if sform_code > 0:
        _check_affine(header.get_sform(), "sform", path)
    else:
        spacing = np.asarray(header["pixdim"][1:4], dtype=np.float64)
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise CPS4Error(
                f"qform voxel spacing (pixdim) {', '.join(f'{v:g}' for v in spacing)} must be positive "
                "and finite",
                path=path,
            )
        quaternion = np.asarray([header[k] for k in ("quatern_b", "quatern_c", "quatern_d",
                                                     "qoffset_x", "qoffset_y", "qoffset_z")], np.float64)
        if not np.all(np.isfinite(quaternion)):
            raise CPS4Error("qform holds NaN or infinite values", path=path)
        _check_affine(header.get_qform(), "qform", path)


def _check_affine(affine: np.ndarray, name: str, path: Path) -> None:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise CPS4Error(f"{name} holds NaN or infinite values", path=path)
    columns = affine[:3, :3]
    lengths = np.linalg.norm(columns, axis=0)
    if np.any(lengths < _MIN_SPACING_MM) or abs(np.linalg.det(columns)) < _COLLINEAR * np.prod(lengths):
        raise CPS4Error(
            f"{name} is singular (voxel spacing {', '.join(f'{v:g}' for v in lengths)} mm or collinear "
            "axes); the voxel axes have no anatomical direction",
            path=path,
        )


def header_notes(path: str | Path) -> list[str]:
    """What is unusual but readable about a NIfTI header, one sentence each (for ``cps4 info``).

    Raises:
        CPS4Error: the header is refused (see :func:`read_volume`).
    """
    path = Path(path)
    _check_file(path)
    header = _raw_header(path)
    _check_header(header, path)
    notes = []
    if isinstance(header, nib.Nifti2Header):
        notes.append("NIfTI-2 header")
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    if sform_code == 0:
        notes.append(f"geometry from the qform (code {qform_code}); the sform is unset")
    elif qform_code > 0:
        gap = float(np.abs(header.get_sform() - header.get_qform()).max())
        if gap > 1e-3:
            notes.append(f"sform and qform disagree by up to {gap:.3g} mm; the sform (code {sform_code}) is used")
    slope, inter = (float(header[k]) for k in ("scl_slope", "scl_inter"))
    if np.isfinite(slope) and slope not in (0.0, 1.0) or np.isfinite(inter) and inter != 0.0 and slope != 0.0:
        notes.append(f"stored values are scaled (scl_slope {slope:g}, scl_inter {inter:g})")
    affine = header.get_sform() if sform_code > 0 else header.get_qform()
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    oblique = float(np.degrees(np.arccos(np.clip(np.abs(directions).max(axis=0), -1, 1))).max())
    if oblique > 1.0:
        notes.append(f"oblique: voxel axes up to {oblique:.1f} degrees from the anatomical axes")
    return notes


def read_header(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file lazily (header only) after the header checks of :func:`read_volume`.

    Returns:
        The nibabel image; its ``shape`` and ``affine`` are trustworthy, its voxels unread.
    """
    path = Path(path)
    _check_file(path)
    _check_header(_raw_header(path), path)
    try:
        image = nib.load(str(path))
    except (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError) as error:
        raise CPS4Error(f"not a readable NIfTI file ({_short(error)})", path=path) from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CPS4Error("not a NIfTI file", path=path)
    return image


def _load_nifti(path: Path) -> nib.Nifti1Image:
    """Header checks, then the whole file in memory: a gzip stream read to its end has its
    CRC checked, so flipped bytes are refused instead of read as voxels."""
    _check_file(path)
    header = _raw_header(path)
    _check_header(header, path)
    try:
        with _open_stream(path) as stream:
            data = stream.read()
    except EOFError:
        raise CPS4Error("file is truncated (the gzip stream ends early)", path=path) from None
    except (OSError, zlib.error) as error:
        raise CPS4Error(f"file is corrupt ({_short(error)})", path=path) from None
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        return image_class.from_bytes(data)
    except (ImageFileError, HeaderDataError, OSError, EOFError, ValueError) as error:
        raise CPS4Error(f"not a readable NIfTI file ({_short(error)})", path=path) from None


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) < 120 else text[:117] + "..."


def read_volume(path: str | Path, kind: VolumeKind = "image", scheme: LabelScheme | None = None) -> Volume:
    """Read and validate a 3D NIfTI volume.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        kind: ``"image"`` (intensities must be finite) or ``"label"`` (values must be
            non-negative integers; returned in the smallest integer dtype holding them).
        scheme: for labels, the values must also be ids of this scheme.

    Returns:
        The volume. A 4D file with one trailing volume (``X, Y, Z, 1``) is squeezed to 3D.

    Raises:
        CPS4Error: missing, not NIfTI, truncated or corrupt (a gzip CRC is checked), not
            3D, a dimension of 0 or more voxels than memory holds, ``vox_offset`` inside
            the header, no sform/qform or a singular/non-finite one, zero or negative
            spacing, NaN/inf intensities or beyond float32, label values negative,
            non-integer, too large or outside ``scheme``; the message names the file.
    """
    path = Path(path)
    image = _load_nifti(path)
    shape = image.shape
    if len(shape) > 3 and all(n == 1 for n in shape[3:]):
        shape = shape[:3]
    if len(shape) != 3:
        raise CPS4Error(
            f"expected a 3D volume, got {len(image.shape)}D data of shape {tuple(image.shape)}",
            path=path,
        )
    try:
        array = np.asanyarray(image.dataobj).reshape(shape)
    except (OSError, EOFError, zlib.error, ValueError) as error:
        raise CPS4Error(f"file is truncated or corrupt ({_short(error)})", path=path) from None
    if np.issubdtype(array.dtype, np.complexfloating) or array.dtype.fields is not None:
        raise CPS4Error(f"unsupported voxel type {array.dtype}", path=path)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise CPS4Error(f"{bad} voxels are NaN or infinite", path=path)
    if array.size and np.issubdtype(array.dtype, np.floating) and np.abs(array).max() > _FLOAT32_MAX:
        # A huge scl_slope: every model computes in float32, where these become inf.
        raise CPS4Error(
            f"intensities reach {np.abs(array).max():.3g}, beyond 32-bit floats "
            f"(scl_slope {float(image.dataobj.slope):g})",
            path=path,
        )
    if kind == "label":
        array = _integer_labels(array, path)
        if scheme is not None:
            scheme.check_values(np.unique(array).tolist(), path)
    affine = np.asarray(image.affine, dtype=np.float64)
    axis_codes(affine, path)
    return Volume(array=array, affine=affine, path=path)


def _integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """Class ids in the smallest integer type that holds them, so that no later cast to
    int32 (torch indices, napari) can wrap a value such as 2**33 + 3 into a valid id."""
    if np.issubdtype(array.dtype, np.bool_):
        return array.astype(np.uint8)
    if not array.size:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.round(array)):
        raise CPS4Error("label volume holds non-integer values; expected class ids", path=path)
    low, high = array.min(), array.max()
    if low < 0:
        raise CPS4Error(f"label volume holds negative value {low:.15g}; class ids are 0 or more", path=path)
    if high > np.iinfo(np.int32).max:
        raise CPS4Error(f"label value {high:.15g} is too large to be a class id", path=path)
    return array.astype(_smallest_int_dtype(array))


def _smallest_int_dtype(array: np.ndarray) -> np.dtype:
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise ValueError("label values do not fit in 32-bit integers")


def _storable(array: np.ndarray) -> np.ndarray:
    """NIfTI has no 64-bit integer or bool types that every reader accepts."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize == 8:
        return array.astype(_smallest_int_dtype(array))
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def nifti_bytes(array: np.ndarray, affine: np.ndarray, compress: bool) -> bytes:
    """Serialise a volume to NIfTI-1 bytes, gzip-compressed with a fixed mtime if asked.

    The affine is stored as both qform and sform (NIfTI keeps it at float32 precision).
    Identical inputs give identical bytes.
    """
    array = _storable(np.asarray(array))
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(array.dtype)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=GZIP_MTIME) if compress else raw


def write_volume(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Atomically write a 3D array with its affine as ``.nii`` or ``.nii.gz``.

    The dtype is kept (64-bit integers and bools are narrowed to the smallest integer
    type that holds the values; float16 becomes float32). Output is deterministic:
    the same array and affine always give the same bytes.

    Args:
        path: destination ending in ``.nii`` or ``.nii.gz``.
        array: ``(X, Y, Z)`` voxel values.
        affine: 4x4 voxel-to-world matrix.

    Returns:
        ``path`` as a Path.

    Raises:
        CPS4Error: bad file name, not 3D, or a bad affine.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise CPS4Error("output must end in .nii or .nii.gz", path=path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise CPS4Error(f"can only write 3D volumes, got shape {array.shape}", path=path)
    axis_codes(affine, path)
    write_bytes_atomic(path, nifti_bytes(array, affine, compress=str(path).lower().endswith(".gz")))
    return path
