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
import math
import platform
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from cps4_engine import __version__
from cps4_engine.errors import CPS4Error
from cps4_engine.io import write_bytes_atomic

CONFIG_NAME = "config.json"
HISTORY_NAME = "history.json"
STATE_NAME = "train_state.safetensors"
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
        CPS4Error: the file is missing or not a safetensors file, or a weight is NaN or
            infinite (it would turn every prediction and confidence map into NaN).
    """
    tensors, _ = _read_safetensors(Path(path))
    broken = [name for name, tensor in tensors.items()
              if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise CPS4Error(f"weights hold NaN or infinite values ({len(broken)} tensors, e.g. {broken[0]})", path=path)
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(low: int, high: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and low <= v <= high), f"an integer from {low} to {high}"


def _float_in(low: float, high: float, *, above_low: bool = False) -> tuple[Callable[[Any], bool], str]:
    def check(value: Any) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return False
        return (value > low if above_low else value >= low) and value <= high

    return check, f"a finite number {'above' if above_low else 'from'} {low:g} {'and at most' if above_low else 'to'} {high:g}"


def _int_list(min_length: int, max_length: int, low: int, high: int) -> tuple[Callable[[Any], bool], str]:
    def check(value: Any) -> bool:
        return (isinstance(value, list) and min_length <= len(value) <= max_length
                and all(_is_int(v) and low <= v <= high for v in value))

    count = str(min_length) if min_length == max_length else f"{min_length}-{max_length}"
    return check, f"a list of {count} integers from {low} to {high}"


def _one_of(*names: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in names), "one of " + ", ".join(names)


_BOOL = ((lambda v: isinstance(v, bool)), "true or false")
_SLICE_SIZE = _int_list(2, 2, 8, 4096)
_CHANNELS = _int_list(1, 8, 1, 4096)
# Ranges are generous (the paper preset is far inside them) but bounded: a run folder is
# user input, and num_res_units 1e9 or a 10^6-channel layer would hang or exhaust memory
# before any error.
_PRESET_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "slice_size": _SLICE_SIZE,
    "batch_size": _int_in(1, 4096),
    "learning_rate": _float_in(0.0, 10.0, above_low=True),
    "max_steps": _int_in(1, 10**8),
    "validation_every": _int_in(1, 10**8),
    "image_encoder": _one_of("unet", "unetr"),
    "encoder_channels": _CHANNELS,
    "vit_hidden_size": _int_in(0, 8192),
    "vit_layers": _int_in(0, 64),
    "vit_heads": _int_in(0, 128),
    "vit_mlp_dim": _int_in(0, 32768),
    "patch_size": _int_in(0, 512),
    "unetr_feature_size": _int_in(0, 1024),
    "embed_dim": _int_in(1, 8192),
    "text_max_length": _int_in(1, 4096),
    "seg_channels": _CHANNELS,
    "stage2_batch_size": _int_in(1, 4096),
    "stage2_learning_rate": _float_in(0.0, 10.0, above_low=True),
    "stage2_max_steps": _int_in(1, 10**8),
    "encoder_res_units": _int_in(0, 8),
    "keep_aspect": _BOOL,
    "context_slices": _int_in(0, 16),
    "fov_shift": _float_in(0.0, 1.0),
    "labeled_strong": _BOOL,
    "weak_zoom": _float_in(0.0, 0.9),
    "weak_rotation": _float_in(0.0, 180.0),
}
_SEGMENTER_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "in_channels": _int_in(1, 64),
    "out_channels": _int_in(2, 1024),
    "channels": _CHANNELS,
    "strides": _int_list(0, 7, 1, 8),
    "num_res_units": _int_in(0, 8),
    "norm": ((lambda v: isinstance(v, str) and 0 < len(v) < 40), "a normalisation name"),
    "dropout": ((lambda v: _float_in(0.0, 1.0)[0](v) and v < 1.0), "a finite number from 0 to below 1"),
    "slice_size": _SLICE_SIZE,
    "context_slices": _int_in(0, 16),
    "keep_aspect": _BOOL,
}
_RUN_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_steps": _int_in(1, 10**8),
    "batch_size": _int_in(1, 4096),
    "learning_rate": _float_in(0.0, 10.0, above_low=True),
    "validation_every": _int_in(1, 10**8),
}
#: Deeper JSON than this is not a run configuration (and would exhaust the recursion
#: of the code that walks it).
MAX_CONFIG_DEPTH = 12


def _depth(value: Any) -> int:
    stack, deepest = [(value, 1)], 0
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_CONFIG_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, level + 1) for child in children)
    return deepest


def _check_section(section: Any, schema: dict, where: str, path: Path) -> None:
    if not isinstance(section, dict):
        raise CPS4Error(f"'{where}' must be an object, not {type(section).__name__}", path=path)
    for key, (check, description) in schema.items():
        if key in section and not check(section[key]):
            shown = json.dumps(section[key])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise CPS4Error(f"'{where}.{key}' is {shown}; it must be {description}", path=path)


def _check_run_schema(config: dict[str, Any], path: Path) -> None:
    """Refuse a tampered ``config.json`` before any network is built from it."""
    if _depth(config) > MAX_CONFIG_DEPTH:
        raise CPS4Error(f"nested more than {MAX_CONFIG_DEPTH} levels deep; not a run configuration", path=path)
    _check_section(config, _RUN_SCHEMA, "run", path)
    scheme = config.get("scheme")
    if scheme is not None and not isinstance(scheme, (str, dict)):
        raise CPS4Error("'scheme' must be a scheme name or object", path=path)
    classes = scheme.get("classes") if isinstance(scheme, dict) else None
    if isinstance(scheme, dict) and "classes" in scheme and (not isinstance(classes, list) or not 2 <= len(classes) <= 1024):
        raise CPS4Error("'scheme.classes' must list 2 to 1024 classes", path=path)
    if "preset" in config:
        _check_section(config["preset"], _PRESET_SCHEMA, "preset", path)
    if "preprocessing" in config:
        _check_section(config["preprocessing"], {"slice_size": _SLICE_SIZE, "context_slices": _int_in(0, 16)},
                       "preprocessing", path)
    segmenter = config.get("segmenter")
    if segmenter is None:
        return
    _check_section(segmenter, _SEGMENTER_SCHEMA, "segmenter", path)
    strides, channels = segmenter.get("strides", []), segmenter.get("channels", [])
    if len(strides) != len(channels) - 1:
        raise CPS4Error(f"'segmenter.strides' needs {len(channels) - 1} entries, one between each of the "
                        f"{len(channels)} channel levels, not {len(strides)}", path=path)
    factor = math.prod(strides)
    if any(size % factor for size in segmenter.get("slice_size", [])):
        raise CPS4Error(f"'segmenter.slice_size' {segmenter['slice_size']} is not divisible by {factor}, "
                        "the product of its strides", path=path)
    context = segmenter.get("context_slices")
    if context is not None and segmenter.get("in_channels", 1 + 2 * context) != 1 + 2 * context:
        raise CPS4Error(f"'segmenter.in_channels' must be {1 + 2 * context} for {context} context slices "
                        "on each side", path=path)
    if classes is not None and segmenter.get("out_channels", len(classes)) != len(classes):
        raise CPS4Error(f"'segmenter.out_channels' {segmenter['out_channels']} does not match the scheme's "
                        f"{len(classes)} classes", path=path)


def read_history(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Read a run's ``history.json``: ``{"steps": [...], "validation": [...]}``.

    Every entry is an object with an integer ``step``; a missing file is an empty history.

    Raises:
        CPS4Error: unreadable, or not of that shape (e.g. a list).
    """
    path = Path(path)
    if not path.is_file():
        return {"steps": [], "validation": []}
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CPS4Error(f"unreadable training history ({type(error).__name__})", path=path) from None
    if not isinstance(history, dict):
        raise CPS4Error(f"training history must be an object of lists, not a {type(history).__name__}", path=path)
    for key in ("steps", "validation"):
        entries = history.setdefault(key, [])
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and _is_int(e.get("step")) and e["step"] >= 0 for e in entries
        ):
            raise CPS4Error(f"training history '{key}' must be a list of entries with a step number", path=path)
    return history


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file, without reading its tensors."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= min(path.stat().st_size - 8, 100 * 2**20):
                raise ValueError("header length out of range")
            header = json.loads(handle.read(length))
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("metadata is not an object")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError) as error:
        raise CPS4Error(f"not a readable safetensors file ({_short(error)})", path=path) from None
    return metadata


def _check_training_state(path: Path) -> dict[str, Any]:
    metadata = _safetensors_metadata(path)
    if _STATE_KEY not in metadata:
        raise CPS4Error("not a cps4 training state file", path=path)
    try:
        state = json.loads(metadata[_STATE_KEY])
    except (json.JSONDecodeError, RecursionError, TypeError) as error:
        raise CPS4Error(f"training state is damaged ({type(error).__name__})", path=path) from None
    if not isinstance(state, dict) or not _is_int(state.get("step")) or state["step"] < 0:
        raise CPS4Error("training state is damaged (no step count)", path=path)
    for key in ("optimizer", "random"):
        if not isinstance(state.get(key), dict):
            raise CPS4Error(f"training state is damaged (no {key} state)", path=path)
    if not isinstance(state.get("generators", {}), dict) or not isinstance(state.get("extra", {}), dict):
        raise CPS4Error("training state is damaged (generators or extra values malformed)", path=path)
    return state


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) < 100 else text[:97] + "..."


def read_run_config(run_dir: str | Path, stage: int, scheme: Any = None) -> dict[str, Any]:
    """Read ``run_dir/config.json``, check it against the run schema and the caller's needs.

    Before any tensor is built from the run: every configuration value the networks and
    trainers use is checked for type and range (slice sizes, channels, strides, residual
    units, dropout, context slices, learning rates ...), the segmenter's output classes
    against the scheme, and, when present, ``history.json`` and the header of
    ``train_state.safetensors``.

    Args:
        run_dir: the run folder.
        stage: the stage the caller needs (1 or 2).
        scheme: if given, the label scheme (its name, a ``LabelScheme`` or its dict) the
            run must have been trained for.

    Raises:
        CPS4Error: the folder is missing, has no readable config, is another stage's run,
            was trained for another scheme, or holds a value outside the schema; one
            line naming the file and the field.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CPS4Error("run folder not found", path=run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise CPS4Error(f"not a stage-{stage} run folder (no {CONFIG_NAME})", path=run_dir)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise CPS4Error(f"unreadable run configuration ({error.__class__.__name__})", path=config_path) from None
    if not isinstance(config, dict) or config.get("stage") != stage:
        found = config.get("stage") if isinstance(config, dict) else None
        detail = f"it is a stage-{found} run" if found is not None else "no stage recorded"
        raise CPS4Error(f"not a stage-{stage} run folder ({detail})", path=run_dir)
    _check_run_schema(config, config_path)
    wanted, trained = _scheme_name(scheme), _scheme_name(config.get("scheme"))
    if wanted is not None and trained != wanted:
        raise CPS4Error(f"trained for scheme {trained}, not {wanted}", path=run_dir)
    read_history(run_dir / HISTORY_NAME)
    if (run_dir / STATE_NAME).is_file():
        _check_training_state(run_dir / STATE_NAME)
    return config


def check_resume_matches(recorded: dict[str, Any], wanted: dict[str, Any], run_dir: str | Path) -> None:
    """Refuse to resume a run with other settings than it was started with.

    Args:
        recorded: the run's ``config.json`` (from :func:`read_run_config`).
        wanted: the settings of the new invocation that must be equal, by the names
            ``config.json["settings"]`` uses (e.g. ``{"method": "cps4", "preset": "cpu",
            "data": "/data/mr"}``); paths are compared resolved.
        run_dir: the run folder, for the message.

    Raises:
        CPS4Error: one line naming the first setting that differs.
    """
    settings = recorded.get("settings") if isinstance(recorded.get("settings"), dict) else {}
    for key, value in wanted.items():
        before = settings.get(key)
        if key == "preset" and before is None and isinstance(recorded.get("preset"), dict):
            before = recorded["preset"].get("name")
        if isinstance(value, Path) or key in ("data", "vlm"):
            same = before is None and value is None or (
                before is not None and value is not None and Path(before).resolve() == Path(value).resolve())
        else:
            same = before == value
        if not same:
            raise CPS4Error(
                f"was started with {key} {before!r}, not {value!r}; resume with the same settings "
                "or choose another --out",
                path=run_dir,
            )


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


def random_states(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's random number generator states: the global ones (Python, NumPy,
    torch, CUDA) under ``random`` and the named ``generators`` under ``generators``, as
    :func:`save_training_state` takes them for the other ranks of a distributed run."""
    return {"random": _random_states(),
            "generators": {name: generator.get_state() for name, generator in (generators or {}).items()}}


def save_training_state(
    path: str | Path,
    step: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict[str, Any] | None = None,
    other_ranks: dict[int, dict[str, Any]] | None = None,
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
        other_ranks: in a distributed run, :func:`random_states` of every other rank by
            rank, so that each rank resumes its own draws (augmentations, batches,
            dropout) rather than rank 0's.

    Returns:
        The path written.
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks = {
        str(rank): {
            "random": _split_value(states["random"], f"rank{rank}.random", tensors),
            "generators": {name: _split_value(value, f"rank{rank}.generator.{name}", tensors)
                           for name, value in states["generators"].items()},
        }
        for rank, states in (other_ranks or {}).items()
    }
    state = {
        "step": int(step),
        "optimizer": _split_value(optimizer.state_dict(), "optimizer", tensors),
        "scaler": _split_value(scaler.state_dict(), "scaler", tensors) if scaler is not None else None,
        "random": _split_value(_random_states(), "random", tensors),
        "generators": {name: _split_value(generator.get_state(), f"generator.{name}", tensors) for name, generator in (generators or {}).items()},
        "extra": extra or {},
        "ranks": ranks,
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
    rank: int = 0,
) -> tuple[int, dict[str, Any]]:
    """Restore a state written by :func:`save_training_state` in place.

    Loads the optimiser (and scaler) state, resets the global random number generators
    and the named ``generators``: to ``rank``'s states where the file holds them (rank 0,
    or a rank it recorded), otherwise to rank 0's (a state saved by a single process or
    by fewer ranks).

    Returns:
        ``(step, extra)``: the steps done and the trainer's extra values.

    Raises:
        CPS4Error: the file is missing, unreadable, or not a training state of a matching
            optimiser.
    """
    path = Path(path)
    tensors, _ = _read_safetensors(path)
    state = _check_training_state(path)
    try:
        optimizer.load_state_dict(_join_value(state["optimizer"], tensors))
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
        raise CPS4Error(f"training state does not match this model's optimiser ({_short(error)})", path=path) from None
    try:
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(_join_value(state["scaler"], tensors))
        own = state.get("ranks", {}).get(str(rank), state) if rank else state
        _restore_random_states(_join_value(own["random"], tensors))
        for name, generator in (generators or {}).items():
            if name in own.get("generators", {}):
                generator.set_state(_join_value(own["generators"][name], tensors))
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
        raise CPS4Error(f"training state is damaged ({_short(error)})", path=path) from None
    return state["step"], state.get("extra", {})
