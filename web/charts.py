"""Charts drawn on the server as SVG (bars), so the panel needs no chart library from a CDN and its
pages show their numbers with scripts off. Text in them is escaped (a bot's or a category's name comes
from configuration files and calls)."""
from __future__ import annotations

from markupsafe import Markup, escape


def bars(items: list[tuple[str, float]], *, width: int = 640, height: int = 180, unit: str = "",
         label_every: int = 1) -> Markup:
    """Vertical bars, one per (label, value), the value on top and every `label_every`th label under."""
    if not items:
        return Markup('<p class="empty">no calls</p>')
    top = max(v for _, v in items) or 1.0
    pad_bottom, pad_top = 28, 16
    slot = min(width / len(items), 48.0)  # few bars stay bars, not walls
    bar_w = max(2.0, slot * 0.7)
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" width="100%">']
    for i, (label, value) in enumerate(items):
        h = (height - pad_bottom - pad_top) * value / top
        x = i * slot + (slot - bar_w) / 2
        y = height - pad_bottom - h
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}">'
                     f'<title>{escape(label)}: {value:g}{escape(unit)}</title></rect>')
        parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{y - 3:.1f}" class="value">{value:g}</text>')
        if i % label_every == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{height - 10}" class="label">{escape(label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def hbars(items: list[tuple[str, float]], *, width: int = 640, row: int = 22) -> Markup:
    """Horizontal bars with their labels on the left (outcomes, categories)."""
    if not items:
        return Markup('<p class="empty">none</p>')
    top = max(v for _, v in items) or 1.0
    label_w = 180
    height = row * len(items) + 4
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" width="100%">']
    for i, (label, value) in enumerate(items):
        y = i * row + 2
        w = (width - label_w - 50) * value / top
        parts.append(f'<text x="{label_w - 6}" y="{y + row * 0.7:.1f}" class="rlabel">{escape(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 6}">'
                     f'<title>{escape(label)}: {value:g}</title></rect>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + row * 0.7:.1f}" class="value-l">{value:g}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def signed_bars(items: list[tuple[str, float]], *, width: int = 640, height: int = 160) -> Markup:
    """Bars up or down from a middle line, for values in [-1, 1] (sentiment)."""
    if not items:
        return Markup('<p class="empty">no analysed calls</p>')
    mid = height / 2
    slot = min(width / len(items), 48.0)
    bar_w = max(2.0, slot * 0.7)
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height + 16}" role="img" width="100%">',
             f'<line x1="0" x2="{width}" y1="{mid}" y2="{mid}" class="axis"/>']
    for i, (label, value) in enumerate(items):
        h = (mid - 14) * max(-1.0, min(1.0, value))
        x = i * slot + (slot - bar_w) / 2
        y = mid - h if h >= 0 else mid
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{abs(h):.1f}" '
                     f'class="{"pos" if value >= 0 else "neg"}"><title>{escape(label)}: {value:+.2f}</title></rect>')
        parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{height + 12}" class="label">{escape(label[5:])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
