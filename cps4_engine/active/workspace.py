"""The refinement workspace: cases, label versions and per-class provenance on disk.

A workspace is a folder the user picks::

    workspace.json            the manifest (schema below)
    workspace.json.prev       the manifest as it was before the last save
    labels/<case>/v0001.nii.gz, v0002.nii.gz, ...   every label version, never rewritten
    rounds/round_0001/ ...    stage-2 runs of the refinement rounds (see ``rounds``)

Manifest (schema version 2)::

    {"format": "cps4-workspace", "schema_version": 2, "created": ISO, "modified": ISO,
     "source": "<dataset the cases came from>", "scheme": {...LabelScheme.to_dict()...},
     "rounds": [{"round": 1, "run": "rounds/round_0001", "created": ISO,
                 "trained_on": [case ids], "metrics": {...}}],
     "cases": {"<case id>": {
         "image": "<absolute path>", "role": "train" | "heldout", "complete": bool,
         "versions": [{"version": 1, "file": "labels/<case>/v0001.nii.gz",
                       "author": "import" | "human" | "machine", "round": int | null,
                       "created": ISO}],
         "classes": {"<class id>": {"status": "machine" | "accepted" | "corrected" |
                                    "rejected", "round": int | null, "changed": ISO}},
         "uncertainty": {...CaseUncertainty.to_dict()...} | null}}}

Rules:

- **Human labels win.** Classes whose status is ``accepted`` or ``corrected`` are human
  labels: when a new round's pseudo-label is merged (:meth:`Workspace.add_prediction`),
  their voxels are kept exactly and the machine may not paint those classes elsewhere.
  A case whose mask is ``complete`` (every voxel's class is known) is never changed by
  the machine.
- **Nothing is lost.** Every label change writes a new version file; old versions stay.
  Version numbers are taken by exclusive creation (:class:`LabelVersions`), so no file
  is ever rewritten, whoever else writes.
- **Several writers.** Two docks, a dock and the CLI, or two processes may hold the same
  workspace. Every change takes an exclusive lock on ``.workspace.lock`` (``fcntl.flock``;
  the system drops it when a writer dies), reloads the manifest from disk, applies the
  change to that fresh manifest, writes the label file and then the manifest, and only
  then lets go. So no save can undo another's; :meth:`Workspace.reload` brings an open
  workspace's in-memory view up to date for reading.
- **Crash-safe saves.** Label files and the manifest are written to a temporary file and
  renamed (:func:`cps4_engine.io.atomic_write`); the label file is written before the
  manifest that points to it, and the previous manifest is kept as
  ``workspace.json.prev``. A writer killed at any moment leaves a manifest that loads
  and points to complete label files; :meth:`Workspace.open` falls back to
  ``workspace.json.prev`` if ``workspace.json`` is missing or unreadable, and (under the
  lock, so never under a live writer's feet) removes what killed saves left behind:
  ``.tmp-*`` files and label versions no manifest refers to.
- **One review vocabulary.** A class is ``machine`` (not reviewed; the review dock says
  *pending*), ``accepted``, ``corrected`` (*needs edit*) or ``rejected``; see
  :data:`CLASS_STATUSES`, :data:`STATUS_LABELS` and :func:`class_status`, which also
  reads the older names.
- **One label-versioning scheme.** Every kept label version, in a workspace or beside a
  dataset, is a ``vNNNN.nii.gz`` of a :class:`LabelVersions` folder: the workspace's
  ``labels/<case>/``, and for a mask saved into a dataset folder (the docks' *Save*)
  ``previous_versions/<mask name>/`` through :func:`save_mask_version`;
  :func:`mask_versions` also lists the ``.prev-<n>`` files of earlier releases.

- **One object per workspace in a process.** :func:`shared_workspace` hands every
  caller (the data dock, the refine panel) the same :class:`Workspace` for one folder,
  so no dock holds a stale copy. While a retraining round runs on it
  (:meth:`Workspace.begin_round` ... :meth:`Workspace.end_round`), human edits
  (:meth:`Workspace.save_human_labels`, :meth:`Workspace.set_class_status`) are refused
  in one line, and listeners (:meth:`Workspace.add_round_listener`) hear when a round
  starts and ends, so the docks can grey out their save buttons.

For the widgets (they hold no logic of their own): review statuses come from
:data:`CLASS_STATUSES` and are shown with :data:`STATUS_LABELS`; a word typed or stored
by an older dock goes through :func:`class_status`; saving a reviewed mask into a
dataset is ``save_mask_version(mask_path, labels, affine, painted, image=image_path)``;
saving into a workspace is :meth:`Workspace.save_human_labels` with statuses by class.
- **Versioned schema.** A manifest from a newer version of the program is refused with a
  one-line error; an older one is migrated on open (schema 1: cases as a list with plain
  status strings and a list of label files).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np

from cps4_engine.active.queue import CaseUncertainty
from cps4_engine.errors import CPS4Error
from cps4_engine.geometry import Grid, check_same_grid
from cps4_engine.io import atomic_write, nifti_bytes, read_volume, write_text_atomic, write_volume
from cps4_engine.layouts import image_extension, mrspineseg_case_paths
from cps4_engine.labels import LabelScheme

SCHEMA_VERSION = 2
FORMAT = "cps4-workspace"
MANIFEST = "workspace.json"
PREVIOUS_MANIFEST = "workspace.json.prev"
LOCK_FILE = ".workspace.lock"
LABELS_FOLDER = "labels"

#: The review statuses of a class: the one vocabulary of the engine, the CLI and the docks.
#: ``machine``: a pseudo-label nobody reviewed; ``accepted``: a human approved the
#: machine's voxels; ``corrected``: a human changed or painted them; ``rejected``: a human
#: said they are wrong (unknown until corrected).
CLASS_STATUSES = ("machine", "accepted", "corrected", "rejected")
HUMAN_STATUSES = ("accepted", "corrected")
#: What the widgets show for each status.
STATUS_LABELS = {"machine": "pending", "accepted": "accepted", "corrected": "needs edit", "rejected": "rejected"}
#: Older names, still read: the review dock's words and other spellings.
STATUS_ALIASES = {"pending": "machine", "unreviewed": "machine", "needs edit": "corrected",
                  "needs_edit": "corrected", "needs-edit": "corrected"}
CASE_ROLES = ("train", "heldout")

ClassStatusName = Literal["machine", "accepted", "corrected", "rejected"]
CaseState = Literal["unlabeled", "pseudo-labeled", "in review", "reviewed", "held out"]


def now() -> str:
    """The current UTC time as an ISO 8601 string (seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ClassStatus:
    """Provenance of one class of one case.

    Attributes:
        status: ``machine`` (a pseudo-label nobody reviewed), ``accepted`` (a human
            approved the machine's voxels), ``corrected`` (a human changed them) or
            ``rejected`` (a human said the machine's voxels are wrong; unknown until
            corrected).
        round: the model round that produced the voxels, None for human-made labels.
        changed: ISO 8601 time of the last change.
    """

    status: ClassStatusName
    round: int | None
    changed: str

    @property
    def is_human(self) -> bool:
        """True for accepted and corrected classes."""
        return self.status in HUMAN_STATUSES


def class_status(name: str) -> ClassStatusName:
    """The canonical status for ``name`` (a status, a label of :data:`STATUS_LABELS` or an
    older alias, any case), e.g. ``class_status("needs edit") == "corrected"``.

    Raises:
        CPS4Error: not a review status.
    """
    key = str(name).strip().lower()
    canonical = STATUS_ALIASES.get(key, key)
    if canonical not in CLASS_STATUSES:
        raise CPS4Error(f"unknown class status {name!r}; use one of {CLASS_STATUSES}")
    return canonical  # type: ignore[return-value]


class LabelVersions:
    """The versions of one label volume: ``<folder>/v0001.nii.gz``, ``v0002.nii.gz`` ...

    The one label-versioning scheme of the project: numbered from 1, never rewritten and
    never reused. :meth:`add` writes the volume to a temporary file in the folder and
    publishes it with ``os.link``, which fails if the name exists, so two writers that
    pick the same number cannot overwrite each other (the loser takes the next one).
    The workspace keeps ``labels/<case>/``; masks saved beside a dataset can keep theirs
    in any folder (e.g. ``previous_versions/<mask name>/``) with the same class.
    """

    PATTERN = re.compile(r"v(\d+)\.nii\.gz$")

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def numbers(self) -> list[int]:
        """Version numbers present on disk, ascending."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := self.PATTERN.fullmatch(p.name)))

    def path(self, number: int) -> Path:
        """File of version ``number``."""
        return self.folder / f"v{number:04d}.nii.gz"

    def add(self, labels: np.ndarray, affine: np.ndarray, taken: Iterable[int] = ()) -> int:
        """Write ``labels`` as the next version; returns its number.

        Args:
            labels: the label volume.
            affine: its voxel-to-world matrix.
            taken: numbers used elsewhere (e.g. recorded in a manifest whose file is
                gone) that must not be reused.
        """
        return self.add_bytes(nifti_bytes(labels, affine, compress=True), taken)

    def add_bytes(self, data: bytes, taken: Iterable[int] = ()) -> int:
        """Store ``data`` (a complete ``.nii.gz`` file) as the next version; returns its number."""
        self.folder.mkdir(parents=True, exist_ok=True)
        number = max([*self.numbers(), *taken, 0]) + 1
        tmp = self.folder / f".tmp-{secrets.token_hex(4)}-v.nii.gz"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            while True:
                try:
                    os.link(tmp, self.path(number))
                    return number
                except FileExistsError:
                    number += 1
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path`` (created if missing); the system releases
    it when the holder exits or is killed, so a dead writer never blocks the next one."""
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise CPS4Error(f"cannot lock for writing ({error.strerror})", path=lock_path) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


MASK_HISTORY_FOLDER = "previous_versions"
_LEGACY_PREVIOUS = re.compile(r"\.prev-(\d+)\.nii(\.gz)?$")


def mask_history(mask_path: str | Path) -> LabelVersions:
    """Where the versions of a mask saved beside a dataset are kept:
    ``<mask folder>/previous_versions/<mask name>/v0001.nii.gz ...`` (a subfolder, so
    dataset readers never take an old version for another case's mask)."""
    from cps4_engine.io import nifti_stem

    mask_path = Path(mask_path)
    return LabelVersions(mask_path.parent / MASK_HISTORY_FOLDER / nifti_stem(mask_path))


def mask_versions(mask_path: str | Path) -> list[Path]:
    """Every kept version of a dataset mask, oldest first: the ``.prev-<n>`` files that
    earlier releases of the plugin wrote (``previous_versions/<name>.prev-<n>.nii.gz``),
    then the ``vNNNN`` versions of :func:`save_mask_version`."""
    from cps4_engine.io import nifti_stem

    mask_path = Path(mask_path)
    folder = mask_path.parent / MASK_HISTORY_FOLDER
    stem = nifti_stem(mask_path)
    legacy = sorted(
        (int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else [])
        if p.name.startswith(f"{stem}.prev-") and (m := _LEGACY_PREVIOUS.search(p.name))
    )
    history = mask_history(mask_path)
    return [p for _, p in legacy] + [history.path(n) for n in history.numbers()]


def save_mask_version(
    mask_path: str | Path, labels: np.ndarray, affine: np.ndarray,
    painted: Iterable[int] | None = None, image: Any = None, scheme: LabelScheme | None = None,
) -> Path:
    """Save a mask beside its dataset without ever losing a version.

    The label-versioning scheme of the workspace (:class:`LabelVersions`) for masks that
    live in a dataset folder (what the *Data* and *Review* docks save). Under a lock on
    the mask's history folder: the file about to be replaced is kept as a version if no
    version holds it yet (the dataset's original, or an edit made by another tool), the
    new labels become the next version, and the mask file and its partial-mask sidecar
    are replaced atomically. Two docks saving the same mask at once both end up in the
    history; the mask file holds the later save.

    Args:
        mask_path: the mask file (``.nii.gz`` or ``.nii``).
        labels: class ids in the image's voxel grid.
        affine: the image's voxel-to-world matrix.
        painted: the classes whose voxels are known (a partial mask), None if complete.
        image: the image the mask belongs to (a path, Volume or Grid): checked with
            :func:`cps4_engine.geometry.check_same_grid` before anything is written.
        scheme: label values must be ids of it (MRSpineSeg if None).

    Returns:
        The path of the new version in the history.

    Raises:
        CPS4Error: labels not integer or outside the scheme, a grid that is not the
            image's, or a folder that cannot be written (naming it).
    """
    from cps4_engine.data import label_status_path, write_label_status
    from cps4_engine.labels import mrspineseg_scheme

    mask_path = Path(mask_path)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        raise CPS4Error(f"labels must be integers, got {labels.dtype}", path=mask_path)
    (scheme or mrspineseg_scheme()).check_values(np.unique(labels).tolist(), mask_path)
    if image is not None:
        check_same_grid(image, Grid(labels.shape, np.asarray(affine, np.float64), mask_path), what="mask")
    history = mask_history(mask_path)
    try:
        history.folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CPS4Error(f"cannot keep mask versions ({error.strerror})", path=history.folder) from None
    with _file_lock(history.folder / LOCK_FILE):
        numbers = history.numbers()
        if mask_path.is_file() and (not numbers or mask_path.read_bytes() != history.path(numbers[-1]).read_bytes()):
            kept = history.add_bytes(mask_path.read_bytes())
            if label_status_path(mask_path).is_file():
                shutil.copyfile(label_status_path(mask_path), label_status_path(history.path(kept)))
        new = history.path(history.add(labels, affine))
        sidecar_painted = None if painted is None else sorted(int(c) for c in painted)
        write_label_status(new, sidecar_painted)
        write_volume(mask_path, labels, affine)
        write_label_status(mask_path, sidecar_painted)
    return new


def _safe_case_dir(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id)


def _migrate_v1(manifest: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 → 2: cases keyed by id, statuses and label files with provenance."""
    stamp = manifest.get("modified") or manifest.get("created") or now()
    cases = {}
    for entry in manifest["cases"]:
        versions = [
            {"version": i + 1, "file": file, "author": "import", "round": None, "created": stamp}
            for i, file in enumerate(entry.get("labels", []))
        ]
        classes = {
            str(class_id): {"status": status, "round": None, "changed": stamp}
            for class_id, status in entry.get("status", {}).items()
        }
        cases[entry["id"]] = {
            "image": entry["image"],
            "role": entry.get("role", "train"),
            "complete": bool(entry.get("complete", False)),
            "versions": versions,
            "classes": classes,
            "uncertainty": None,
        }
    return {
        "format": FORMAT,
        "schema_version": 2,
        "created": manifest.get("created", stamp),
        "modified": stamp,
        "source": manifest.get("source", ""),
        "scheme": manifest["scheme"],
        "rounds": manifest.get("rounds", []),
        "cases": cases,
    }


_MIGRATIONS = {1: _migrate_v1}


def _validate(manifest: Any, path: Path) -> None:
    """Check the structure of a schema-2 manifest; raise a one-line CPS4Error if wrong."""

    def fail(problem: str) -> None:
        raise CPS4Error(f"invalid workspace manifest: {problem}", path=path)

    if not isinstance(manifest.get("cases"), dict):
        fail("'cases' must be an object of case id -> case")
    if not isinstance(manifest.get("rounds"), list):
        fail("'rounds' must be a list")
    if not isinstance(manifest.get("scheme"), dict):
        fail("'scheme' must be a label scheme object")
    for case_id, case in manifest["cases"].items():
        if not isinstance(case, dict):
            fail(f"case {case_id!r} must be an object")
        for key, kind in (("image", str), ("role", str), ("complete", bool),
                          ("versions", list), ("classes", dict)):
            if not isinstance(case.get(key), kind):
                fail(f"case {case_id!r} lacks {key!r} of type {kind.__name__}")
        if case["role"] not in CASE_ROLES:
            fail(f"case {case_id!r} has role {case['role']!r}; use one of {CASE_ROLES}")
        for class_id, entry in case["classes"].items():
            if not str(class_id).isdigit() or not isinstance(entry, dict):
                fail(f"case {case_id!r} class {class_id!r} is malformed")
            try:
                entry["status"] = class_status(entry.get("status"))
            except CPS4Error:
                fail(f"case {case_id!r} class {class_id} has status {entry.get('status')!r}")
        for version in case["versions"]:
            if not isinstance(version, dict) or not isinstance(version.get("file"), str):
                fail(f"case {case_id!r} has a label version without a file")
            if not isinstance(version.get("version"), int) or version["version"] < 1:
                fail(f"case {case_id!r} has a label version without a positive number")
            if Path(version["file"]).is_absolute() or ".." in Path(version["file"]).parts:
                fail(f"case {case_id!r} label file {version['file']!r} is outside the workspace")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CPS4Error(f"unreadable workspace manifest ({type(error).__name__})", path=path) from None
    if not isinstance(manifest, dict) or manifest.get("format", FORMAT) != FORMAT:
        raise CPS4Error("not a cps4 workspace manifest", path=path)
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise CPS4Error(f"workspace manifest has no valid schema_version ({version!r})", path=path)
    if version > SCHEMA_VERSION:
        raise CPS4Error(
            f"workspace schema version {version} is newer than this napari-cps4 reads "
            f"({SCHEMA_VERSION}); update napari-cps4",
            path=path,
        )
    try:
        while manifest["schema_version"] < SCHEMA_VERSION:
            manifest = _MIGRATIONS[manifest["schema_version"]](manifest)
    except (KeyError, TypeError, AttributeError) as error:
        raise CPS4Error(f"cannot migrate workspace manifest (missing {error})", path=path) from None
    _validate(manifest, path)
    return manifest


_SHARED: "weakref.WeakValueDictionary[Path, Workspace]" = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def shared_workspace(root: str | Path) -> "Workspace":
    """The one :class:`Workspace` object of the folder ``root`` in this process.

    The first call opens it (:meth:`Workspace.open`); later calls, for the same folder by
    any path, return that object with its manifest re-read, for as long as someone holds
    it. The docks share workspaces this way, so a save made through one is what the other
    sees and a round running in one blocks human edits in both.

    Raises:
        CPS4Error: what :meth:`Workspace.open` raises.
    """
    key = Path(root).resolve()
    with _SHARED_LOCK:
        workspace = _SHARED.get(key)
        if workspace is None:
            workspace = Workspace.open(key)
            _SHARED[key] = workspace
        else:
            workspace.reload()
        return workspace


class Workspace:
    """A refinement workspace (see the module doc for the layout and the rules).

    Open one with :meth:`open`, make one with :meth:`create`. Methods that change
    anything do so under the workspace lock, on the manifest as it is on disk, and save
    at once (label file first, then the manifest). Reading methods use the manifest as
    last loaded or saved by this object; :meth:`reload` refreshes it.

    Attributes:
        root: the workspace folder.
        manifest: the manifest as last read or written by this object.
        recovered: True when ``workspace.json`` was unreadable and ``.prev`` was used.
        removed_orphans: files that killed saves had left and :meth:`open` removed.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], recovered: bool = False) -> None:
        self.root = root
        self.manifest = manifest
        self.recovered = recovered
        self.removed_orphans: list[Path] = []
        self.scheme = LabelScheme.from_dict(manifest["scheme"])
        # flock excludes other processes and other Workspace objects; this excludes
        # other threads using this object (a dock's worker and the GUI thread).
        self._thread_lock = threading.RLock()
        self._lock_held = False
        self._round_running = False
        self._round_listeners: list[Callable[[bool], None]] = []

    @classmethod
    def create(
        cls,
        root: str | Path,
        cases: Sequence[Any],
        scheme: LabelScheme,
        source: str = "",
        heldout: Iterable[str] = (),
        import_labels: bool | Iterable[str] = True,
    ) -> "Workspace":
        """Make a new workspace from dataset cases.

        Args:
            root: the workspace folder; created if needed; must not hold a workspace.
            cases: :class:`cps4_engine.data.Case` objects (``case_id``, ``image_path``,
                ``label_path``, ``painted``).
            scheme: the label scheme of the masks.
            source: where the cases came from (recorded, informative).
            heldout: case ids kept out of training and used to measure each round.
            import_labels: True to import every case's mask as an accepted human label,
                False for none, or the ids of the cases whose masks to import (held-out
                cases' masks are always imported, they are the reference).

        Returns:
            The new workspace.

        Raises:
            CPS4Error: a workspace already exists there, a held-out case has no mask or
                is not among the cases, duplicate case ids, an unreadable image or mask,
                or a mask whose grid (shape, orientation, affine) is not its image's.
        """
        root = Path(root)
        heldout = set(heldout)
        ids = [case.case_id for case in cases]
        if len(set(ids)) != len(ids):
            raise CPS4Error("the dataset has duplicate case ids", path=root)
        unknown = heldout - set(ids)
        if unknown:
            raise CPS4Error(f"held-out cases {sorted(unknown)} are not in the dataset", path=root)
        wanted = (
            set(ids) if import_labels is True else set() if import_labels is False else set(import_labels)
        )
        for case in cases:
            if case.label_path is None and case.case_id in heldout:
                raise CPS4Error(f"held-out case {case.case_id!r} has no mask", path=case.image_path)
        stamp = now()
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created": stamp,
            "modified": stamp,
            "source": str(source),
            "scheme": scheme.to_dict(),
            "rounds": [],
            "cases": {},
        }
        for case in cases:
            manifest["cases"][case.case_id] = {
                "image": str(Path(case.image_path).resolve()),
                "role": "heldout" if case.case_id in heldout else "train",
                "complete": False,
                "versions": [],
                "classes": {},
                "uncertainty": None,
            }
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CPS4Error(f"cannot create the workspace folder ({error.strerror})", path=root) from None
        workspace = cls(root, manifest)
        with workspace._locked():
            if (root / MANIFEST).exists():
                raise CPS4Error("a workspace already exists here", path=root / MANIFEST)
            for case in cases:
                if case.label_path is not None and case.case_id in wanted | heldout:
                    workspace._import_mask(case)
            workspace._write_manifest()
        return workspace

    def _import_mask(self, case: Any) -> None:
        volume = read_volume(case.label_path, kind="label", scheme=self.scheme)
        check_same_grid(Path(case.image_path), volume, what="mask")
        entry = self.manifest["cases"][case.case_id]
        painted = case.painted
        present = [int(v) for v in np.unique(volume.array) if v != 0]
        classes = present if painted is None else [int(c) for c in painted]
        self._write_version(case.case_id, volume.array, volume.affine, "import", None)
        entry["complete"] = painted is None
        stamp = now()
        entry["classes"] = {
            str(c): {"status": "accepted", "round": None, "changed": stamp} for c in classes
        }

    @classmethod
    def open(cls, root: str | Path) -> "Workspace":
        """Open an existing workspace, migrating an older manifest.

        If ``workspace.json`` is missing or unreadable but ``workspace.json.prev`` loads,
        that one is used and :attr:`recovered` is True. Otherwise, when the folder is
        writable, what killed saves left behind is removed under the lock (see
        :attr:`removed_orphans`).

        Raises:
            CPS4Error: no workspace there, a manifest from a newer program version, or
                a malformed manifest.
        """
        root = Path(root)
        workspace = cls(root, *cls._load(root))
        if not workspace.recovered and os.access(root, os.W_OK):
            with workspace._locked():
                workspace.manifest, _ = cls._load(root)
                workspace.removed_orphans = workspace._remove_orphans()
        return workspace

    @staticmethod
    def _load(root: Path) -> tuple[dict[str, Any], bool]:
        """``(manifest, recovered)`` from disk, falling back to the previous manifest."""
        primary, previous = root / MANIFEST, root / PREVIOUS_MANIFEST
        if not primary.exists() and not previous.exists():
            raise CPS4Error("not a cps4 workspace (no workspace.json)", path=root)
        try:
            return _read_manifest(primary), False
        except CPS4Error as error:
            if "newer than" in str(error) or not previous.exists():
                raise
            return _read_manifest(previous), True

    def reload(self) -> None:
        """Re-read the manifest from disk: see what other writers saved since.

        Waits for a change another thread is making through this object, so that change
        is not applied to a manifest this call has already replaced.
        """
        with self._thread_lock:
            self.manifest, self.recovered = self._load(self.root)

    # a retraining round on this object ------------------------------------------------

    @property
    def round_running(self) -> bool:
        """Whether a retraining round started with :meth:`begin_round` has not ended."""
        return self._round_running

    def begin_round(self) -> None:
        """Mark a retraining round as running: human edits are refused until :meth:`end_round`.

        Raises:
            CPS4Error: a round is already running on this workspace.
        """
        with self._thread_lock:
            if self._round_running:
                raise CPS4Error("a retraining round is already running on this workspace", path=self.root)
            self._round_running = True
        self._tell_round_listeners(True)

    def end_round(self) -> None:
        """Mark the running round as ended (finished, failed or cancelled); idempotent."""
        with self._thread_lock:
            was_running, self._round_running = self._round_running, False
        if was_running:
            self._tell_round_listeners(False)

    def add_round_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(running)`` when a round begins (True) or ends (False).

        Listeners run on the thread that calls :meth:`begin_round` or :meth:`end_round`
        (the docks: the GUI thread).
        """
        self._round_listeners.append(listener)

    def remove_round_listener(self, listener: Callable[[bool], None]) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        if listener in self._round_listeners:
            self._round_listeners.remove(listener)

    def _tell_round_listeners(self, running: bool) -> None:
        for listener in list(self._round_listeners):
            listener(running)

    def _refuse_during_round(self) -> None:
        if self._round_running:
            raise CPS4Error("a retraining round is running on this workspace: save when it ends, "
                            "or press Stop", path=self.root)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the workspace lock (re-entrant within this object)."""
        with self._thread_lock:
            if self._lock_held:
                yield
                return
            with _file_lock(self.root / LOCK_FILE):
                self._lock_held = True
                try:
                    yield
                finally:
                    self._lock_held = False

    @contextlib.contextmanager
    def _change(self) -> Iterator[None]:
        """One change: lock, start from the manifest on disk, save it on success.

        The change is applied to the freshest manifest, so a save made by another
        writer since this object last read the manifest is kept, never overwritten.
        """
        with self._locked():
            self.reload()
            yield
            self._write_manifest()

    def _write_manifest(self) -> None:
        """Atomically write the manifest, keeping the previous one as ``.prev`` (lock held)."""
        self.manifest["modified"] = now()
        primary = self.root / MANIFEST
        text = json.dumps(self.manifest, indent=1, sort_keys=False)
        if primary.exists():
            with atomic_write(self.root / PREVIOUS_MANIFEST) as tmp:
                shutil.copyfile(primary, tmp)
        write_text_atomic(primary, text)

    def _remove_orphans(self) -> list[Path]:
        """Delete ``.tmp-*`` files and unreferenced label versions (lock held).

        Every workspace writer creates these only while it holds the lock, so with the
        lock held they are leftovers of a writer that died. Only the manifest's folder
        and ``labels/`` are swept: refinement rounds in ``rounds/`` write their own
        temporary files without this lock.
        """
        referenced = {
            (self.root / version["file"]).resolve()
            for manifest in (self.manifest, self._previous_manifest())
            for case in manifest.get("cases", {}).values()
            for version in case.get("versions", [])
        }
        removed = []
        labels = self.root / LABELS_FOLDER
        folders = [self.root, *(p for p in labels.iterdir() if p.is_dir())] if labels.is_dir() else [self.root]
        for folder in folders:
            for path in folder.iterdir():
                orphan = path.name.startswith(".tmp-") or (
                    folder != self.root and LabelVersions.PATTERN.fullmatch(path.name)
                    and path.resolve() not in referenced
                )
                if orphan and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path)
        return removed

    def _previous_manifest(self) -> dict[str, Any]:
        try:
            return _read_manifest(self.root / PREVIOUS_MANIFEST)
        except CPS4Error:
            return {}

    # ----- cases -----------------------------------------------------------------------

    def _case(self, case_id: str) -> dict[str, Any]:
        try:
            return self.manifest["cases"][case_id]
        except KeyError:
            raise CPS4Error(f"no case {case_id!r} in this workspace", path=self.root) from None

    def case_ids(self, role: str | None = None) -> list[str]:
        """Case ids in workspace order, optionally only those of one role."""
        return [
            case_id for case_id, case in self.manifest["cases"].items()
            if role is None or case["role"] == role
        ]

    def image_path(self, case_id: str) -> Path:
        """The case's source image."""
        return Path(self._case(case_id)["image"])

    def role(self, case_id: str) -> str:
        """``train`` or ``heldout``."""
        return self._case(case_id)["role"]

    def is_complete(self, case_id: str) -> bool:
        """True when every voxel's class in the current labels is known to a human."""
        return bool(self._case(case_id)["complete"])

    def class_statuses(self, case_id: str) -> dict[int, ClassStatus]:
        """Per-class provenance of a case, by class id."""
        return {
            int(class_id): ClassStatus(entry["status"], entry.get("round"), entry["changed"])
            for class_id, entry in sorted(self._case(case_id)["classes"].items(), key=lambda kv: int(kv[0]))
        }

    def human_classes(self, case_id: str) -> list[int]:
        """Class ids a human accepted or corrected."""
        return [c for c, s in self.class_statuses(case_id).items() if s.is_human]

    def state(self, case_id: str) -> CaseState:
        """A one-word summary of where a case stands in review."""
        case = self._case(case_id)
        if case["role"] == "heldout":
            return "held out"
        statuses = self.class_statuses(case_id)
        if not case["versions"]:
            return "unlabeled"
        if case["complete"] or (statuses and all(s.is_human for s in statuses.values())):
            return "reviewed"
        if any(s.is_human or s.status == "rejected" for s in statuses.values()):
            return "in review"
        return "pseudo-labeled"

    def versions(self, case_id: str) -> list[dict[str, Any]]:
        """The case's label versions, oldest first (copies of the manifest entries)."""
        return [dict(v) for v in self._case(case_id)["versions"]]

    def version_path(self, case_id: str, version: int | None = None) -> Path | None:
        """File of a label version (default the latest), or None if the case has none."""
        versions = self._case(case_id)["versions"]
        if not versions:
            return None
        entry = versions[-1] if version is None else next(
            (v for v in versions if v["version"] == version), None
        )
        if entry is None:
            raise CPS4Error(f"case {case_id!r} has no label version {version}", path=self.root)
        return self.root / entry["file"]

    def current_labels(self, case_id: str) -> np.ndarray | None:
        """The latest label volume of a case in its image's voxel grid, or None."""
        path = self.version_path(case_id)
        return None if path is None else read_volume(path, kind="label").array

    def _write_version(
        self, case_id: str, labels: np.ndarray, affine: np.ndarray, author: str, round_: int | None
    ) -> str:
        """Write the next label version file and record it (lock held); returns its path."""
        case = self._case(case_id)
        folder = _safe_case_dir(case_id)
        number = LabelVersions(self.root / LABELS_FOLDER / folder).add(
            labels, affine, taken=[v["version"] for v in case["versions"]]
        )
        relative = f"{LABELS_FOLDER}/{folder}/v{number:04d}.nii.gz"
        case["versions"].append(
            {"version": number, "file": relative, "author": author, "round": round_, "created": now()}
        )
        return relative

    def _checked_labels(self, case_id: str, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image = self.image_path(case_id)
        grid = Grid.of(image)
        labels = np.asarray(labels)
        if labels.shape != grid.shape:
            raise CPS4Error(
                f"labels of shape {labels.shape} do not match the image of case "
                f"{case_id!r} ({grid.shape})",
                path=image,
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise CPS4Error(f"labels for case {case_id!r} must be integers, got {labels.dtype}")
        self.scheme.check_values(np.unique(labels).tolist(), image)
        return labels, grid.affine

    def save_human_labels(
        self,
        case_id: str,
        labels: np.ndarray,
        statuses: Mapping[int, ClassStatusName] | None = None,
        complete: bool | None = None,
    ) -> int:
        """Store labels a human edited as a new version.

        Classes whose voxels differ from the previous version become ``corrected``
        (classes painted for the first time too); ``statuses`` then overrides any class.
        Classes no longer present lose their entry unless ``statuses`` names them.

        Args:
            case_id: the case.
            labels: integer label volume in the case image's voxel grid.
            statuses: explicit class statuses to set (e.g. ``{3: "accepted"}``).
            complete: whether every voxel's class is now known; None means complete
                exactly when no class is left ``machine`` or ``rejected``.

        Returns:
            The new version number.

        Raises:
            CPS4Error: unknown case, wrong shape, values outside the scheme, bad status,
                or a retraining round is running on this object (:meth:`begin_round`).
        """
        self._refuse_during_round()
        labels, affine = self._checked_labels(case_id, labels)
        statuses = {int(class_id): class_status(status) for class_id, status in (statuses or {}).items()}
        with self._change():
            return self._save_human_labels(case_id, labels, affine, statuses, complete)

    def _save_human_labels(
        self, case_id: str, labels: np.ndarray, affine: np.ndarray,
        statuses: Mapping[int, ClassStatusName], complete: bool | None,
    ) -> int:
        previous = self.current_labels(case_id)
        case = self._case(case_id)
        stamp = now()
        present = {int(v) for v in np.unique(labels) if v != 0}
        classes = {k: v for k, v in case["classes"].items() if int(k) in present}
        for class_id in sorted(present):
            changed = previous is None or not np.array_equal(previous == class_id, labels == class_id)
            if changed or str(class_id) not in classes:
                classes[str(class_id)] = {"status": "corrected", "round": None, "changed": stamp}
        for class_id, status in (statuses or {}).items():
            old = classes.get(str(class_id), {})
            classes[str(class_id)] = {
                "status": status,
                "round": old.get("round") if status in ("accepted", "rejected") else None,
                "changed": stamp,
            }
        self._write_version(case_id, labels, affine, "human", None)
        case["classes"] = classes
        if complete is None:
            complete = bool(classes) and all(
                entry["status"] in HUMAN_STATUSES for entry in classes.values()
            )
        case["complete"] = complete
        return case["versions"][-1]["version"]

    def set_class_status(self, case_id: str, class_id: int, status: ClassStatusName) -> None:
        """Change one class's status without touching voxels (accept or reject).

        Raises:
            CPS4Error: unknown case, unknown status, the class is not in the labels, or
                a retraining round is running on this object.
        """
        self._refuse_during_round()
        status = class_status(status)
        with self._change():
            case = self._case(case_id)
            entry = case["classes"].get(str(class_id))
            if entry is None:
                raise CPS4Error(f"case {case_id!r} has no class {class_id} to mark {status}")
            case["classes"][str(class_id)] = {"status": status, "round": entry.get("round"), "changed": now()}
            if status in ("machine", "rejected"):
                case["complete"] = False

    def add_prediction(
        self,
        case_id: str,
        labels: np.ndarray,
        round_: int,
        uncertainty: CaseUncertainty | None = None,
    ) -> int | None:
        """Merge a model round's pseudo-label into a case without touching human labels.

        Voxels of accepted/corrected classes stay as they are and the machine cannot add
        voxels of those classes elsewhere (they become background); other voxels take
        the machine's label. Machine classes get ``status=machine`` and this round;
        rejected classes the machine predicts again become ``machine`` (a new proposal).
        A complete case is left unchanged.

        Args:
            case_id: the case.
            labels: the pseudo-label in the case image's voxel grid.
            round_: the model round that produced it.
            uncertainty: its uncertainty, stored for the review queue.

        Returns:
            The new version number, or None if the case is complete (nothing written).
        """
        labels, affine = self._checked_labels(case_id, labels)
        with self._change():
            return self._add_prediction(case_id, labels, affine, round_, uncertainty)

    def _add_prediction(
        self, case_id: str, labels: np.ndarray, affine: np.ndarray, round_: int,
        uncertainty: CaseUncertainty | None,
    ) -> int | None:
        case = self._case(case_id)
        if uncertainty is not None:
            case["uncertainty"] = uncertainty.to_dict()
        if case["complete"]:
            return None
        human = self.human_classes(case_id)
        merged = labels.copy()
        if human:
            previous = self.current_labels(case_id)
            merged[np.isin(merged, human)] = 0
            if previous is not None:
                keep = np.isin(previous, human)
                merged[keep] = previous[keep]
        stamp = now()
        classes = {str(c): case["classes"][str(c)] for c in human}
        for class_id, entry in case["classes"].items():
            if entry["status"] == "rejected" and not (merged == int(class_id)).any():
                classes[class_id] = entry
        for class_id in (int(v) for v in np.unique(merged) if v != 0):
            if class_id not in human:
                classes[str(class_id)] = {"status": "machine", "round": int(round_), "changed": stamp}
        self._write_version(case_id, merged, affine, "machine", int(round_))
        case["classes"] = classes
        return case["versions"][-1]["version"]

    def uncertainty(self, case_id: str) -> CaseUncertainty | None:
        """The stored uncertainty of the case's latest pseudo-label, or None."""
        data = self._case(case_id).get("uncertainty")
        return None if data is None else CaseUncertainty.from_dict(data)

    # ----- rounds ----------------------------------------------------------------------

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """Records of the refinement rounds, oldest first."""
        return self.manifest["rounds"]

    @property
    def current_round(self) -> int:
        """Number of the last round, 0 before the first."""
        return max((r["round"] for r in self.rounds), default=0)

    def add_round(self, record: Mapping[str, Any]) -> None:
        """Record a finished round (``round``, ``run``, ``trained_on``, ``metrics``)."""
        with self._change():
            self.manifest["rounds"].append({"created": now(), **record})

    def labeled_for_training(self) -> list[tuple[str, tuple[int, ...] | None]]:
        """Training cases a human labeled: ``(case id, painted classes or None)``.

        ``None`` means the mask is complete; otherwise the accepted/corrected classes are
        the painted classes of a partial mask (everything else unknown).
        """
        result = []
        for case_id in self.case_ids("train"):
            human = self.human_classes(case_id)
            if self.is_complete(case_id):
                result.append((case_id, None))
            elif human:
                result.append((case_id, tuple(sorted(human))))
        return result

    def unreviewed(self) -> list[str]:
        """Training cases whose mask is not complete (they get the next pseudo-labels)."""
        return [c for c in self.case_ids("train") if not self.is_complete(c)]

    # ----- export ----------------------------------------------------------------------

    def export(self, out: str | Path, include_machine: bool = True) -> list[Path]:
        """Write the final labels in MRSpineSeg layout (``MR/``, ``Mask/``).

        Each labeled case's image is copied to ``MR/Case<N>.nii.gz`` and its latest
        labels, with rejected classes (and, if ``include_machine`` is False, machine
        classes) set to background, to ``Mask/mask_case<N>.nii.gz`` in the image's own
        geometry. ``N`` is the number in the case id when every id is like ``Case12``,
        otherwise the case's position (1-based). Masks that are not complete get a
        partial-label sidecar listing their human classes. ``export.json`` maps each
        exported name to its case id. Everything is checked before the first file is
        written.

        Returns:
            The mask files written.

        Raises:
            CPS4Error: ``out`` already holds an export, two case ids give one file name
                (``Case1`` and ``Case01``), or a label version no longer lies on its
                image's grid (the image was replaced).
        """
        from cps4_engine.data import write_label_status

        out = Path(out)
        if (out / "export.json").exists():
            raise CPS4Error("already holds an export; choose an empty folder", path=out)
        self.reload()
        ids = [c for c in self.case_ids() if self._case(c)["versions"]]
        numbers = [re.fullmatch(r"case[_-]?(\d+)", c, flags=re.IGNORECASE) for c in self.case_ids()]
        by_id = (
            {c: int(m.group(1)) for c, m in zip(self.case_ids(), numbers)}
            if all(numbers) else {c: i + 1 for i, c in enumerate(self.case_ids())}
        )
        owners: dict[int, list[str]] = {}
        for case_id in self.case_ids():
            owners.setdefault(by_id[case_id], []).append(case_id)
        clashes = [names for names in owners.values() if len(names) > 1]
        if clashes:
            shown = "; ".join(" and ".join(repr(n) for n in names) + f" both become Case{by_id[names[0]]}"
                              for names in clashes[:3])
            raise CPS4Error(f"cannot export: case ids collide ({shown}); rename the cases", path=self.root)
        for case_id in ids:
            check_same_grid(self.image_path(case_id), self.version_path(case_id), what="label version")
        written, mapping = [], {}
        for case_id in ids:
            number = by_id[case_id]
            labels = self.current_labels(case_id)
            affine = Grid.of(self.image_path(case_id)).affine
            statuses = self.class_statuses(case_id)
            dropped = [c for c, s in statuses.items() if s.status == "rejected"
                       or (s.status == "machine" and not include_machine)]
            labels = np.where(np.isin(labels, dropped), 0, labels).astype(labels.dtype)
            source_image = self.image_path(case_id)
            image_out, mask_out = mrspineseg_case_paths(out, number, image_extension(source_image))
            image_out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(image_out) as tmp:
                shutil.copyfile(source_image, tmp)
            write_volume(mask_out, labels, affine)
            complete = self.is_complete(case_id) and not dropped
            if not complete:
                write_label_status(mask_out, painted=self.human_classes(case_id), complete=False)
            written.append(mask_out)
            mapping[f"Case{number}"] = {"case_id": case_id, "complete": complete}
        write_text_atomic(out / "export.json", json.dumps(mapping, indent=1))
        return written
