"""Shared fixtures: the real-data folder, thread limits, a small synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _configure_torch_threads() -> None:
    threads = os.environ.get("CPS4_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


_configure_torch_threads()


def realdata_root() -> Path | None:
    """``$CPS4_REALDATA`` or ``../shared/realdata`` beside the project, if present."""
    candidates = [os.environ.get("CPS4_REALDATA"), PROJECT_ROOT.parent / "shared" / "realdata"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "index.json").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real spine MR cases; tests that need them skip with the reason when absent."""
    root = realdata_root()
    if root is None:
        pytest.skip("real spine MR cases not found (set CPS4_REALDATA or provide ../shared/realdata)")
    return root


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny synthetic phantoms (``cps4 synth --cases 4 --seed 0``), MRSpineSeg layout.

    Shared by the whole session: treat it as read-only (copy it before adding masks or
    sidecars).
    """
    from cps4_engine.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic") / "data"
    write_synthetic_dataset(root, cases=4, seed=0)
    return root
