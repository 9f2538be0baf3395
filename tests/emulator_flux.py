"""The emulator's Flux: a parser for the subset the loader sends, its transformations with the
real server's semantics, and Flux's annotated-CSV encoder."""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from tests.emulator_storage import NS, Storage


class FluxError(Exception):
    """A query error, with the platform code that decides the HTTP status."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


STATUS_BY_CODE = {"invalid": 400, "unauthorized": 401, "forbidden": 403, "not found": 404, "internal error": 500}


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


def do_group(stream: list, args: dict) -> list:
    """group(columns: [...]) (mode "by"): the new key, tables merged in arrival order."""
    if args.get("mode", "by") != "by":
        raise FluxError('group: only mode "by" is supported by this emulator')
    wanted = list(args.get("columns", []))
    return regroup(as_tables(stream), lambda t: [c for c in t.labels() if c in wanted], lambda t: list(t.columns))


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


def execute(query: str, storage: Storage, now: int, inputs: list[Table] | None = None) -> list[tuple[str, list[Table]]]:
    """Run the query; returns (result name, tables) per yield. `inputs` are the tables that a
    pipeline starting with `tables()` reads: test cases that bypass storage."""
    results = []
    for pipeline in Parser(query).program():
        stream: list = []
        name = "_result"
        for fn_name, args in pipeline:
            if fn_name == "tables" and inputs is not None:
                stream = [Table(list(t.columns), list(t.key), dict(t.key_values), [list(r) for r in t.rows]) for t in inputs]
            elif fn_name == "from":
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
            elif fn_name == "group":
                stream = do_group(stream, args)
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
