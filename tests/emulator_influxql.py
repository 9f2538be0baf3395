"""The emulator's InfluxQL, as InfluxDB 1.x answers it on the v1 `/query` API.

Only the statements the loader sends (and a few the conformance cases record):

    SELECT mean(*) FROM <measurement> WHERE time >= '<start>' AND time < '<stop>' GROUP BY time(<every>) fill(none)
    SELECT mean(<field>)[, mean(<field>) …] FROM … (the same clauses)
    SHOW FIELD KEYS FROM <measurement>
    SHOW DATABASES

with the real server's semantics, measured on InfluxDB 1.6.7:
- windows are aligned to the epoch and each mean is stamped with its window's *start*
  (which may lie before the range's start); fill(none) leaves out windows without points;
- mean(*) averages every numeric field over all series of the measurement (tags are not
  grouped), names its columns `mean_<field>` in field order, and skips string and boolean
  fields without a word; mean() of such a field by name is a statement error;
- a statement error (an unknown database, say) is an HTTP 200 with the error inside; a
  syntax error is a 400; no data is a result without `series`;
- with chunked=true, one JSON document per line, `"partial":true` on all but the last;
- with Accept: application/csv, rows as CSV and statement errors dropped (an empty 200).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from tests.emulator_flux import format_double, format_time, parse_time
from tests.emulator_storage import Storage

NUMERIC = {"double": "float", "long": "integer", "unsignedLong": "unsigned"}
FIELD_TYPES = {"double": "float", "long": "integer", "unsignedLong": "unsigned", "string": "string", "boolean": "boolean"}
ITERATORS = {"string": "*query.stringInterruptIterator", "boolean": "*query.booleanInterruptIterator"}
DURATION_UNITS = {
    "ns": 1,
    "u": 10**3,
    "µ": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
    "d": 86400 * 10**9,
    "w": 7 * 86400 * 10**9,
}


class ParseError(Exception):
    """A syntax error: HTTP 400 with {"error": "error parsing query: …"}."""


class StatementError(Exception):
    """An error of a statement that parsed: HTTP 200 with the error inside its result."""


# -- Parsing --------------------------------------------------------------------------------
TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>'(?:[^'\\]|\\.)*')
    | (?P<quoted>"(?:[^"\\]|\\.)*")
    | (?P<duration>\d+(?:ns|ms|u|µ|s|m|h|d|w))
    | (?P<op>>=|<=|[(),*<>=])
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Select:
    measurement: str
    fields: tuple[str, ...] | None  # None: mean(*)
    start: int
    stop: int
    every: int


@dataclass(frozen=True)
class Show:
    what: str  # "field keys" or "databases"
    measurement: str = ""


class Tokens:
    """The statement's tokens, taken in order; a mismatch says what InfluxDB's parser says."""

    def __init__(self, text: str) -> None:
        self.text, self.items, pos = text, [], 0
        while pos < len(text.rstrip()):
            match = TOKEN.match(text, pos)
            if not match or match.end() == pos:
                raise ParseError(f"found {text[pos]}, expected identifier at line 1, char {pos + 1}")
            self.items.append((match.lastgroup, match[match.lastgroup], match.start(match.lastgroup)))
            pos = match.end()
        self.pos = 0

    def take(self, expected: str, kinds: tuple[str, ...] = ()) -> str:
        """The next token if it is `expected` (a keyword, ignoring case) or of one of `kinds`."""
        if self.pos >= len(self.items):
            # InfluxDB's scanner has read one character more after a name than after a number.
            past = 2 if self.items and self.items[-1][0] == "ident" else 1
            raise ParseError(f"found EOF, expected {expected} at line 1, char {len(self.text) + past}")
        kind, text, start = self.items[self.pos]
        if kind in kinds or (not kinds and text.upper() == expected.upper()):
            self.pos += 1
            return text
        raise ParseError(f"found {text}, expected {expected} at line 1, char {start + 1}")

    def peek(self, value: str) -> bool:
        return self.pos < len(self.items) and self.items[self.pos][1].upper() == value.upper()

    def identifier(self) -> str:
        text = self.take("identifier", ("ident", "quoted"))
        return re.sub(r"\\(.)", r"\1", text[1:-1]) if text.startswith('"') else text

    def end(self) -> None:
        if self.pos < len(self.items):
            _, text, start = self.items[self.pos]
            raise ParseError(f"found {text}, expected ; at line 1, char {start + 1}")


def parse(text: str) -> Select | Show:
    tokens = Tokens(text)
    if tokens.peek("SHOW"):
        tokens.take("SHOW")
        if tokens.peek("DATABASES"):
            tokens.take("DATABASES")
            tokens.end()
            return Show("databases")
        tokens.take("FIELD")
        tokens.take("KEYS")
        tokens.take("FROM")
        measurement = tokens.identifier()
        tokens.end()
        return Show("field keys", measurement)
    tokens.take("SELECT")
    fields: list[str] | None = []
    while True:
        tokens.take("mean")
        tokens.take("(")
        if tokens.peek("*"):
            tokens.take("*")
            fields = None
        else:
            fields.append(tokens.identifier())
        tokens.take(")")
        if fields is None or not tokens.peek(","):
            break
        tokens.take(",")
    tokens.take("FROM")
    measurement = tokens.identifier()
    tokens.take("WHERE")
    bounds = {}
    for index, op in enumerate((">=", "<")):
        if index:
            tokens.take("AND")
        tokens.take("time")
        tokens.take(op)
        bounds[op] = parse_time(tokens.take("string", ("string",))[1:-1])
    tokens.take("GROUP")
    tokens.take("BY")
    tokens.take("time")
    tokens.take("(")
    every = duration(tokens.take("duration", ("duration",)))
    tokens.take(")")
    tokens.take("fill")
    tokens.take("(")
    tokens.take("none")
    tokens.take(")")
    tokens.end()
    return Select(measurement, None if fields is None else tuple(fields), bounds[">="], bounds["<"], every)


def duration(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(\D+)", text).groups()
    return int(number) * DURATION_UNITS[unit]


# -- Answering --------------------------------------------------------------------------------
@dataclass
class Series:
    """One statement's answer: a name, columns and rows (an empty list: no `series` at all)."""

    name: str
    columns: list[str]
    rows: list[list[Any]]


def execute(text: str, database: str, storage: Storage) -> list[Series]:
    """Raises ParseError or StatementError as the real server would fail."""
    statement = parse(text)
    if isinstance(statement, Show) and statement.what == "databases":
        return [Series("databases", ["name"], [[name] for name in sorted(storage.buckets)])]
    if not database:
        raise StatementError("database name required")
    if database not in storage.buckets:
        raise StatementError(f"database not found: {database}")
    with storage.lock:
        series = {key: s for key, s in storage.buckets[database].items() if key[0] == statement.measurement}
    if isinstance(statement, Show):
        types = {key[2]: FIELD_TYPES[s.kind] for key, s in series.items()}
        return [Series(statement.measurement, ["fieldKey", "fieldType"], [[k, types[k]] for k in sorted(types)])] if types else []
    return select_means(statement, series)


def select_means(statement: Select, series: dict[tuple, Any]) -> list[Series]:
    kinds = {key[2]: s.kind for key, s in series.items()}
    if statement.fields is None:
        fields = sorted(f for f, kind in kinds.items() if kind in NUMERIC)
        columns = [f"mean_{f}" for f in fields]
    else:
        for f in statement.fields:
            if kinds.get(f) in ITERATORS:
                raise StatementError(f"unsupported mean iterator type: {ITERATORS[kinds[f]]}")
        fields = list(statement.fields)
        columns = ["mean" if i == 0 else f"mean_{i}" for i in range(len(fields))]
    # Summed as InfluxDB does: series by series (in series-key order), each in time order.
    sums: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for (_, _, field_key), s in sorted(series.items(), key=lambda item: item[0]):
        if field_key not in fields:
            continue
        times, values = s.sorted()
        for stamp, value in zip(times, values):
            if statement.start <= stamp < statement.stop:
                cell = sums[stamp // statement.every * statement.every][field_key]
                cell[0] += value
                cell[1] += 1
    rows = []
    for window in sorted(sums):
        cells = sums[window]
        rows.append([window, *((cells[f][0] / cells[f][1]) if f in cells else None for f in fields)])
    return [Series(statement.measurement, ["time", *columns], rows)] if rows else []


# -- Encoding ---------------------------------------------------------------------------------
def go_float(value: float) -> str:
    """Go's encoding/json for a float64: shortest digits, an exponent only when very large or small."""
    if value != 0 and (abs(value) < 1e-6 or abs(value) >= 1e21):
        mantissa, exponent = f"{value:e}".split("e")[0], int(f"{value:e}".split("e")[1])
        mantissa = repr(value).split("e")[0] if "e" in repr(value) else mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent)}"
    return format_double(value)


def json_value(value: Any, epoch: bool) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    return json.dumps(value, ensure_ascii=False)


def encode_rows(rows: list[list[Any]], epoch: bool, timed: bool) -> str:
    """Rows as JSON arrays; in a series of times, the first cell as epoch nanoseconds or RFC3339."""
    out = []
    for row in rows:
        cells = [json_value(v, epoch) for v in row]
        if timed:
            cells[0] = str(row[0]) if epoch else json.dumps(format_time(row[0]))
        out.append("[" + ",".join(cells) + "]")
    return "[" + ",".join(out) + "]"


def series_json(s: Series, rows: list[list[Any]], epoch: bool, partial: bool) -> str:
    parts = [f'"name":{json.dumps(s.name)}', f'"columns":{json.dumps(s.columns, ensure_ascii=False, separators=(",", ":"))}']
    if rows:
        parts.append(f'"values":{encode_rows(rows, epoch, s.columns[:1] == ["time"])}')
    if partial:
        parts.append('"partial":true')
    return "{" + ",".join(parts) + "}"


def encode_json(series: list[Series], epoch: bool, chunk_size: int | None) -> str:
    """The body: one document, or with `chunk_size` one document per chunk of rows, a line each."""
    if not series:
        return '{"results":[{"statement_id":0}]}\n'
    if not chunk_size:
        return '{"results":[{"statement_id":0,"series":[' + ",".join(series_json(s, s.rows, epoch, False) for s in series) + "]}]}\n"
    pieces = [(s, s.rows[i : i + chunk_size]) for s in series for i in range(0, max(len(s.rows), 1), chunk_size)]
    lines = []
    for i, (s, rows) in enumerate(pieces):
        more = i < len(pieces) - 1
        series_continues = more and pieces[i + 1][0] is s
        result_partial = ',"partial":true' if more else ""
        lines.append(f'{{"results":[{{"statement_id":0,"series":[{series_json(s, rows, epoch, series_continues)}]{result_partial}}}]}}\n')
    return "".join(lines)


def encode_csv(series: list[Series], epoch: bool) -> str:
    out = []
    for s in series:
        if not out:
            out.append(",".join(["name", "tags", *s.columns]) + "\n")
        for row in s.rows:
            stamp = str(row[0]) if epoch else format_time(row[0])
            cells = ["" if v is None else go_float(v) if isinstance(v, float) else str(v) for v in row[1:]]
            out.append(",".join([s.name, "", stamp, *cells]) + "\n")
    return "".join(out)


def statement_error(message: str) -> str:
    return json.dumps({"results": [{"statement_id": 0, "error": message}]}, separators=(",", ":")) + "\n"
