"""The docks' curve plot: tick values and what it paints."""

from __future__ import annotations

import pytest

from napari_cps4._plot import ROUND_COLOUR, Axis, CurvePlot, nice_ticks


@pytest.mark.parametrize(
    ("low", "high", "integers", "expected"),
    [
        (0, 1500, False, [0, 500, 1000, 1500]),
        (0, 1, False, [0, 0.5, 1]),
        (0.21, 1.7, False, [0.5, 1, 1.5]),
        (1, 3, False, [1, 1.5, 2, 2.5, 3]),
        (1, 3, True, [1, 2, 3]),
        (2, 2, False, [2]),
    ],
)
def test_ticks_are_round_values_inside_the_range(low, high, integers, expected) -> None:
    assert nice_ticks(low, high, integers=integers) == pytest.approx(expected)


def test_points_replace_and_mismatched_points_are_refused(qtbot) -> None:
    plot = CurvePlot("round", Axis("held-out Dice", ROUND_COLOUR, limits=(0.0, 1.0), markers=True))
    qtbot.addWidget(plot)
    plot.set_points("held-out Dice", [1, 2], [0.5, 0.7])
    plot.add("held-out Dice", 3, 0.75)
    assert plot.points("held-out Dice") == ([1.0, 2.0, 3.0], [0.5, 0.7, 0.75])
    with pytest.raises(ValueError, match="2 x values for 1 y values"):
        plot.set_points("held-out Dice", [1, 2], [0.5])
    plot.reset("")
    assert plot.points("held-out Dice") == ([], [])
