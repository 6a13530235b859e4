"""Charts as plain SVG text: line charts (a second y axis, vertical markers) and bar charts.

Hand-written rather than a plotting library's runtime: the page needs no script to draw,
prints as it shows, opens offline, and a chart of a few hundred points is a few kilobytes.
The whole quickstart page is ~0.16 MB; Plotly's bundle alone (plotly.min.js in plotly 7.1.0's
wheel) is 4.8 MB, over the 2 MB budget before any data, and Vega-Lite needs the vega,
vega-lite and vega-embed runtimes inlined (several hundred KB). Hover values come from SVG
`<title>` elements, which every browser shows as a tooltip without JavaScript.

Every function returns a string; colours are CSS classes (`s0`.. `s5`) defined by the page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

# A series with more points than this draws its line through every point but gets no hover dots.
HOVER_POINTS = 600


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    right: bool = False  # on the second (right) y axis
    dots: bool = False  # draw each point as a dot (sparse series: validation loss)
    cls: str = "s0"  # colour class
    fmt: str = "{:.4g}"


@dataclass
class Marker:
    x: float
    label: str  # the whole story, on hover
    cls: str = "mk"
    short: str = ""  # drawn beside the line (default: the label)


@dataclass
class Axes:
    x0: float
    x1: float
    y0: float
    y1: float
    left: float = 58.0
    right: float = 58.0
    top: float = 14.0
    bottom: float = 40.0
    width: float = 760.0
    height: float = 280.0
    log_y: bool = False
    extra: dict = field(default_factory=dict)

    def px(self, x: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (x - self.x0) / span * (self.width - self.left - self.right)

    def py(self, y: float, lo: float | None = None, hi: float | None = None) -> float:
        lo, hi = (self.y0, self.y1) if lo is None else (lo, hi)
        if self.log_y and lo > 0:
            y, lo, hi = math.log10(max(y, 1e-12)), math.log10(lo), math.log10(hi)
        span = (hi - lo) or 1.0
        return self.height - self.bottom - (y - lo) / span * (self.height - self.top - self.bottom)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round numbers covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    out, v = [], start
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


def fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a < 1e-2:
        return f"{v:.1e}"
    return f"{v:.4g}"


def _range(values: list[float], pad: float = 0.04) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return lo - (abs(lo) or 1) * 0.1, hi + (abs(hi) or 1) * 0.1
    return lo - (hi - lo) * pad, hi + (hi - lo) * pad


def _y_axis(ax: Axes, lo: float, hi: float, at_x: float, anchor: str, label: str, cls: str) -> list[str]:
    out = []
    for t in nice_ticks(lo, hi):
        if lo <= t <= hi:
            y = ax.py(t, lo, hi)
            dx = -6 if anchor == "end" else 6
            out.append(f'<text x="{at_x + dx:.1f}" y="{y + 4:.1f}" text-anchor="{anchor}" class="tick">{fmt_num(t)}</text>')
            if anchor == "end":
                out.append(f'<line x1="{ax.left}" x2="{ax.width - ax.right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
    mid = (ax.top + ax.height - ax.bottom) / 2
    rot = -90 if anchor == "end" else 90
    x = 14 if anchor == "end" else ax.width - 6
    out.append(f'<text x="{x}" y="{mid:.1f}" transform="rotate({rot} {x} {mid:.1f})" text-anchor="middle" class="axlabel {cls}">{escape(label)}</text>')
    return out


def line_chart(series: list[Series], *, x_label: str, y_label: str, y2_label: str | None = None,
               markers: list[Marker] = (), title: str = "", log_y: bool = False, chart_id: str = "") -> str:
    """Lines (and dots) over a shared x axis; series with `right=True` use a second y axis."""
    series = [s for s in series if s.points]
    if not series:
        return ""
    xs = [x for s in series for x, _ in s.points] + [m.x for m in markers]
    x0, x1 = _range(xs, pad=0.0)
    left = [y for s in series if not s.right for _, y in s.points]
    right = [y for s in series if s.right for _, y in s.points]
    ly0, ly1 = _range(left)
    if log_y and left and min(left) > 0:
        ly0, ly1 = min(left) * 0.95, max(left) * 1.05
    else:
        log_y = False
    ry0, ry1 = _range(right)
    ax = Axes(x0, x1, ly0, ly1, log_y=log_y)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {ax.width:.0f} {ax.height:.0f}" role="img"'
             f' data-chart="{escape(chart_id)}" aria-label="{escape(title)}">']
    parts += _y_axis(ax, ly0, ly1, ax.left, "end", y_label, "")
    if right:
        parts += _y_axis(Axes(x0, x1, ry0, ry1), ry0, ry1, ax.width - ax.right, "start", y2_label or "", "right")
    for t in nice_ticks(x0, x1, 6):
        if x0 <= t <= x1:
            parts.append(f'<text x="{ax.px(t):.1f}" y="{ax.height - ax.bottom + 16:.1f}" text-anchor="middle" class="tick">{fmt_num(t)}</text>')
    parts.append(f'<text x="{(ax.left + ax.width - ax.right) / 2:.1f}" y="{ax.height - 6}" text-anchor="middle" class="axlabel">{escape(x_label)}</text>')
    base = ax.height - ax.bottom
    parts.append(f'<line x1="{ax.left}" x2="{ax.width - ax.right}" y1="{base}" y2="{base}" class="axis"/>')
    for i, m in enumerate(markers):
        x = ax.px(m.x)
        # labels step down so that neighbours do not overprint; near the right edge they sit left of the line
        right_side = x > (ax.left + ax.width - ax.right) * 0.75
        tx, anchor = (x - 3, "end") if right_side else (x + 3, "start")
        parts.append(f'<g class="{escape(m.cls)}" data-marker="{escape(m.label)}"><line x1="{x:.1f}" x2="{x:.1f}" y1="{ax.top}" y2="{base}"/>'
                     f'<title>{escape(m.label)}</title><text x="{tx:.1f}" y="{ax.top + 10 + 11 * (i % 4)}" text-anchor="{anchor}" '
                     f'class="mklabel">{escape(m.short or m.label)}</text></g>')
    for s in series:
        lo, hi = (ry0, ry1) if s.right else (ly0, ly1)
        yfun = (lambda y, lo=lo, hi=hi: Axes(x0, x1, lo, hi).py(y, lo, hi)) if s.right else ax.py
        pts = " ".join(f"{ax.px(x):.1f},{yfun(y):.1f}" for x, y in s.points)
        parts.append(f'<g class="series {s.cls}" data-series="{escape(s.name)}" data-points="{len(s.points)}">'
                     f'<polyline points="{pts}" class="{"dotted" if s.right else "line"}"/>')
        if s.dots or len(s.points) <= HOVER_POINTS:
            r = 3 if s.dots else 2
            for x, y in s.points:
                tip = f"{s.name}: {s.fmt.format(y)} at {x_label} {fmt_num(x)}"
                parts.append(f'<circle cx="{ax.px(x):.1f}" cy="{yfun(y):.1f}" r="{r}" class="{"dot" if s.dots else "hit"}"><title>{escape(tip)}</title></circle>')
        parts.append("</g>")
    parts.append("</svg>")
    legend = "".join(f'<span class="key {s.cls}"><i></i>{escape(s.name)}{" (right axis)" if s.right else ""}</span>' for s in series)
    return f'<figure><figcaption>{escape(title)}</figcaption>{"".join(parts)}<div class="legend">{legend}</div></figure>'


def bar_chart(rows: list[tuple[str, float, str]], *, title: str, unit: str = "", chart_id: str = "", cls: str = "s0",
              signed: bool = False, compact: bool = False) -> str:
    """Horizontal bars: (label, value, tooltip) per row. `signed`: bars grow left or right of zero.
    `compact`: a narrow chart, for a grid of small ones."""
    if not rows:
        return ""
    label_w, width, row_h = (110.0, 380.0, 22.0) if compact else (210.0, 760.0, 22.0)
    height = row_h * len(rows) + 10
    vals = [v for _, v, _ in rows]
    lo = min(0.0, min(vals)) if signed else 0.0
    hi = max(0.0, max(vals)) or (1.0 if not signed or lo == 0 else 0.0)
    span = (hi - lo) or 1.0
    plot_w = width - label_w - (60 if compact else 80)

    def px(v: float) -> float:
        return label_w + (v - lo) / span * plot_w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart bars{" compact" if compact else ""}" viewBox="0 0 {width:.0f} {height:.0f}" role="img"'
             f' data-chart="{escape(chart_id)}" aria-label="{escape(title)}">']
    for i, (label, v, tip) in enumerate(rows):
        y = 5 + i * row_h
        a, b = sorted((px(0.0), px(v)))
        bar_cls = cls if not signed or v >= 0 else "neg"
        parts.append(f'<g class="bar" data-label="{escape(label)}" data-value="{v:g}">'
                     f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" class="tick">{escape(label)}</text>'
                     f'<rect x="{a:.1f}" y="{y + 3}" width="{max(b - a, 0.5):.1f}" height="{row_h - 6}" class="{bar_cls}"><title>{escape(tip)}</title></rect>'
                     f'<text x="{max(a, b) + 4:.1f}" y="{y + 15}" class="tick">{escape(fmt_num(v))}{escape(unit)}</text></g>')
    if signed and lo < 0:
        parts.append(f'<line x1="{px(0):.1f}" x2="{px(0):.1f}" y1="0" y2="{height}" class="axis"/>')
    parts.append("</svg>")
    return f'<figure><figcaption>{escape(title)}</figcaption>{"".join(parts)}</figure>'


def grouped_columns(categories: list[str], groups: dict[str, list[float]], *, title: str, y_label: str, chart_id: str = "") -> str:
    """Vertical columns per category, one per group side by side (a histogram before/after)."""
    if not categories or not groups:
        return ""
    ax = Axes(0, len(categories), 0, max([max(v, default=0) for v in groups.values()] + [1]) * 1.05, right=16)
    slot = (ax.width - ax.left - ax.right) / len(categories)
    bw = slot * 0.8 / len(groups)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {ax.width:.0f} {ax.height:.0f}" role="img"'
             f' data-chart="{escape(chart_id)}" aria-label="{escape(title)}">']
    parts += _y_axis(ax, ax.y0, ax.y1, ax.left, "end", y_label, "")
    base = ax.height - ax.bottom
    for i, cat in enumerate(categories):
        x = ax.left + i * slot + slot * 0.1
        for j, (name, vals) in enumerate(groups.items()):
            v = vals[i]
            y = ax.py(v)
            parts.append(f'<rect x="{x + j * bw:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{base - y:.1f}" class="s{j}">'
                         f'<title>{escape(f"{cat}: {name} {fmt_num(v)}")}</title></rect>')
        parts.append(f'<text x="{ax.left + (i + 0.5) * slot:.1f}" y="{base + 14}" text-anchor="middle" class="tick small">{escape(cat)}</text>')
    parts.append(f'<line x1="{ax.left}" x2="{ax.width - ax.right}" y1="{base}" y2="{base}" class="axis"/></svg>')
    legend = "".join(f'<span class="key s{j}"><i></i>{escape(n)}</span>' for j, n in enumerate(groups))
    return f'<figure><figcaption>{escape(title)}</figcaption>{"".join(parts)}<div class="legend">{legend}</div></figure>'
