"""How long the Qt event loop was blocked: the recorder the viewer responsiveness tests share."""

from __future__ import annotations

import time

from qtpy.QtCore import QTimer


class GapRecorder:
    """A 10 ms QTimer on the GUI thread; the longest gap between its ticks is how long the
    event loop was blocked, and ``longest_after_s`` when that gap began (from construction)."""

    def __init__(self) -> None:
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.last: float | None = None
        self.longest_s = 0.0
        self.longest_after_s = 0.0
        self.started = time.perf_counter()
        self.ticks = 0

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None and now - self.last > self.longest_s:
            self.longest_s = now - self.last
            self.longest_after_s = self.last - self.started
        self.last = now
        self.ticks += 1

    def stop_at_end(self, event) -> None:
        """Stop measuring when the trainer reports its last event (training is over)."""
        if event.kind in ("end", "cancelled"):
            self.stop()

    def start(self) -> None:
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()
