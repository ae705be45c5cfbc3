"""Small server-rendered SVG charts for the monitoring page (no JavaScript, no plotting library).

Each function returns one ``<svg>`` element as text, with a ``<title>`` and an ``aria-label``
for screen readers; every text drawn is escaped. Values are fractions or counts; the y axis
runs from 0 to ``y_max``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 640
HEIGHT = 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 12, 28, 52
#: Colour-blind-safe palette (Okabe and Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
           "#000000")


@dataclass(frozen=True)
class Series:
    """One named series of a chart: a value per category (None: no value)."""

    name: str
    values: tuple[float | None, ...]
    color: str


def _frame(title: str, y_max: float, y_label: str, body: list[str], legend: Sequence[Series],
           categories: Sequence[str], x_step: float) -> str:
    plot_w = WIDTH - _LEFT - _RIGHT
    plot_h = HEIGHT - _TOP - _BOTTOM
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}" '
        'class="chart">',
        f"<title>{escape(title)}</title>",
        f'<text x="{_LEFT}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    for i in range(5):  # horizontal grid and y tick labels
        value = y_max * i / 4
        y = _TOP + plot_h - plot_h * i / 4
        out.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" font-size="10" '
                   f'text-anchor="end">{_tick(value, y_max)}</text>')
    out.append(f'<text x="12" y="{_TOP + plot_h / 2:.1f}" font-size="10" '
               f'transform="rotate(-90 12 {_TOP + plot_h / 2:.1f})" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    out.extend(body)
    every = max(1, len(categories) // 12)  # at most about 12 x labels
    for i, label in enumerate(categories):
        if i % every:
            continue
        x = _LEFT + x_step * (i + 0.5)
        out.append(f'<text x="{x:.1f}" y="{_TOP + plot_h + 14}" font-size="9" '
                   f'text-anchor="middle">{escape(label)}</text>')
    x = _LEFT
    for series in legend:
        y = HEIGHT - 12
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{series.color}"/>')
        out.append(f'<text x="{x + 14}" y="{y}" font-size="10">{escape(series.name)}</text>')
        x += 22 + 6 * len(series.name)
    out.append("</svg>")
    return "".join(out)


def _tick(value: float, y_max: float) -> str:
    return f"{value:.2f}" if y_max <= 1.0 else f"{value:g}"


def _scale(value: float, y_max: float) -> float:
    plot_h = HEIGHT - _TOP - _BOTTOM
    return plot_h * min(max(value, 0.0), y_max) / y_max if y_max > 0 else 0.0


def bar_chart(title: str, categories: Sequence[str], series: Sequence[Series], *,
              y_max: float | None = None, y_label: str = "") -> str:
    """Grouped bars: one group per category, one bar per series.

    Raises
    ------
    ValueError
        A series whose length differs from the categories.
    """
    _check(categories, series)
    top = y_max or max([v for s in series for v in s.values if v is not None] + [1e-9])
    plot_w = WIDTH - _LEFT - _RIGHT
    step = plot_w / max(1, len(categories))
    bar = step * 0.8 / max(1, len(series))
    body = []
    for i in range(len(categories)):
        for k, s in enumerate(series):
            value = s.values[i]
            if value is None:
                continue
            h = _scale(value, top)
            x = _LEFT + step * i + step * 0.1 + bar * k
            y = _TOP + (HEIGHT - _TOP - _BOTTOM) - h
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                        f'fill="{s.color}"><title>{escape(s.name)} {escape(categories[i])}: '
                        f"{value:.3g}</title></rect>")
    return _frame(title, top, y_label, body, series, categories, step)


def stacked_bar_chart(title: str, categories: Sequence[str], series: Sequence[Series], *,
                      y_max: float | None = None, y_label: str = "") -> str:
    """Stacked bars: one bar per category, the series stacked in order.

    Raises
    ------
    ValueError
        A series whose length differs from the categories.
    """
    _check(categories, series)
    totals = [sum(s.values[i] or 0.0 for s in series) for i in range(len(categories))]
    top = y_max or max([*totals, 1e-9])
    plot_w = WIDTH - _LEFT - _RIGHT
    step = plot_w / max(1, len(categories))
    body = []
    base_y = _TOP + (HEIGHT - _TOP - _BOTTOM)
    for i in range(len(categories)):
        y = float(base_y)
        for s in series:
            value = s.values[i] or 0.0
            if value <= 0:
                continue
            h = _scale(value, top)
            y -= h
            body.append(f'<rect x="{_LEFT + step * i + step * 0.1:.1f}" y="{y:.1f}" '
                        f'width="{step * 0.8:.1f}" height="{h:.1f}" fill="{s.color}">'
                        f"<title>{escape(s.name)} {escape(categories[i])}: {value:.3g}</title>"
                        "</rect>")
    return _frame(title, top, y_label, body, series, categories, step)


def line_chart(title: str, categories: Sequence[str], series: Sequence[Series], *,
               y_max: float = 1.0, y_label: str = "",
               reference: tuple[str, float] | None = None) -> str:
    """Lines with points (a None value breaks the line), and an optional dashed reference.

    Raises
    ------
    ValueError
        A series whose length differs from the categories.
    """
    _check(categories, series)
    plot_w = WIDTH - _LEFT - _RIGHT
    step = plot_w / max(1, len(categories))
    base_y = _TOP + (HEIGHT - _TOP - _BOTTOM)
    body = []
    legend = list(series)
    if reference is not None:
        name, level = reference
        y = base_y - _scale(level, y_max)
        body.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                    f'stroke="#777" stroke-dasharray="5 4"><title>{escape(name)}: {level:.3g}'
                    "</title></line>")
        legend.append(Series(name, (), "#777"))
    for s in series:
        points: list[str] = []
        for i, value in enumerate(s.values):
            if value is None:
                if len(points) > 1:
                    body.append(_polyline(points, s.color))
                points = []
                continue
            x = _LEFT + step * (i + 0.5)
            y = base_y - _scale(value, y_max)
            points.append(f"{x:.1f},{y:.1f}")
            body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{s.color}">'
                        f"<title>{escape(s.name)} {escape(categories[i])}: {value:.3g}</title>"
                        "</circle>")
        if len(points) > 1:
            body.append(_polyline(points, s.color))
    return _frame(title, y_max, y_label, body, legend, categories, step)


def _polyline(points: list[str], color: str) -> str:
    return (f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}" '
            'stroke-width="2"/>')


def _check(categories: Sequence[str], series: Sequence[Series]) -> None:
    for s in series:
        if len(s.values) != len(categories):
            raise ValueError(
                f"series {s.name!r} has {len(s.values)} values for {len(categories)} categories"
            )
