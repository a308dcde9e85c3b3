"""A live training-curve plot for the dock: loss per step and validation Dice."""

from __future__ import annotations

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure


class CurvePlot(FigureCanvasQTAgg):
    """Total loss (left axis) and validation Dice (right axis, 0–1) by step."""

    def __init__(self, width_in: float = 4.0, height_in: float = 2.4) -> None:
        figure = Figure(figsize=(width_in, height_in), tight_layout=True)
        super().__init__(figure)
        self.loss_axes = figure.add_subplot(1, 1, 1)
        self.dice_axes = self.loss_axes.twinx()
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.dice_steps: list[int] = []
        self.dice: list[float] = []
        self._loss_line = None
        self._dice_line = None
        self.reset("")

    def reset(self, title: str) -> None:
        """Clear both curves and set the plot title (e.g. the stage being trained)."""
        self.steps.clear()
        self.losses.clear()
        self.dice_steps.clear()
        self.dice.clear()
        self.loss_axes.clear()
        self.dice_axes.clear()
        self.loss_axes.set_title(title, fontsize=9)
        self.loss_axes.set_xlabel("step", fontsize=8)
        self.loss_axes.set_ylabel("loss", fontsize=8, color="tab:blue")
        self.dice_axes.set_ylabel("validation Dice", fontsize=8, color="tab:orange")
        self.dice_axes.set_ylim(0.0, 1.0)
        for axes in (self.loss_axes, self.dice_axes):
            axes.tick_params(labelsize=7)
        (self._loss_line,) = self.loss_axes.plot([], [], color="tab:blue", linewidth=1.0)
        (self._dice_line,) = self.dice_axes.plot([], [], "o-", color="tab:orange", markersize=3)
        self.draw_idle()

    def add_loss(self, step: int, loss: float) -> None:
        """Append one step's total loss and redraw when Qt is idle."""
        self.steps.append(step)
        self.losses.append(loss)
        self._loss_line.set_data(self.steps, self.losses)
        self.loss_axes.relim()
        self.loss_axes.autoscale_view()
        self.draw_idle()

    def add_dice(self, step: int, dice: float) -> None:
        """Append one validation Dice (fraction in [0, 1]) and redraw when Qt is idle."""
        self.dice_steps.append(step)
        self.dice.append(dice)
        self._dice_line.set_data(self.dice_steps, self.dice)
        self.dice_axes.set_xlim(self.loss_axes.get_xlim())
        self.draw_idle()
