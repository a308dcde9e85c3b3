"""The choices and defaults that the command line and the napari docks offer, defined once.

Methods, size presets, devices and the defaults of the training commands. Importing this
module does not import torch (the command line builds its parsers from it at start-up);
:func:`device_choices` asks torch which devices this machine has.
"""

from __future__ import annotations

from typing import Sequence

from cps4_engine.errors import CPS4Error
from cps4_engine.presets import PRESET_NAMES, get_preset

METHODS: tuple[str, ...] = ("supervised", "mean-teacher", "unimatch", "cps4")
DEFAULT_METHOD = "cps4"
# A refinement round retrains from human corrections; CPS4 would also need a stage-1 run.
DEFAULT_ROUND_METHOD = "mean-teacher"
# The semi-supervised method CPS4's fused pseudo-labels are trained with (``--base``).
BASES: tuple[str, ...] = ("mean-teacher", "unimatch")
DEFAULT_BASE = "mean-teacher"
PSEUDO_LABELS: tuple[str, ...] = ("teacher", "prompt", "fused")
# How each class map's weight in fused pseudo-labels is set (cps4_engine.fusion.class_weights);
# None picks "reliability" when the stage-1 run recorded class_reliability.json, else "global".
PROMPT_WEIGHTINGS: tuple[str, ...] = ("global", "reliability")
# The only pseudo-label source whose class maps are weighted (the others take no weighting).
WEIGHTED_PSEUDO_LABEL = "fused"
# Share of the decoder's input channels dropped in UniMatch's feature-perturbed view (its value).
DEFAULT_FEATURE_DROPOUT = 0.5

PRESETS: tuple[str, ...] = PRESET_NAMES
DEFAULT_PRESET = "cpu"

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
DEFAULT_DEVICE = "auto"

DEFAULT_LABELED = 2
DEFAULT_VALIDATION = 0.1

# Prediction can average the network over copies of each slice moved along the spine by
# fractions of the slice height (cps4_engine.inference.predict_slices; training moves the view
# by up to 25 %). Off by default: on the dev volumes of four 2-labeled vb3 runs, 0 and ±10 %
# raised Dice from 0.736 to 0.753 once the level step named the smaller sacrum pieces they
# leave (cps4_engine.levels.SACRUM_PIECE_SIZE), but on the test volumes the gain did not
# hold (2 labeled 0.802 either way; full supervision 0.872 -> 0.866, an L1 painted in part
# shrank from the view's edge and was dropped): BENCHMARKS, fifteenth session.
DEFAULT_TEST_TIME_SHIFTS: tuple[float, ...] = (0.0,)
# A copy moved by half the slice or more loses half of it.
MAX_TEST_TIME_SHIFT = 0.5


def default_steps(preset: str, stage: int) -> int:
    """The preset's default number of optimiser steps for stage 1 or stage 2.

    Raises:
        CPS4Error: unknown preset, or a stage other than 1 and 2.
    """
    if stage not in (1, 2):
        raise CPS4Error(f"stage must be 1 or 2, got {stage!r}")
    settings = get_preset(preset)
    return settings.max_steps if stage == 1 else settings.stage2_max_steps


def check_test_time_shifts(shifts: Sequence[float]) -> None:
    """Raise a one-line error unless ``shifts`` is a non-empty list of fractions in (-0.5, 0.5).

    Raises:
        CPS4Error: no shift, or one whose size is :data:`MAX_TEST_TIME_SHIFT` or more.
    """
    if len(shifts) == 0:
        raise CPS4Error("--test-time-shifts needs at least one shift (0 is one plain pass)")
    outside = [shift for shift in shifts if not abs(float(shift)) < MAX_TEST_TIME_SHIFT]
    if outside:
        raise CPS4Error(
            f"--test-time-shifts {outside[0]} is out of range; each shift is a fraction of the slice "
            f"height between -{MAX_TEST_TIME_SHIFT} and {MAX_TEST_TIME_SHIFT}"
        )


def parse_test_time_shifts(text: str) -> tuple[float, ...]:
    """``"0,-0.1,0.1"`` -> ``(0.0, -0.1, 0.1)``, checked (:func:`check_test_time_shifts`).

    Raises:
        CPS4Error: a part that is not a number, or shifts out of range.
    """
    try:
        shifts = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise CPS4Error(f"--test-time-shifts {text!r} is not a comma-separated list of numbers") from None
    check_test_time_shifts(shifts)
    return shifts


def device_choices() -> list[str]:
    """``auto`` and the devices this machine has, best first (``cuda``/``mps`` only when present)."""
    # Imported here: torch takes seconds to import and the command line must start fast.
    from cps4_engine.device import available_devices

    return [DEFAULT_DEVICE, *available_devices()]
