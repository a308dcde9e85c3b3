"""Weights, run configurations and resumable training state, without pickle.

- Weights are safetensors files (:func:`save_weights`, :func:`load_weights`).
- A run folder's ``config.json`` records the stage, the scheme, the preset and the library
  versions (:func:`write_run_config`); :func:`read_run_config` checks a folder is the run
  a caller expects.
- The training state needed to resume (optimiser, AMP scaler, step, random number
  generators) is one safetensors file whose tensors are the optimiser's flattened state
  and the generators' states, and whose header metadata holds the rest as JSON
  (:func:`save_training_state`, :func:`load_training_state`).

Every file is written atomically: to a temporary file in the same folder, then renamed.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from cps4_engine import __version__
from cps4_engine.errors import CPS4Error
from cps4_engine.io import write_bytes_atomic

CONFIG_NAME = "config.json"
_STATE_KEY = "cps4_training_state"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CPS4Error("weights file not found", path=path)
    data = path.read_bytes()
    try:
        tensors = load_safetensors_bytes(data)
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CPS4Error(f"not a readable safetensors file ({error})", path=path) from None
    return tensors, metadata


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write a model's ``state_dict`` to a safetensors file, atomically.

    Args:
        path: destination file (``.safetensors``).
        state_dict: parameter and buffer tensors by name; copied to CPU (tensors that
            share storage are stored separately).
        metadata: optional string pairs stored in the file's header.

    Returns:
        The path written.
    """
    path = Path(path)
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()}
    write_bytes_atomic(path, save_safetensors_bytes(tensors, metadata=metadata))
    return path


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors weights file into a ``state_dict`` on ``device``.

    Raises:
        CPS4Error: the file is missing or not a safetensors file.
    """
    tensors, _ = _read_safetensors(Path(path))
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def library_versions() -> dict[str, str]:
    """Versions of the libraries a run's numbers depend on."""
    versions = {"cps4": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for package in ("monai", "transformers", "numpy", "safetensors"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def write_json_atomically(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path``, atomically."""
    path = Path(path)
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    return path


def write_run_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write ``run_dir/config.json`` with ``config`` plus a ``versions`` entry.

    Args:
        run_dir: the run folder (created if missing).
        config: JSON-ready settings; must include ``"stage"`` (1 or 2).

    Returns:
        The path of ``config.json``.
    """
    if "stage" not in config:
        raise ValueError("a run configuration needs a 'stage' entry")
    payload = dict(config)
    payload["versions"] = library_versions()
    return write_json_atomically(Path(run_dir) / CONFIG_NAME, payload)


def _scheme_name(scheme: Any) -> str | None:
    if scheme is None:
        return None
    if isinstance(scheme, str):
        return scheme
    if isinstance(scheme, dict):
        return scheme.get("name")
    return getattr(scheme, "name", None)


def read_run_config(run_dir: str | Path, stage: int, scheme: Any = None) -> dict[str, Any]:
    """Read ``run_dir/config.json`` and check it belongs to a stage-``stage`` run.

    Args:
        run_dir: the run folder.
        stage: the stage the caller needs (1 or 2).
        scheme: if given, the label scheme (its name, a ``LabelScheme`` or its dict) the
            run must have been trained for.

    Raises:
        CPS4Error: the folder is missing, has no readable config, is another stage's run,
            or was trained for another scheme.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CPS4Error("run folder not found", path=run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise CPS4Error(f"not a stage-{stage} run folder (no {CONFIG_NAME})", path=run_dir)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CPS4Error(f"unreadable run configuration ({error.__class__.__name__})", path=config_path) from None
    if not isinstance(config, dict) or config.get("stage") != stage:
        found = config.get("stage") if isinstance(config, dict) else None
        detail = f"it is a stage-{found} run" if found is not None else "no stage recorded"
        raise CPS4Error(f"not a stage-{stage} run folder ({detail})", path=run_dir)
    wanted, trained = _scheme_name(scheme), _scheme_name(config.get("scheme"))
    if wanted is not None and trained != wanted:
        raise CPS4Error(f"trained for scheme {trained}, not {wanted}", path=run_dir)
    return config


def _split_value(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-ready form of ``value``: tensors move to ``tensors`` under ``key``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": key}
    if isinstance(value, dict):
        return {"__dict__": [[_split_value(k, f"{key}.k{i}", tensors), _split_value(v, f"{key}.{i}", tensors)] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        items = [_split_value(item, f"{key}.{i}", tensors) for i, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a training state")


def _join_value(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_split_value`."""
    if isinstance(value, list):
        return [_join_value(item, tensors) for item in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        if "__tuple__" in value:
            return tuple(_join_value(item, tensors) for item in value["__tuple__"])
        if "__dict__" in value:
            return {_join_value(k, tensors): _join_value(v, tensors) for k, v in value["__dict__"]}
    return value


def _random_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_random_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(
    path: str | Path,
    step: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save what resuming a run needs as one safetensors file, atomically.

    The optimiser's state dict is flattened: its tensors (moments, step counters) become
    safetensors entries, everything else (hyper-parameters, parameter groups) JSON in the
    file's header, together with ``step``, the AMP scaler's state, the global random
    number generators (Python, NumPy, torch, CUDA) and the named ``generators``.

    Args:
        path: destination file (e.g. ``run/train_state.safetensors``).
        step: optimiser steps done.
        optimizer: the optimiser to save.
        scaler: the AMP gradient scaler, if one is used.
        generators: named ``torch.Generator`` objects the trainer draws from (e.g. the
            batch sampler's).
        extra: JSON-ready values the trainer needs back (e.g. the best validation score).

    Returns:
        The path written.
    """
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "step": int(step),
        "optimizer": _split_value(optimizer.state_dict(), "optimizer", tensors),
        "scaler": _split_value(scaler.state_dict(), "scaler", tensors) if scaler is not None else None,
        "random": _split_value(_random_states(), "random", tensors),
        "generators": {name: _split_value(generator.get_state(), f"generator.{name}", tensors) for name, generator in (generators or {}).items()},
        "extra": extra or {},
    }
    payload = save_safetensors_bytes(tensors, metadata={_STATE_KEY: json.dumps(state)})
    path = Path(path)
    write_bytes_atomic(path, payload)
    return path


def load_training_state(
    path: str | Path,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore a state written by :func:`save_training_state` in place.

    Loads the optimiser (and scaler) state, resets the global random number generators
    and the named ``generators``.

    Returns:
        ``(step, extra)``: the steps done and the trainer's extra values.

    Raises:
        CPS4Error: the file is missing, unreadable, or not a training state of a matching
            optimiser.
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    if _STATE_KEY not in metadata:
        raise CPS4Error("not a cps4 training state file", path=path)
    state = json.loads(metadata[_STATE_KEY])
    try:
        optimizer.load_state_dict(_join_value(state["optimizer"], tensors))
    except (ValueError, KeyError) as error:
        raise CPS4Error(f"training state does not match this model's optimiser ({error})", path=path) from None
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(_join_value(state["scaler"], tensors))
    _restore_random_states(_join_value(state["random"], tensors))
    for name, generator in (generators or {}).items():
        if name in state["generators"]:
            generator.set_state(_join_value(state["generators"][name], tensors))
    return int(state["step"]), state.get("extra", {})
