"""The emulator's storage: line protocol parsed into series, a later write to the same time winning."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

NS = 10**9


# -- Line protocol -------------------------------------------------------------------------
PRECISION_NS = {"ns": 1, "us": 10**3, "ms": 10**6, "s": NS}


def split_unescaped(text: str, sep: str, quotes: bool = False) -> list[str]:
    """Split on `sep` where it is not backslash-escaped (or inside double quotes)."""
    parts, current, i, quoted = [], [], 0, False
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if quotes and c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    parts.append("".join(current))
    return parts


def unescape(text: str) -> str:
    return re.sub(r"\\([ ,=\"\\])", r"\1", text)


def parse_field_value(text: str) -> tuple[str, Any]:
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        return "string", re.sub(r'\\(["\\])', r"\1", text[1:-1])
    if re.fullmatch(r"-?\d+i", text):
        return "long", int(text[:-1])
    if re.fullmatch(r"\d+u", text):
        return "unsignedLong", int(text[:-1])
    if text in ("t", "T", "true", "True", "TRUE"):
        return "boolean", True
    if text in ("f", "F", "false", "False", "FALSE"):
        return "boolean", False
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"invalid field value {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"invalid number {text!r}")
    return "double", value


def parse_line(line: str, precision: str, now_ns: int) -> list[tuple[str, tuple, str, int, str, Any]]:
    """One line of line protocol as (measurement, tags, field, time_ns, type, value) points."""
    sections = split_unescaped(line, " ", quotes=True)
    sections = [s for s in sections if s != ""]
    if len(sections) not in (2, 3):
        raise ValueError("expected measurement[,tags] fields [timestamp]")
    series, fields_text = sections[0], sections[1]
    keys = split_unescaped(series, ",")
    measurement = unescape(keys[0])
    if not measurement:
        raise ValueError("missing measurement")
    tags = []
    for pair in keys[1:]:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"invalid tag {pair!r}")
        tags.append((unescape(key), unescape(value)))
    stamp = now_ns if len(sections) == 2 else int(sections[2]) * PRECISION_NS[precision]
    points = []
    for pair in split_unescaped(fields_text, ",", quotes=True):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid field {pair!r}")
        kind, parsed = parse_field_value(value)
        points.append((measurement, tuple(sorted(tags)), unescape(key), stamp, kind, parsed))
    return points


# -- Storage -------------------------------------------------------------------------------
@dataclass
class Series:
    kind: str
    values: dict[int, Any] = field(default_factory=dict)
    _sorted: tuple[list[int], list[Any]] | None = None

    def sorted(self) -> tuple[list[int], list[Any]]:
        if self._sorted is None:
            times = sorted(self.values)
            self._sorted = (times, [self.values[t] for t in times])
        return self._sorted


class Storage:
    """Points by bucket and series; a later write to the same series and time wins."""

    def __init__(self, buckets: Iterable[str]) -> None:
        self.buckets: dict[str, dict[tuple, Series]] = {b: {} for b in buckets}
        self.lock = threading.Lock()
        self.generation = 0

    def write(self, bucket: str, points: Iterable[tuple]) -> None:
        with self.lock:
            store = self.buckets[bucket]
            for measurement, tags, field_key, stamp, kind, value in points:
                key = (measurement, tags, field_key)
                series = store.get(key)
                if series is None:
                    series = store[key] = Series(kind)
                elif series.kind != kind:
                    raise ValueError(
                        f"failure writing points to database: partial write: field type conflict: "
                        f'input field "{field_key}" on measurement "{measurement}" is type {kind}, already exists as type {series.kind}'
                    )
                series.values[stamp] = value
                series._sorted = None
            self.generation += 1

    def forget_before(self, bucket: str, stamp: int) -> None:
        """Drop every point older than `stamp` (ns), as InfluxDB 3 applies retention: point by
        point, at each point's own time, not by whole shards."""
        with self.lock:
            for series in self.buckets[bucket].values():
                series.values = {t: v for t, v in series.values.items() if t >= stamp}
                series._sorted = None
            self.generation += 1

    def add_series(self, bucket: str, measurement: str, tags: dict, field_key: str, times: list[int], values: list) -> None:
        """Bulk load for benchmarks; `times` must be sorted."""
        kind = "double" if isinstance(values[0], float) else "long"
        self.write(bucket, [])
        with self.lock:
            series = Series(kind, dict(zip(times, values)))
            self.buckets[bucket][(measurement, tuple(sorted(tags.items())), field_key)] = series
            self.generation += 1
