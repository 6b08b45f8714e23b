"""A flow drawn as a graph of its states, as SVG made on the server (like web/charts.py): no graph library
from a CDN, no script, and the page shows it under the strict Content-Security-Policy.

Why our own layout rather than Graphviz: `dot` is a system program the panel would need on every Mac
and server, and a flow is small (a handful to a few dozen states) and mostly a chain of steps with
menus fanning out. So states are ranked by their distance from `start` (breadth first, along the order
the file gives the transitions), one column per rank, left to right; states no path reaches stand in a
last column of their own (flagged: a flow check passes them, but no call will ever enter them). An edge
to a later column is a curve to the right; one back to the same or an earlier column (a reprompt, a
menu's "press 9 to hear it again") bends below the boxes. Edges between the same two states share one
curve with their labels joined ("1, 2"). Every text is escaped: state names are the file's, labels
carry the file's regular expressions.
"""
from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup, escape

from callbot.flows.schema import Flow, State

BOX_W, BOX_H = 150, 44
COL_GAP, ROW_GAP = 110, 36
PAD = 24
LABEL_MAX = 28


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    label: str


def _short(text: str) -> str:
    return text if len(text) <= LABEL_MAX else text[:LABEL_MAX - 1] + "…"


def _num(x: float) -> str:
    return f"{x:g}"


def state_edges(name: str, s: State) -> list[Edge]:
    """The transitions out of one state, labelled by what takes them, in the file's order of fields."""
    out: list[Edge] = []

    def add(target: str | None, label: str) -> None:
        if target is not None:
            out.append(Edge(name, target, label))

    for rule in s.branch:
        add(rule.goto, _short(f"{rule.var} ~ /{rule.match}/"))
    if s.webhook is not None:
        add(s.webhook.on_failure, "webhook failed")
    for digits, target in s.on_digits.items():
        add(target, digits)
    add(s.on_no_input, "no input")
    add(s.on_no_match, "no match")
    for rule in s.on_caller_said:
        add(rule.goto, _short(f"said /{rule.match}/"))
    for rule in s.on_bot_said:
        add(rule.goto, _short(f"bot said /{rule.match}/"))
    if s.on_silence_s is not None:
        add(s.on_silence_s.goto, f"silence {_num(s.on_silence_s.after)} s")
    if s.max_s is not None:
        add(s.on_max_s or s.next, f"after {_num(s.max_s)} s")
    add(s.on_transfer_failed, "transfer failed")
    add(s.next, "digits" if s.gather is not None and not s.on_digits else "next")
    return out


def flow_edges(flow: Flow) -> list[Edge]:
    """Every transition of the flow, duplicates of a pair merged into one labelled edge."""
    merged: dict[tuple[str, str], list[str]] = {}
    for name, s in flow.states.items():
        for e in state_edges(name, s):
            labels = merged.setdefault((e.source, e.target), [])
            if e.label not in labels:
                labels.append(e.label)
    return [Edge(a, b, ", ".join(labels)) for (a, b), labels in merged.items()]


def ranks(flow: Flow, edges: list[Edge]) -> dict[str, int]:
    """Each state's column: its distance from `start`; states no path reaches: one column past the last."""
    out_of: dict[str, list[str]] = {}
    for e in edges:
        out_of.setdefault(e.source, []).append(e.target)
    rank = {flow.start: 0}
    queue = [flow.start]
    for name in queue:
        for target in out_of.get(name, ()):
            if target not in rank and target in flow.states:
                rank[target] = rank[name] + 1
                queue.append(target)
    last = max(rank.values(), default=-1) + 1
    for name in flow.states:
        rank.setdefault(name, last)
    return rank


def _kind(s: State) -> str:
    if s.hangup:
        return "end"
    if s.transfer:
        return "transfer"
    if s.persona:
        return "persona"
    if s.gather is not None:
        return "gather"
    return "step"


def _detail(s: State) -> str:
    if s.transfer:
        return _short(f"transfer {s.transfer}")
    if s.hangup:
        return "hang up"
    if s.persona:
        return "persona"
    if s.gather is not None:
        return f"gather {s.gather.max_digits} digit{'s' if s.gather.max_digits > 1 else ''}"
    if s.webhook is not None:
        return "webhook"
    if s.play:
        return "play"
    if s.say:
        return "say"
    return ""


def flow_svg(flow: Flow, *, highlight: str | None = None) -> Markup:
    """The flow as an SVG graph: a box per state (its kind as a class: step, gather, persona, transfer,
    end; the start state and `highlight` marked), an arrow per transition with its label."""
    edges = flow_edges(flow)
    rank = ranks(flow, edges)
    columns: dict[int, list[str]] = {}
    for name in flow.states:  # the file's order within a column
        columns.setdefault(rank[name], []).append(name)
    reachable = _reachable(flow, edges)
    pos: dict[str, tuple[float, float]] = {}
    for col, names in columns.items():
        for row, name in enumerate(names):
            pos[name] = (PAD + col * (BOX_W + COL_GAP), PAD + row * (BOX_H + ROW_GAP))
    rows = max(len(n) for n in columns.values())
    width = PAD * 2 + (max(columns) + 1) * (BOX_W + COL_GAP) - COL_GAP
    back = [e for e in edges if rank.get(e.target, 0) < rank[e.source] or e.target == e.source]
    height = PAD * 2 + rows * (BOX_H + ROW_GAP) - ROW_GAP + (30 + 14 * len(back) if back else 0)
    parts = [f'<svg class="flow-graph" id="flow-graph" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
             f'height="{height:.0f}" role="img" aria-label="the flow\'s states and transitions">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#6b7385"/></marker></defs>']
    bottom = PAD + rows * (BOX_H + ROW_GAP) - ROW_GAP
    for i, e in enumerate(edges):
        if e.target not in pos:
            continue
        sx, sy = pos[e.source]
        tx, ty = pos[e.target]
        same_column = rank.get(e.target) == rank[e.source] and e.target != e.source
        label_anchor = "middle"
        if same_column and ty > sy:  # straight down the column
            x1, y1, x2, y2 = sx + BOX_W / 2, sy + BOX_H, tx + BOX_W / 2, ty
            d = f"M{x1:.0f},{y1:.0f} L{x2:.0f},{y2:.0f}"
            lx, ly, label_anchor = x1 + 6, (y1 + y2) / 2 + 4, "start"
        elif same_column:  # up the column: an arc on its right
            x1, y1, x2, y2 = sx + BOX_W, sy + BOX_H / 2, tx + BOX_W, ty + BOX_H / 2
            bulge = x1 + COL_GAP * 0.45
            d = f"M{x1:.0f},{y1:.0f} C{bulge:.0f},{y1:.0f} {bulge:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"
            lx, ly, label_anchor = x1 + COL_GAP * 0.35, (y1 + y2) / 2, "start"
        elif e in back:
            depth = bottom + 22 + 14 * back.index(e)
            x1, y1 = sx + BOX_W * 0.6, sy + BOX_H
            x2, y2 = tx + BOX_W * 0.4, ty + BOX_H
            d = f"M{x1:.0f},{y1:.0f} C{x1:.0f},{depth:.0f} {x2:.0f},{depth:.0f} {x2:.0f},{y2:.0f}"
            lx, ly = (x1 + x2) / 2, depth - 4 - 0.25 * (depth - max(y1, y2))
        else:
            x1, y1 = sx + BOX_W, sy + BOX_H / 2
            x2, y2 = tx, ty + BOX_H / 2
            mid = (x1 + x2) / 2
            d = f"M{x1:.0f},{y1:.0f} C{mid:.0f},{y1:.0f} {mid:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"
            lx, ly = mid, (y1 + y2) / 2 - 4
        parts.append(f'<g class="edge" data-from="{escape(e.source)}" data-to="{escape(e.target)}">'
                     f'<path d="{d}" fill="none" stroke="#8a93a6" stroke-width="1.4" marker-end="url(#arrow)"/>'
                     f'<text x="{lx:.0f}" y="{ly:.0f}" text-anchor="{label_anchor}" font-size="11" fill="#3b4252">'
                     f'{escape(e.label)}</text></g>')
    for name, s in flow.states.items():
        x, y = pos[name]
        classes = ["state", _kind(s)]
        if name == flow.start:
            classes.append("start")
        if name == highlight:
            classes.append("highlight")
        if name not in reachable:
            classes.append("unreachable")
        fill = {"end": "#f6e8e8", "transfer": "#fff3dc", "persona": "#f1ebfb", "gather": "#e6effd"}.get(
            _kind(s), "#ffffff")
        stroke = "#b00020" if name == highlight else ("#2c6bed" if name == flow.start else "#9aa3b5")
        width_px = 2.4 if name in (highlight, flow.start) else 1.2
        dash = ' stroke-dasharray="4 3"' if "unreachable" in classes else ""
        parts.append(f'<g class="{" ".join(classes)}" data-state="{escape(name)}">'
                     f'<rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{fill}" '
                     f'stroke="{stroke}" stroke-width="{width_px}"{dash}/>'
                     f'<text x="{x + BOX_W / 2:.0f}" y="{y + 18:.0f}" text-anchor="middle" font-size="13" '
                     f'font-weight="600" fill="#1d2330">{escape(_short(name))}</text>'
                     f'<text x="{x + BOX_W / 2:.0f}" y="{y + 34:.0f}" text-anchor="middle" font-size="10.5" '
                     f'fill="#6b7385">{escape(_detail(s))}</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _reachable(flow: Flow, edges: list[Edge]) -> set[str]:
    """The states some path from start reaches."""
    out_of: dict[str, list[str]] = {}
    for e in edges:
        out_of.setdefault(e.source, []).append(e.target)
    seen = {flow.start}
    queue = [flow.start]
    for n in queue:
        for t in out_of.get(n, ()):
            if t not in seen:
                seen.add(t)
                queue.append(t)
    return seen
