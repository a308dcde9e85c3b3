"""The progress bar that ``cps4 pretrain`` and ``cps4 train`` print while training.

The module name does not start with ``cmd_``, so the command discovery in
:mod:`cps4_engine.cli` does not take it for a sub-command.
"""

from __future__ import annotations

import signal
from typing import Iterable

from cps4_engine.events import CancelToken, TrainEvent


def print_training_progress(
    events: Iterable[TrainEvent],
    cancel: CancelToken,
    description: str,
    shown_losses: tuple[str, ...] | None = None,
) -> int:
    """Follow a training run's events with a tqdm bar; Ctrl-C cancels ``cancel``.

    Args:
        events: the run's events (``start``, ``step``, ``validation``, ``cancelled``, ``end``).
        cancel: the token the run watches; SIGINT sets it while the events are consumed.
        description: the bar's label, e.g. ``"stage 1"``.
        shown_losses: the loss parts shown next to the bar; None shows them all.

    Returns:
        0 when the run finished, 130 when it was cancelled.
    """
    from tqdm import tqdm

    previous_handler = signal.signal(signal.SIGINT, lambda *_: cancel.cancel())
    bar = None
    status = 0
    try:
        for event in events:
            if event.kind == "start":
                print(event.message)
                bar = tqdm(total=event.max_steps, initial=event.step, desc=description, unit="step")
            elif event.kind == "step" and bar is not None:
                bar.update(event.step - bar.n)
                bar.set_postfix({key: f"{value:.3f}" for key, value in event.losses.items()
                                 if shown_losses is None or key in shown_losses})
            elif event.kind == "validation" and bar is not None:
                bar.write(f"step {event.step}: {event.message}")
            elif event.kind == "cancelled":
                status = 130
                if not event.message:
                    continue
                if bar is not None:
                    bar.write(event.message)
                else:
                    print(event.message)
            elif event.kind == "end":
                if bar is not None:
                    bar.close()
                    bar = None
                print(event.message)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if bar is not None:
            bar.close()
    return status
