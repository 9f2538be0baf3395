"""A small emulator of InfluxDB 2's HTTP API, for tests and demos.

It stores points written as line protocol and answers Flux queries built from
from |> range |> filter |> aggregateWindow |> drop/keep |> pivot (plus first, last,
mean and yield) with the real server's semantics and annotated-CSV wire format:

- range keeps start <= _time < stop and adds _start/_stop to the group key;
- aggregateWindow's windows are aligned to the epoch (plus offset), clipped to the
  range, and each row is stamped with its (clipped) window stop; createEmpty: false
  leaves empty windows out; mean always yields doubles;
- drop/keep merge tables whose group keys become equal, rows in arrival order;
- pivot makes one row per row key in order of first appearance, the last value wins;
- the CSV has CRLF line ends, a leading empty column, #datatype/#group/#default rows,
  a new block (after an empty line) when the schema changes, RFC3339Nano UTC times,
  and an empty line after each result; an answer with no tables is exactly CRLF.

Faults for testing clients are queued with `Emulator.inject(...)` or
`POST /emulator/faults`: an HTTP status (429 with Retry-After, 5xx), an error table
after some data, a body cut off mid-stream, a connection reset, a slow answer.

Run on its own:  python -m tests.influxdb_emulator --port 8086 --token TOKEN --org ORG
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

VERSION = "v2.7.11-emulator"
NS = 10**9


class FluxError(Exception):
    """A query error, with the platform code that decides the HTTP status."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


STATUS_BY_CODE = {"invalid": 400, "unauthorized": 401, "forbidden": 403, "not found": 404, "internal error": 500}


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

    def add_series(self, bucket: str, measurement: str, tags: dict, field_key: str, times: list[int], values: list) -> None:
        """Bulk load for benchmarks; `times` must be sorted."""
        kind = "double" if isinstance(values[0], float) else "long"
        self.write(bucket, [])
        with self.lock:
            series = Series(kind, dict(zip(times, values)))
            self.buckets[bucket][(measurement, tuple(sorted(tags.items())), field_key)] = series
            self.generation += 1


# -- Flux: a parser for the subset we answer -----------------------------------------------
TOKEN = re.compile(
    r"""\s*(?:
      (?P<comment>//[^\n]*)
    | (?P<time>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2}))
    | (?P<duration>-?(?:\d+(?:ns|us|µs|ms|mo|s|m|h|d|w|y))+)
    | (?P<number>-?\d+(?:\.\d+)?)
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<op>\|>|=>|==|!=|<=|>=|[(){}\[\],:.<>=])
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
DURATION_UNITS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "ms": 10**6,
    "s": NS,
    "m": 60 * NS,
    "h": 3600 * NS,
    "d": 86400 * NS,
    "w": 7 * 86400 * NS,
}


def tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise FluxError(f"compilation failed: error at @{line_col(text, pos)}: invalid expression @{line_col(text, pos)}: {text[pos]}")
        pos = match.end()
        kind = match.lastgroup
        if kind != "comment":
            tokens.append((kind, match[kind], match.start(kind)))
    return tokens


def line_col(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    return f"{line}:{pos - (text.rfind(chr(10), 0, pos) + 1) + 1}"


def parse_duration(text: str) -> int:
    parts = re.findall(r"(\d+)(ns|us|µs|ms|mo|s|m|h|d|w|y)", text)
    if any(unit in ("mo", "y") for _, unit in parts):
        raise FluxError("calendar durations (mo, y) are not supported by this emulator")
    total = sum(int(n) * DURATION_UNITS[unit] for n, unit in parts)
    return -total if text.startswith("-") else total


def parse_time(text: str) -> int:
    match = re.fullmatch(r"(.{19})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})", text)
    base = datetime.fromisoformat(match[1] + ("+00:00" if match[3] == "Z" else match[3]))
    return int(base.timestamp()) * NS + int((match[2] or "0").ljust(9, "0")[:9])


def unquote_flux(literal: str) -> str:
    return re.sub(r"\\(\$\{|.)", lambda m: {"n": "\n", "r": "\r", "t": "\t"}.get(m[1], m[1]), literal[1:-1])


class Parser:
    """Recursive descent over: pipe chains of calls, records, arrays, lambdas, and/or/==."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0

    def peek(self, value: str | None = None) -> bool:
        if self.pos >= len(self.tokens):
            return False
        return value is None or self.tokens[self.pos][1] == value

    def take(self, value: str | None = None) -> tuple[str, str, int]:
        if self.pos >= len(self.tokens):
            raise FluxError(
                f"compilation failed: error at @{line_col(self.text, len(self.text))}: expected {value or 'expression'}, got EOF"
            )
        token = self.tokens[self.pos]
        if value is not None and token[1] != value:
            raise FluxError(f"compilation failed: error at @{line_col(self.text, token[2])}: expected {value}, got {token[1]}")
        self.pos += 1
        return token

    def program(self) -> list[list[tuple[str, dict]]]:
        pipelines = []
        while self.pos < len(self.tokens):
            if self.peek("import"):
                self.take()
                self.take()
                continue
            pipelines.append(self.pipeline())
        return pipelines

    def pipeline(self) -> list[tuple[str, dict]]:
        calls = [self.call()]
        while self.peek("|>"):
            self.take()
            calls.append(self.call())
        return calls

    def call(self) -> tuple[str, dict]:
        kind, name, pos = self.take()
        if kind != "ident":
            raise FluxError(f"compilation failed: error at @{line_col(self.text, pos)}: expected a function call, got {name}")
        self.take("(")
        args = {}
        while not self.peek(")"):
            _, key, _ = self.take()
            self.take(":")
            args[key] = self.expression()
            if self.peek(","):
                self.take()
        self.take(")")
        return name, args

    def expression(self) -> Any:
        left = self.comparison()
        while self.peek("and") or self.peek("or"):
            _, op, _ = self.take()
            left = (op, left, self.comparison())
        return left

    def comparison(self) -> Any:
        left = self.value()
        if self.peek("==") or self.peek("!="):
            _, op, _ = self.take()
            left = (op, left, self.value())
        return left

    def value(self) -> Any:
        kind, text, pos = self.take()
        if kind == "string":
            return unquote_flux(text)
        if kind == "time":
            return ("time", parse_time(text))
        if kind == "duration":
            return ("duration", parse_duration(text))
        if kind == "number":
            return float(text) if "." in text else int(text)
        if text == "[":
            items = []
            while not self.peek("]"):
                items.append(self.expression())
                if self.peek(","):
                    self.take()
            self.take("]")
            return items
        if text == "(":
            if self.peek(")") or (self.tokens[self.pos][0] == "ident" and self.tokens[self.pos + 1][1] in (")", ",")):
                params = []
                while not self.peek(")"):
                    params.append(self.take()[1])
                    if self.peek(","):
                        self.take()
                self.take(")")
                self.take("=>")
                return ("lambda", params, self.expression())
            inner = self.expression()
            self.take(")")
            return inner
        if kind == "ident":
            if text in ("true", "false"):
                return text == "true"
            if self.peek("."):
                self.take()
                return ("member", text, self.take()[1])
            if self.peek("["):
                self.take()
                key = self.value()
                self.take("]")
                return ("member", text, key)
            return ("ident", text)
        raise FluxError(f"compilation failed: error at @{line_col(self.text, pos)}: unexpected token {text}")


# -- Flux: tables and transformations ------------------------------------------------------
@dataclass
class Table:
    columns: list[tuple[str, str]]  # (label, datatype)
    key: list[str]  # labels of the group-key columns
    key_values: dict[str, Any]
    rows: list[list[Any]]

    def labels(self) -> list[str]:
        return [c for c, _ in self.columns]

    def types(self) -> dict[str, str]:
        return dict(self.columns)


@dataclass
class SeriesRead:
    """A series cut to a range: read lazily, as the storage engine would."""

    measurement: str
    tags: tuple
    field: str
    kind: str
    times: list[int]
    values: list[Any]
    lo: int
    hi: int
    start: int
    stop: int

    def key_values(self) -> dict[str, Any]:
        return {"_start": self.start, "_stop": self.stop, "_field": self.field, "_measurement": self.measurement, **dict(self.tags)}

    def to_table(self) -> Table:
        tag_columns = [(k, "string") for k, _ in self.tags]
        columns = [
            ("_start", "dateTime:RFC3339"),
            ("_stop", "dateTime:RFC3339"),
            ("_time", "dateTime:RFC3339"),
            ("_value", self.kind),
            ("_field", "string"),
            ("_measurement", "string"),
            *tag_columns,
        ]
        fixed = [self.field, self.measurement, *(v for _, v in self.tags)]
        rows = [[self.start, self.stop, self.times[i], self.values[i], *fixed] for i in range(self.lo, self.hi)]
        key = ["_start", "_stop", "_field", "_measurement", *(k for k, _ in self.tags)]
        return Table(columns, key, self.key_values(), rows)


def as_tables(stream: list) -> list[Table]:
    return [t.to_table() if isinstance(t, SeriesRead) else t for t in stream]


def evaluate_predicate(expr: Any, record: dict[str, Any]) -> Any:
    if isinstance(expr, tuple):
        op = expr[0]
        if op == "and":
            return evaluate_predicate(expr[1], record) and evaluate_predicate(expr[2], record)
        if op == "or":
            return evaluate_predicate(expr[1], record) or evaluate_predicate(expr[2], record)
        if op in ("==", "!="):
            left, right = evaluate_predicate(expr[1], record), evaluate_predicate(expr[2], record)
            return (left == right) == (op == "==")
        if op == "member":
            return record.get(expr[2])
        if op == "time":
            return expr[1]
        raise FluxError(f"unsupported expression in filter: {op}")
    return expr


def do_from(stream: list, args: dict, storage: Storage) -> list:
    bucket = args.get("bucket")
    if bucket not in storage.buckets:
        raise FluxError(f'failed to initialize execute state: could not find bucket "{bucket}"', "not found")
    return [("from", bucket)]


def do_range(stream: list, args: dict, storage: Storage, now: int) -> list:
    if not stream or not isinstance(stream[0], tuple):
        raise FluxError("range() must follow from() in this emulator")
    bucket = stream[0][1]
    start = bound(args.get("start"), now)
    stop = bound(args.get("stop", ("duration", 0)), now)
    reads = []
    with storage.lock:
        items = sorted(storage.buckets[bucket].items(), key=lambda kv: series_order(kv[0]))
        for (measurement, tags, field_key), series in items:
            times, values = series.sorted()
            lo, hi = bisect.bisect_left(times, start), bisect.bisect_left(times, stop)
            if lo < hi:
                reads.append(SeriesRead(measurement, tags, field_key, series.kind, times, values, lo, hi, start, stop))
    return reads


def series_order(key: tuple) -> tuple:
    measurement, tags, field_key = key
    return (measurement, tags, field_key)


def bound(value: Any, now: int) -> int:
    if isinstance(value, tuple) and value[0] == "time":
        return value[1]
    if isinstance(value, tuple) and value[0] == "duration":
        return now + value[1]
    raise FluxError("range: start and stop must be times or durations")


def do_filter(stream: list, args: dict) -> list:
    fn = args.get("fn")
    if not (isinstance(fn, tuple) and fn[0] == "lambda"):
        raise FluxError("filter: missing fn")
    body = fn[2]
    kept = []
    for item in stream:
        if isinstance(item, SeriesRead) and not touches_row(body):
            if evaluate_predicate(body, item.key_values()):
                kept.append(item)
            continue
        table = as_tables([item])[0]
        labels = table.labels()
        rows = [row for row in table.rows if evaluate_predicate(body, dict(zip(labels, row)))]
        kept.append(Table(table.columns, table.key, table.key_values, rows))
    return kept


def touches_row(expr: Any) -> bool:
    if isinstance(expr, tuple):
        if expr[0] == "member":
            return expr[2] in ("_time", "_value")
        return any(touches_row(part) for part in expr[1:])
    return False


AGGREGATES = {"mean", "sum", "count", "min", "max", "first", "last"}


def aggregate(name: str, values: list, kind: str) -> tuple[str, Any]:
    """(datatype, value) of one aggregate over the non-null `values`."""
    present = [v for v in values if v is not None]
    if name == "count":
        return "long", len(present)
    if name in ("first", "last"):
        return kind, (present[0] if name == "first" else present[-1]) if present else None
    if kind in ("string", "boolean"):
        raise FluxError(f"unsupported input type for {name} aggregate: {'bool' if kind == 'boolean' else kind}")
    if name == "mean":
        return "double", (float(sum(present)) / len(present)) if present else None
    if name == "sum":
        return kind, sum(present) if present else None
    return kind, (min(present) if name == "min" else max(present)) if present else None


def do_aggregate_window(stream: list, args: dict) -> list:
    every = args.get("every")
    fn = args.get("fn")
    if not (isinstance(every, tuple) and every[0] == "duration" and every[1] > 0):
        raise FluxError("aggregateWindow: every must be a positive duration")
    fn_name = fn[1] if isinstance(fn, tuple) and fn[0] == "ident" else None
    if fn_name not in AGGREGATES:
        raise FluxError(f"aggregateWindow: unsupported fn {fn!r}")
    every_ns = every[1]
    offset = args.get("offset", ("duration", 0))[1]
    create_empty = args.get("createEmpty", True)
    time_src = args.get("timeSrc", "_stop")
    out = []
    for item in stream:
        table = item if isinstance(item, Table) else None
        if table is None:
            times, values = item.times[item.lo : item.hi], item.values[item.lo : item.hi]
            kind, key_values, start, stop = item.kind, item.key_values(), item.start, item.stop
            key = ["_start", "_stop", "_field", "_measurement", *(k for k, _ in item.tags)]
            key_columns = [(k, "dateTime:RFC3339" if k in ("_start", "_stop") else "string") for k in key]
        else:
            labels = table.labels()
            ti, vi = labels.index("_time"), labels.index("_value")
            times, values = [r[ti] for r in table.rows], [r[vi] for r in table.rows]
            kind, key_values, key = table.types()["_value"], table.key_values, table.key
            start, stop = key_values["_start"], key_values["_stop"]
            key_columns = [c for c in table.columns if c[0] in key]
        rows, out_kind = window_rows(times, values, kind, start, stop, every_ns, offset, create_empty, time_src, fn_name)
        head = [c for c in key_columns if c[0] in ("_start", "_stop")]
        tail = [c for c in key_columns if c[0] not in ("_start", "_stop")]
        columns = [*head, ("_time", "dateTime:RFC3339"), ("_value", out_kind), *tail]
        fixed_head = [key_values[c] for c, _ in head]
        fixed_tail = [key_values[c] for c, _ in tail]
        out.append(Table(columns, key, key_values, [[*fixed_head, t, v, *fixed_tail] for t, v in rows]))
    return out


def window_rows(times, values, kind, start, stop, every, offset, create_empty, time_src, fn_name):
    """(time, value) rows of the epoch-aligned windows clipped to [start, stop)."""
    out_kind = aggregate(fn_name, [], kind)[0]
    rows = []
    first_start = (start - offset) // every * every + offset
    i = 0
    window_start = first_start
    while window_start < stop:
        window_stop = window_start + every
        j = bisect.bisect_left(times, window_stop, lo=i)
        if j > i or create_empty:
            clipped = (max(window_start, start), min(window_stop, stop))
            stamp = clipped[1] if time_src == "_stop" else clipped[0]
            _, value = aggregate(fn_name, values[i:j], kind)
            rows.append((stamp, value))
        i = j
        if not create_empty and i < len(times):
            # jump straight to the window holding the next point
            window_start = max(window_stop, (times[i] - offset) // every * every + offset)
        else:
            window_start = window_stop
        if not create_empty and i >= len(times):
            break
    return rows, out_kind


def regroup(tables: list[Table], new_key_of: Callable[[Table], list[str]], keep: Callable[[Table], list[tuple[str, str]]]) -> list[Table]:
    """Project each table and merge those whose group keys are now equal, in arrival order."""
    merged: dict[tuple, Table] = {}
    for table in tables:
        columns = keep(table)
        key = new_key_of(table)
        key_values = {k: table.key_values[k] for k in key}
        ident = tuple((k, key_values[k]) for k in key)
        index = [table.labels().index(c) for c, _ in columns]
        rows = [[row[i] for i in index] for row in table.rows]
        target = merged.get(ident)
        if target is None:
            merged[ident] = Table(columns, key, key_values, rows)
            continue
        types = target.types()
        for label, kind in columns:
            if label in types and types[label] != kind:
                raise FluxError(
                    f'schema collision detected: column "{label}" is both of type {flux_type(types[label])} and {flux_type(kind)}'
                )
            if label not in types:
                target.columns.append((label, kind))
                for row in target.rows:
                    row.append(None)
        labels = target.labels()
        positions = [labels.index(c) for c, _ in columns]
        for row in rows:
            full = [None] * len(labels)
            for p, v in zip(positions, row):
                full[p] = v
            target.rows.append(full)
    return list(merged.values())


def flux_type(datatype: str) -> str:
    return {"double": "float", "long": "int", "unsignedLong": "uint", "boolean": "bool", "dateTime:RFC3339": "time"}.get(datatype, datatype)


def do_drop(stream: list, args: dict) -> list:
    gone = set(args.get("columns", []))
    return regroup(as_tables(stream), lambda t: [k for k in t.key if k not in gone], lambda t: [c for c in t.columns if c[0] not in gone])


def do_keep(stream: list, args: dict) -> list:
    kept = set(args.get("columns", []))
    return regroup(as_tables(stream), lambda t: [k for k in t.key if k in kept], lambda t: [c for c in t.columns if c[0] in kept])


def do_pivot(stream: list, args: dict) -> list:
    row_key, column_key, value_column = args.get("rowKey", []), args.get("columnKey", []), args.get("valueColumn", "_value")
    builders: dict[tuple, dict] = {}
    for table in as_tables(stream):
        labels = table.labels()
        for needed in [*row_key, *column_key, value_column]:
            if needed not in labels:
                raise FluxError(f"specified column does not exist in table: {needed}")
        key = [k for k in table.key if k not in column_key and k != value_column]
        ident = tuple((k, table.key_values[k]) for k in key)
        b = builders.get(ident)
        if b is None:
            base = [c for c in table.columns if c[0] in key or c[0] in row_key]
            b = builders[ident] = {"key": key, "key_values": {k: table.key_values[k] for k in key}, "base": base, "new": [], "rows": {}}
        base_labels = [c for c, _ in b["base"]]
        base_idx = [labels.index(c) for c in base_labels]
        rk_idx = [labels.index(c) for c in row_key]
        ck_idx = [labels.index(c) for c in column_key]
        v_idx = labels.index(value_column)
        kind = table.types()[value_column]
        for row in table.rows:
            label = "_".join("null" if row[i] is None else str(row[i]) for i in ck_idx)
            if label in base_labels:
                raise FluxError(f'value "{label}" appears in a column key column, but a column named "{label}" already exists')
            if label not in [c for c, _ in b["new"]]:
                b["new"].append((label, kind))
            rk = tuple(row[i] for i in rk_idx)
            entry = b["rows"].get(rk)
            if entry is None:
                entry = b["rows"][rk] = ([row[i] for i in base_idx], {})
            entry[1][label] = row[v_idx]
    tables = []
    for ident in sorted(builders, key=lambda k: [(name, sortable(v)) for name, v in k]):
        b = builders[ident]
        new_labels = [c for c, _ in b["new"]]
        rows = [[*base, *(cells.get(label) for label in new_labels)] for base, cells in b["rows"].values()]
        tables.append(Table([*b["base"], *b["new"]], b["key"], b["key_values"], rows))
    return tables


def sortable(value: Any) -> tuple:
    return (value is None, str(type(value)), value if value is not None else 0)


def do_selector(stream: list, args: dict, name: str) -> list:
    out = []
    for table in as_tables(stream):
        labels = table.labels()
        column = args.get("column", "_value")
        if column not in labels:
            raise FluxError(f"specified column does not exist in table: {column}")
        ci = labels.index(column)
        if name in ("first", "last"):
            present = [row for row in table.rows if row[ci] is not None]
            rows = [present[0] if name == "first" else present[-1]] if present else []
            out.append(Table(table.columns, table.key, table.key_values, rows))
            continue
        kind, value = aggregate(name, [row[ci] for row in table.rows], table.types()[column])
        columns = [c for c in table.columns if c[0] in table.key] + [(column, kind)]
        out.append(Table(columns, table.key, table.key_values, [[table.key_values[c] for c, _ in columns[:-1]] + [value]]))
    return out


def execute(query: str, storage: Storage, now: int) -> list[tuple[str, list[Table]]]:
    """Run the query; returns (result name, tables) per yield."""
    results = []
    for pipeline in Parser(query).program():
        stream: list = []
        name = "_result"
        for fn_name, args in pipeline:
            if fn_name == "from":
                stream = do_from(stream, args, storage)
            elif fn_name == "range":
                stream = do_range(stream, args, storage, now)
            elif stream and isinstance(stream[0], tuple):
                raise FluxError(f"cannot submit unbounded read to \"{stream[0][1]}\"; try bounding 'from' with a call to 'range'")
            elif fn_name == "filter":
                stream = do_filter(stream, args)
            elif fn_name == "aggregateWindow":
                stream = do_aggregate_window(stream, args)
            elif fn_name == "drop":
                stream = do_drop(stream, args)
            elif fn_name == "keep":
                stream = do_keep(stream, args)
            elif fn_name == "pivot":
                stream = do_pivot(stream, args)
            elif fn_name in ("first", "last", "mean", "sum", "count", "min", "max"):
                stream = do_selector(stream, args, fn_name)
            elif fn_name == "yield":
                name = args.get("name", "_result")
            else:
                raise FluxError(f"compilation failed: error calling function {fn_name!r}: undefined identifier {fn_name}")
        if stream and isinstance(stream[0], tuple):
            raise FluxError(f"cannot submit unbounded read to \"{stream[0][1]}\"; try bounding 'from' with a call to 'range'")
        results.append((name, as_tables(stream)))
    return results


# -- Annotated CSV ---------------------------------------------------------------------------
def format_time(ns: int) -> str:
    """RFC3339Nano in UTC: no fraction when zero, trailing zeros trimmed."""
    seconds, frac = divmod(ns, NS)
    text = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{frac:09d}".rstrip("0") if frac else "") + "Z"


def format_double(value: float) -> str:
    """Go's strconv.FormatFloat(v, 'f', -1, 64): shortest digits, never an exponent."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    text = format(Decimal(repr(value)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def format_value(value: Any, datatype: str) -> str:
    if value is None:
        return ""
    if datatype == "dateTime:RFC3339":
        return format_time(value)
    if datatype == "double":
        return format_double(value)
    if datatype == "boolean":
        return "true" if value else "false"
    return str(value)


def csv_field(text: str) -> str:
    """Go encoding/csv quoting."""
    needs = text and ("," in text or '"' in text or "\r" in text or "\n" in text or text[0] in " \t")
    if not needs:
        return text
    return '"' + text.replace('"', '""').replace("\r\n", "\n").replace("\n", "\r\n") + '"'


def csv_line(fields: Iterable[str]) -> str:
    return ",".join(csv_field(f) for f in fields) + "\r\n"


DEFAULT_ANNOTATIONS = ("datatype", "group", "default")


def encode_result(name: str, tables: list[Table], annotations: Iterable[str] = DEFAULT_ANNOTATIONS) -> str:
    """One result's tables as Flux's CSV encoder writes them (without the result delimiter)."""
    annotations = list(annotations)
    out: list[str] = []
    previous: Table | None = None
    for table_id, table in enumerate(tables):
        labels, types = table.labels(), [t for _, t in table.columns]
        schema_changed = (
            previous is None
            or previous.columns != table.columns
            or [c for c in previous.labels() if c in previous.key] != [c for c in labels if c in table.key]
            or not previous.rows
            or not table.rows
        )
        if schema_changed:
            if previous is not None:
                out.append("\r\n")
            for annotation in annotations:
                if annotation == "datatype":
                    out.append(csv_line(["#datatype", "string", "long", *types]))
                elif annotation == "group":
                    out.append(csv_line(["#group", "false", "false", *("true" if c in table.key else "false" for c in labels)]))
                elif annotation == "default":
                    if table.rows:
                        out.append(csv_line(["#default", name, "", *[""] * len(labels)]))
                    else:
                        defaults = [format_value(table.key_values[c], t) if c in table.key else "" for c, t in table.columns]
                        out.append(csv_line(["#default", name, str(table_id), *defaults]))
            out.append(csv_line(["", "result", "table", *labels]))
        result_cell = "" if "default" in annotations else name
        for row in table.rows:
            out.append(csv_line(["", result_cell, str(table_id), *(format_value(v, t) for v, t in zip(row, types))]))
        previous = table
    return "".join(out)


def encode_error(message: str, annotations: Iterable[str] = DEFAULT_ANNOTATIONS) -> str:
    rows = {"datatype": ["#datatype", "string", "string"], "group": ["#group", "true", "true"], "default": ["#default", "", ""]}
    return "".join(csv_line(rows[a]) for a in annotations) + csv_line(["", "error", "reference"]) + csv_line(["", message, ""])


def encode_results(results: list[tuple[str, list[Table]]], annotations: Iterable[str] = DEFAULT_ANNOTATIONS) -> str:
    """The whole body: each result followed by an empty line (the multi-result delimiter)."""
    return "".join(encode_result(name, tables, annotations) + "\r\n" for name, tables in results)


# -- HTTP ------------------------------------------------------------------------------------
@dataclass
class Fault:
    """What to do to the next query instead of answering it normally.

    kind: "status" (status, retry_after, message), "error_table" (message, after
    the first `keep_rows` data rows), "truncate" (cut the body after `keep_bytes`),
    "reset" (close the connection without an answer), "slow" (wait `delay` first),
    "canned" (answer 200 with `body` instead).
    """

    kind: str
    status: int = 500
    retry_after: float | None = None
    message: str = "internal error"
    keep_rows: int = 1
    keep_bytes: int = 200
    delay: float = 0.0
    body: str = ""


@dataclass
class Emulator:
    token: str = "emulator-token"
    org: str = "emulator-org"
    buckets: tuple[str, ...] = ("pulse_oximeter",)
    now: Callable[[], int] = field(default=lambda: time.time_ns())

    def __post_init__(self) -> None:
        self.storage = Storage(self.buckets)
        self.faults: list[Fault] = []
        self.queries: list[str] = []
        self.cache: dict[tuple, tuple[int, bytes]] = {}
        self.lock = threading.Lock()
        self.server: QuietServer | None = None

    # The API tests use directly
    def inject(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def next_fault(self) -> Fault | None:
        with self.lock:
            return self.faults.pop(0) if self.faults else None

    def reset(self) -> None:
        with self.lock:
            self.storage = Storage(self.buckets)
            self.faults.clear()
            self.queries.clear()
            self.cache.clear()

    def write_lines(self, bucket: str, text: str, precision: str = "ns") -> None:
        points = []
        now = self.now()
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                try:
                    points.extend(parse_line(line, precision, now))
                except ValueError as exc:
                    raise FluxError(f"unable to parse '{line}': {exc}") from None
        self.storage.write(bucket, points)

    def answer(self, query: str, annotations: tuple[str, ...]) -> bytes:
        """The CSV body for a query; memoised until the next write.

        The memo is keyed by the query's tokens, so texts that differ only in spacing share
        an answer; a query with a negative duration (relative to now) is never memoised.
        """
        tokens = tuple(token[:2] for token in tokenize(query))
        key = (tokens, annotations)
        hit = self.cache.get(key)
        if hit and hit[0] == self.storage.generation:
            return hit[1]
        generation = self.storage.generation
        body = encode_results(execute(query, self.storage, self.now()), annotations).encode()
        if not any(kind == "duration" and text.startswith("-") for kind, text in tokens):
            self.cache[key] = (generation, body)
        return body

    # Serving
    def start(self, host: str = "127.0.0.1", port: int = 0, tls: tuple[str, str] | None = None) -> str:
        """Serve in a thread; `tls` is (certificate file, key file) for https."""
        emulator = self

        class Handler(RequestHandler):
            pass

        Handler.emulator = emulator
        self.server = QuietServer((host, port), Handler)
        self.scheme = "http"
        if tls:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a timeout test, say) is not the server's problem."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    emulator: Emulator

    def log_message(self, format: str, *args: Any) -> None:  # quiet, like a test server should be
        pass

    def version_headers(self) -> None:
        self.send_header("X-Influxdb-Build", "OSS")
        self.send_header("X-Influxdb-Version", VERSION)

    def send_json(self, status: int, payload: dict, extra: dict | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        if "code" in payload:
            self.send_header("X-Platform-Error-Code", payload["code"])
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.version_headers()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, code: str, message: str, extra: dict | None = None, status: int | None = None) -> None:
        self.send_json(status or STATUS_BY_CODE.get(code, 500), {"code": code, "message": message}, extra)

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return body

    def authorized(self) -> bool:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() in ("token", "bearer") and token == self.emulator.token:
            return True
        self.send_error_json("unauthorized", "unauthorized access")
        return False

    def org_ok(self, params: dict) -> bool:
        org = (params.get("org") or params.get("orgID") or [None])[0]
        if org is None:
            self.send_error_json("invalid", "failed to decode request body: Please provide either orgID or org")
            return False
        if org != self.emulator.org:
            self.send_error_json("invalid", f'failed to decode request body: organization name "{org}" not found')
            return False
        return True

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/health":
            self.send_json(
                200,
                {
                    "name": "influxdb",
                    "message": "ready for queries and writes",
                    "status": "pass",
                    "checks": [],
                    "version": VERSION,
                    "commit": "emulator",
                },
            )
        elif path in ("/ping", "/ready"):
            self.send_response(204)
            self.version_headers()
            self.end_headers()
        else:
            self.send_error_json("not found", "path not found")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        params = parse_qs(parts.query)
        body = self.read_body()
        if parts.path == "/emulator/faults":
            self.emulator.inject(*(Fault(**f) for f in json.loads(body or b"[]")))
            self.send_response(204)
            self.end_headers()
            return
        if parts.path not in ("/api/v2/query", "/api/v2/write"):
            self.send_error_json("not found", "path not found")
            return
        if not self.authorized() or not self.org_ok(params):
            return
        if parts.path == "/api/v2/write":
            self.handle_write(params, body)
        else:
            self.handle_query(body)

    def handle_write(self, params: dict, body: bytes) -> None:
        bucket = (params.get("bucket") or [""])[0]
        precision = (params.get("precision") or ["ns"])[0]
        if precision not in PRECISION_NS:
            self.send_error_json("invalid", f"invalid precision {precision!r}")
            return
        if bucket not in self.emulator.storage.buckets:
            self.send_error_json("not found", f'bucket "{bucket}" not found')
            return
        try:
            self.emulator.write_lines(bucket, body.decode(), precision)
        except (FluxError, ValueError) as exc:
            self.send_error_json("invalid", str(exc))
            return
        self.send_response(204)
        self.version_headers()
        self.end_headers()

    def handle_query(self, body: bytes) -> None:
        content_type = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        if content_type == "application/vnd.flux":
            query, annotations = body.decode(), ()
        else:
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                self.send_error_json(
                    "invalid",
                    "failed to decode request body: failed parsing request body as JSON; if sending a raw Flux script, set 'Content-Type: application/vnd.flux' in your request headers",
                )
                return
            query = request.get("query") or ""
            annotations = tuple((request.get("dialect") or {}).get("annotations") or ())
        if not query:
            self.send_error_json("invalid", "failed to decode request body: request body requires either query or AST")
            return
        self.emulator.queries.append(query)
        fault = self.emulator.next_fault()
        if fault and fault.kind == "slow":
            time.sleep(fault.delay)
            fault = None
        if fault and fault.kind == "status":
            extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            code = {429: "too many requests", 503: "unavailable"}.get(fault.status, "internal error")
            self.send_error_json(code, fault.message, extra, status=fault.status)
            return
        if fault and fault.kind == "reset":
            self.close_abruptly()
            return
        try:
            answer = fault.body.encode() if fault and fault.kind == "canned" else self.emulator.answer(query, annotations)
        except FluxError as exc:
            self.send_error_json(exc.code, str(exc))
            return
        if fault and fault.kind == "error_table":
            answer = keep_data_rows(answer, fault.keep_rows) + b"\r\n" + encode_error(fault.message, annotations).encode()
        gzipped = "gzip" in (self.headers.get("Accept-Encoding") or "") and len(answer) >= 1400
        self.send_response(200)
        self.send_header("Content-Type", "text/csv; charset=utf-8")
        self.send_header("Vary", "Accept-Encoding")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
            answer = gzip.compress(answer)
        self.send_header("Transfer-Encoding", "chunked")
        self.version_headers()
        self.end_headers()
        if fault and fault.kind == "truncate":
            self.write_chunk(answer[: fault.keep_bytes])
            self.close_abruptly()
            return
        for i in range(0, len(answer), 65536):
            self.write_chunk(answer[i : i + 65536])
        self.wfile.write(b"0\r\n\r\n")

    def write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def close_abruptly(self) -> None:
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True


def keep_data_rows(answer: bytes, keep_rows: int) -> bytes:
    """The head of an answer: its annotation and header lines and the first data rows."""
    lines, kept, data = answer.split(b"\r\n"), [], 0
    for line in lines:
        if line.startswith(b",,"):
            if data >= keep_rows:
                break
            data += 1
        kept.append(line)
    return b"\r\n".join(kept).rstrip(b"\r\n") + b"\r\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve an InfluxDB 2 API emulator until stopped.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8086)
    parser.add_argument("--token", default="emulator-token")
    parser.add_argument("--org", default="emulator-org")
    parser.add_argument("--bucket", action="append", help="a bucket to create (repeatable; default pulse_oximeter)")
    args = parser.parse_args(argv)
    emulator = Emulator(token=args.token, org=args.org, buckets=tuple(args.bucket or ["pulse_oximeter"]))
    url = emulator.start(args.host, args.port)
    print(f"InfluxDB emulator serving on {url} (org {args.org}, buckets {', '.join(emulator.buckets)}); Ctrl-C stops it", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
