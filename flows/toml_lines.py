"""Where in a TOML file a validation error points: `$.states.menu.on_digits.3` -> the file's line.

The checks (flows/schema.py, app/settings.py) word an error by its path in the decoded document; a person
editing the file in the panel needs the line. Why our own small scanner rather than a library: TOML's
parsers keep no positions (tomllib, tomli, msgspec.toml decode to plain values; tomlkit keeps the text's
layout but not where each item starts). What is needed is narrow: the line of every table header
(`[states.menu]`, `[[states.x.on_caller_said]]`) and of every `key = value` that starts a line, as full
paths. The scanner walks the text once, tracking strings (so a triple-quoted persona spanning lines is one value)
and bracket depth (so the lines of a multi-line array or inline table belong to the key that opened it).

A path that names something inside a value (a key of an inline table, an item of an array written
inline) maps to the line of its longest prefix that starts a line: `gather = { max_digits = 0 }` is the
line of `$.states.menu.gather.max_digits`. A TOML syntax error has its line in its message already
(`... (at line 7, column 3)`), which `error_line` reads.
"""
from __future__ import annotations

import re

_STEP = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")
_AT_LINE = re.compile(r"\bline (\d+)\b")
_BARE = re.compile(r"[A-Za-z0-9_-]+")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
_ERROR_PATH = re.compile(r"(?:^|: )(\$(?:\.[^.\[\]:\s]+|\[\d+\])*)(?=:)")


def path_steps(path: str) -> tuple[str, ...]:
    """`$.states.menu.on_caller_said[0].goto` -> ("states", "menu", "on_caller_said", "0", "goto")."""
    if not path.startswith("$"):
        raise ValueError(f"not a path: {path!r}")
    return tuple(m.group(1) if m.group(1) is not None else m.group(2) for m in _STEP.finditer(path))


def _keys(text: str, i: int) -> tuple[list[str], int] | None:
    """A dotted key starting at text[i] (bare or quoted parts): its parts and the index after it."""
    parts: list[str] = []
    n = len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return None
        if text[i] in "\"'":
            quote = text[i]
            j = i + 1
            buf = []
            while j < n and text[j] != quote and text[j] != "\n":
                if quote == '"' and text[j] == "\\" and j + 1 < n:
                    buf.append(text[j + 1])
                    j += 2
                    continue
                buf.append(text[j])
                j += 1
            if j >= n or text[j] != quote:
                return None
            parts.append("".join(buf))
            i = j + 1
        else:
            m = _BARE.match(text, i)
            if m is None:
                return None
            parts.append(m.group(0))
            i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ".":
            i += 1
            continue
        return parts, i


def line_map(text: str) -> dict[tuple[str, ...], int]:
    """Every path that starts a line of `text` -> its line (1-based): table headers and keys."""
    lines: dict[tuple[str, ...], int] = {}
    aot_counts: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    i, n, line = 0, len(text), 1
    depth = 0  # open [ and { of a value: its lines belong to its key
    at_line_start = True
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
            at_line_start = True
            continue
        if at_line_start and ch in " \t\r":
            i += 1
            continue
        if at_line_start and depth == 0 and ch not in "#\n":
            at_line_start = False
            if ch == "[":
                double = text.startswith("[[", i)
                got = _keys(text, i + (2 if double else 1))
                if got is not None:
                    parts, end = got
                    path = tuple(parts)
                    if double:
                        index = aot_counts.get(path, 0)
                        aot_counts[path] = index + 1
                        lines.setdefault(path, line)
                        path = (*path, str(index))
                    table = path
                    lines.setdefault(path, line)
                    i = text.find("]]" if double else "]", end)
                    i = n if i < 0 else i + (2 if double else 1)
                    continue
            got = _keys(text, i)
            if got is not None and got[1] < n and text[got[1]] == "=":
                parts, end = got
                for k in range(1, len(parts) + 1):
                    lines.setdefault((*table, *parts[:k]), line)
                i = end + 1
                continue
        at_line_start = False
        # inside a value: skip strings and comments, count brackets
        if ch == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if ch in "\"'":
            triple = text.startswith(ch * 3, i)
            if triple:
                j = i + 3
                while True:
                    k = text.find(ch * 3, j)
                    if k < 0:
                        k = n
                        break
                    if ch == '"' and _escaped(text, k):
                        j = k + 1
                        continue
                    break
                while k + 3 < n and text[k + 3] == ch:  # up to two quotes may end the content
                    k += 1
                line += text.count("\n", i, k)
                i = min(n, k + 3)
                continue
            j = i + 1
            while j < n and text[j] != ch and text[j] != "\n":
                j += 2 if (ch == '"' and text[j] == "\\") else 1
            i = j + 1 if j < n and text[j] == ch else j
            continue
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        i += 1
    return lines


def _escaped(text: str, k: int) -> bool:
    backslashes = 0
    while k - 1 - backslashes >= 0 and text[k - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def line_of(text: str, path: str | tuple[str, ...]) -> int | None:
    """The line of `text` that `path` points at: its own, else its longest prefix's; None when not even
    its first step is in the file (a missing required key: the error is about the whole file)."""
    steps = path_steps(path) if isinstance(path, str) else tuple(path)
    lines = line_map(text)
    for k in range(len(steps), 0, -1):
        if steps[:k] in lines:
            return lines[steps[:k]]
    return None


def error_line(text: str, message: str) -> int | None:
    """The line an error message points at: a TOML syntax error's own `line N`, else the line of the
    first `$.path` in it (`support.toml: $.states.menu.next: unknown state ...`)."""
    if "not valid TOML" in message:
        m = _AT_LINE.search(message)
        return int(m.group(1)) if m is not None else None
    m = _ERROR_PATH.search(message)
    if m is None:
        return None
    steps = path_steps(m.group(1))
    unknown = _UNKNOWN_FIELD.search(message)  # msgspec names the table; the line is the stray key's
    if unknown is not None:
        steps = (*steps, unknown.group(1))
    return line_of(text, steps)
