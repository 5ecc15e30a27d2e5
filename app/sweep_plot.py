"""A sweep's plot as SVG, drawn in pure Python (the API process imports no plotting library).

Three panels share the y axis (test accuracy): units removed (%), parameters and MACs of the
pruned model. One colour per method; one line style per accuracy: after removal (dotted),
after the refit (dashed), after retraining (solid). Points of several seeds are averaged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from html import escape

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
ACCURACIES = (  # row field, legend label, dash pattern, marker radius
    ("accuracy_pruned", "pruned", "2,3", 2.5),
    ("accuracy_refit", "refit", "6,3", 3.0),
    ("accuracy_retrained", "retrained", "", 3.5),
)
PANELS = (  # row field, axis label, scale for tick labels
    ("units_removed_fraction", "units removed (%)", "percent"),
    ("params_after", "parameters (pruned)", "count"),
    ("macs_after", "MACs (pruned)", "count"),
)
PANEL_W, PANEL_H, MARGIN_L, MARGIN_T, GAP = 260, 220, 50, 36, 40


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 x 10^k apart) inside [lo, hi], about n + 1 of them."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float, scale: str) -> str:
    if scale == "percent":
        return f"{100 * value:.0f}"
    if scale == "accuracy":
        return f"{value:.2f}"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def _series(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Per (method, accuracy field): points averaged over seeds, keyed by the target/tol."""
    grouped: dict[tuple[str, object], list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "succeeded":
            grouped[(row["method"], row["target"] if row["target"] is not None else row["tol"])].append(row)
    series: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for (method, _knob), members in grouped.items():
        point = {}
        for field in [p[0] for p in PANELS] + [a[0] for a in ACCURACIES]:
            values = [m[field] for m in members if m.get(field) is not None]
            point[field] = sum(values) / len(values) if values else None
        for field, *_ in ACCURACIES:
            if point[field] is not None:
                series[(method, field)].append(point)
    return series


def sweep_svg(rows: list[dict], title: str) -> str:
    """The SVG document for a sweep's rows (SweepRow dicts); jobs not succeeded are left out."""
    series = _series(rows)
    methods = sorted({method for method, _ in series})
    colour = {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(methods)}
    accs = [p[a[0]] for pts in series.values() for p in pts for a in ACCURACIES if p[a[0]] is not None]
    y_lo, y_hi = (min(accs), max(accs)) if accs else (0.0, 1.0)
    pad = max(0.02, (y_hi - y_lo) * 0.05)
    y_lo, y_hi = max(0.0, y_lo - pad), min(1.0, y_hi + pad)

    width = MARGIN_L + len(PANELS) * (PANEL_W + GAP)
    legend_rows = max(1, len(methods))
    height = MARGIN_T + PANEL_H + 50 + 18 * legend_rows
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{MARGIN_L}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>']
    if not series:
        out.append(f'<text x="{MARGIN_L}" y="{MARGIN_T + 40}">no finished job yet</text></svg>')
        return "\n".join(out)

    for index, (field, axis, scale) in enumerate(PANELS):
        left = MARGIN_L + index * (PANEL_W + GAP)
        xs = [p[field] for pts in series.values() for p in pts if p[field] is not None]
        x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
        if x_hi == x_lo:
            x_lo, x_hi = x_lo * 0.9, x_hi * 1.1 + 1e-9

        def sx(v, left=left, x_lo=x_lo, x_hi=x_hi):
            return left + (v - x_lo) / (x_hi - x_lo) * PANEL_W

        def sy(v):
            return MARGIN_T + PANEL_H - (v - y_lo) / (y_hi - y_lo) * PANEL_H

        out.append(f'<rect x="{left}" y="{MARGIN_T}" width="{PANEL_W}" height="{PANEL_H}" '
                   'fill="none" stroke="#888"/>')
        for t in _ticks(x_lo, x_hi):
            out.append(f'<text x="{sx(t):.1f}" y="{MARGIN_T + PANEL_H + 14}" '
                       f'text-anchor="middle">{_label(t, scale)}</text>')
        for t in _ticks(y_lo, y_hi):
            out.append(f'<line x1="{left}" x2="{left + PANEL_W}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" '
                       'stroke="#eee"/>')
            out.append(f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">'
                       f'{_label(t, "accuracy")}</text>')
        out.append(f'<text x="{left + PANEL_W / 2}" y="{MARGIN_T + PANEL_H + 30}" '
                   f'text-anchor="middle">{escape(axis)}</text>')
        for (method, acc_field), points in sorted(series.items()):
            _, _, dash, radius = next(a for a in ACCURACIES if a[0] == acc_field)
            pts = sorted((p[field], p[acc_field]) for p in points if p[field] is not None)
            if not pts:
                continue
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour[method]}" '
                       f'stroke-width="1.5"{dash_attr}><title>{escape(method)} {acc_field}'
                       '</title></polyline>')
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius}" '
                    f'fill="{colour[method]}"><title>{escape(method)}: {acc_field} {y:.4f} at '
                    f'{escape(axis)} {_label(x, scale)}</title></circle>' for x, y in pts]
    out.append(f'<text x="14" y="{MARGIN_T + PANEL_H / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {MARGIN_T + PANEL_H / 2})">test accuracy</text>')

    legend_y = MARGIN_T + PANEL_H + 50
    for i, method in enumerate(methods):
        y = legend_y + 18 * i
        out.append(f'<text x="{MARGIN_L}" y="{y + 4}" fill="{colour[method]}" '
                   f'font-weight="bold">{escape(method)}</text>')
        for j, (_field, label, dash, _r) in enumerate(ACCURACIES):
            x = MARGIN_L + 90 + 130 * j
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<line x1="{x}" x2="{x + 30}" y1="{y}" y2="{y}" stroke="{colour[method]}" '
                       f'stroke-width="1.5"{dash_attr}/><text x="{x + 36}" y="{y + 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out)
