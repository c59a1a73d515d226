"""Small line charts as inline SVG, for HTML reports that must open with no network and no plotting library.

A chart is drawn from plain numbers: lines, shaded bands between two lines, dots and labelled
reference lines, over a linear x axis and a linear or base-10 log y axis. Colours and strokes come
from CSS classes that the page styles (``line``, ``band``, ``dot``, ``ref`` plus the caller's own),
so one stylesheet serves every chart on a page. Pure string building: no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

__all__ = ["Chart", "Line", "Ref", "chart_svg"]

_WIDTH, _HEIGHT = 320, 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 10, 22, 34  # margins for tick labels, axis labels and the title
_FLOOR_DECADES = 10  # a log axis spans at most this many decades below its top: exact zeros sit on the floor

Point = tuple[float, float]


@dataclass(frozen=True)
class Line:
    """A polyline (``css``: its class), or with ``upper`` a band filled between ``points`` and ``upper``."""

    points: Sequence[Point]
    css: str
    upper: Sequence[Point] | None = None


@dataclass(frozen=True)
class Ref:
    """A dashed reference line across the plot at x = ``at`` (``vertical``) or y = ``at``, with a label."""

    at: float
    vertical: bool
    label: str
    css: str
    data: dict[str, str] = field(default_factory=dict)  # data-* attributes, for scripts and tests


@dataclass(frozen=True)
class Chart:
    title: str
    x_label: str
    y_label: str
    x_range: tuple[float, float]
    y_range: tuple[float, float] | None = None  # None: from the data
    log_y: bool = False
    lines: list[Line] = field(default_factory=list)
    dots: list[tuple[Point, str]] = field(default_factory=list)  # (point, class)
    refs: list[Ref] = field(default_factory=list)


def chart_svg(chart: Chart) -> str:
    """The chart as one ``<svg>`` element, scaled to its container's width."""
    y_lo, y_hi = chart.y_range or _data_range(chart)
    if chart.log_y:
        y_lo, y_hi = math.floor(math.log10(y_lo)), math.ceil(math.log10(y_hi))
        y_hi += y_hi == y_lo
    x_lo, x_hi = chart.x_range
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def sx(x: float) -> float:
        return _LEFT + (x - x_lo) / ((x_hi - x_lo) or 1) * plot_w

    def sy(y: float) -> float:
        value = math.log10(max(y, 10.0**y_lo)) if chart.log_y else y
        return _TOP + (1 - (min(value, y_hi) - y_lo) / ((y_hi - y_lo) or 1)) * plot_h

    def path(points: Sequence[Point]) -> str:
        return " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)

    parts = [f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" '
             f'aria-label="{escape(chart.title)}">',
             f'<text class="title" x="{_LEFT}" y="14">{escape(chart.title)}</text>',
             f'<rect class="frame" x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}"/>']
    for x in _ticks(x_lo, x_hi, integer=True):
        parts.append(f'<text class="tick" x="{sx(x):.1f}" y="{_TOP + plot_h + 12}" text-anchor="middle">{x:g}</text>')
    for y in _ticks(y_lo, y_hi, integer=chart.log_y):
        y_at = _TOP + (1 - (y - y_lo) / ((y_hi - y_lo) or 1)) * plot_h
        text = f"1e{y:g}" if chart.log_y else f"{y:g}"
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y_at:.1f}" y2="{y_at:.1f}"/>'
                     f'<text class="tick" x="{_LEFT - 4}" y="{y_at + 3:.1f}" text-anchor="end">{text}</text>')
    parts.append(f'<text class="axis" x="{_LEFT + plot_w / 2}" y="{_HEIGHT - 4}" text-anchor="middle">'
                 f'{escape(chart.x_label)}</text>')
    parts.append(f'<text class="axis" transform="translate(11 {_TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 f'{escape(chart.y_label)}</text>')
    for line in chart.lines:
        if line.upper is not None:
            outline = path([*line.points, *reversed(line.upper)])
            parts.append(f'<polygon class="band {line.css}" points="{outline}"/>')
        elif line.points:
            parts.append(f'<polyline class="line {line.css}" points="{path(line.points)}"/>')
    for (x, y), css in chart.dots:
        parts.append(f'<circle class="dot {css}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2"/>')
    for ref in chart.refs:
        data = "".join(f' data-{key}="{escape(value)}"' for key, value in ref.data.items())
        if ref.vertical:
            x = sx(ref.at)
            parts.append(f'<g class="ref {ref.css}"{data}><line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_TOP + plot_h}"/>'
                         f'<text x="{x + 3:.1f}" y="{_TOP + 10}">{escape(ref.label)}</text></g>')
        else:
            y = sy(ref.at)
            parts.append(f'<g class="ref {ref.css}"{data}><line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
                         f'<text x="{_LEFT + plot_w - 3}" y="{y - 3:.1f}" text-anchor="end">{escape(ref.label)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _data_range(chart: Chart) -> tuple[float, float]:
    """The y range of everything drawn; on a log axis only the positive values, at most
    ``_FLOOR_DECADES`` below the largest."""
    ys = [y for line in chart.lines for _, y in [*line.points, *(line.upper or ())]]
    ys += [y for (_, y), _ in chart.dots] + [r.at for r in chart.refs if not r.vertical]
    if chart.log_y:
        positive = [y for y in ys if y > 0]
        if not positive:
            return 0.1, 1.0
        top = max(positive)
        return max(min(positive), top * 10.0**-_FLOOR_DECADES), top
    return (min(ys), max(ys)) if ys else (0.0, 1.0)


def _ticks(lo: float, hi: float, *, integer: bool, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) within [lo, hi]; whole numbers with ``integer``."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
