"""The event/callback interface shared by every trainer.

Trainers are generators: ``iter_*`` functions yield :class:`TrainEvent` objects and
check a :class:`CancelToken` between steps. The CLI turns events into a tqdm bar, the
napari widgets into progress, a live plot and layers. :func:`run_with_callback` drives a
generator for callers that prefer a callback.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

EventKind = Literal["start", "step", "validation", "checkpoint", "end", "cancelled"]


@dataclass
class TrainEvent:
    """One report from a trainer.

    Attributes:
        kind: what happened: ``start``, ``step``, ``validation``, ``checkpoint``,
            ``end`` or ``cancelled``.
        step: optimiser steps done so far.
        max_steps: planned number of steps.
        losses: loss parts of this step by name (``total`` among them), floats.
        metrics: validation metrics by name (e.g. ``dice``), floats in [0, 1].
        eta_s: estimated seconds left, or None before the first step.
        path: file written (checkpoint events) or the run folder (end events).
        message: a short human-readable line.
    """

    kind: EventKind
    step: int = 0
    max_steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    eta_s: float | None = None
    path: str | None = None
    message: str = ""


class CancelToken:
    """A thread-safe flag a GUI or signal handler sets and a trainer polls each step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def run_with_callback(
    events: Iterator[TrainEvent], callback: Callable[[TrainEvent], None] | None = None
) -> TrainEvent | None:
    """Exhaust a trainer's event generator, passing each event to ``callback``.

    Returns the last event (``end`` or ``cancelled``), or None if nothing was yielded.
    """
    last = None
    for event in events:
        if callback is not None:
            callback(event)
        last = event
    return last
