"""The emulator against InfluxDB's, Flux's and influxdb-client's own cases, every one of them.

The cases live outside this repository, in ../shared/conformance (or $CONFORMANCE_DIR):
Flux's stdlib tests and InfluxDB's end-to-end query tests (input, query, expected annotated
CSV), the Flux encoder's byte-exact outputs, and the responses recorded in influxdb-client's
tests. The cases are found in their folders and each runs with its own query, so a case
dropped into a folder runs without a change here. A case whose query needs a Flux feature
the loader never sends is listed in DECLINED with the reason (and still checked: the
emulator must refuse it, so the list cannot go stale). When the folder is missing the cases
skip, saying where they looked; under CI (CI=true) that is a failure. No other test file
stands in for these cases.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

import health_metrics_loader as hml
from tests.conftest import unavailable
from tests.influxdb_emulator import (
    Emulator,
    FluxError,
    Table,
    encode_error,
    encode_result,
    encode_results,
    execute,
    parse_time,
)

CONFORMANCE = Path(os.environ.get("CONFORMANCE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "conformance")
NOW_2030 = parse_time("2030-01-01T00:00:00Z")


def conformance(*parts: str) -> Path:
    path = CONFORMANCE.joinpath(*parts)
    if not path.exists():
        unavailable(f"conformance data not found at {path}")
    return path


def query_cases(folder: str) -> list[str]:
    root = CONFORMANCE / folder
    return sorted(p.name for p in root.iterdir() if (p / "query.flux").exists()) if root.exists() else []


# -- An annotated-CSV decoder, independent of the emulator's encoder ---------------------------
def typed(text: str, datatype: str):
    if text == "":
        return None
    if datatype.startswith("dateTime"):
        return parse_time(text)
    if datatype == "double":
        return float(text.replace("+Inf", "inf"))
    if datatype in ("long", "unsignedLong"):
        return int(text)
    if datatype == "boolean":
        return text == "true"
    return text


def decode(text: str) -> list[Table]:
    """Tables of an annotated CSV (any line ends, any annotation order), empty tables included:
    an empty table is an annotation block whose #default row names its table id and key."""
    tables: dict[tuple, Table] = {}
    datatypes = groups = defaults = header = None
    block = -1
    for row in csv.reader(text.replace("\r\n", "\n").split("\n")):
        if not row or row == [""]:
            continue  # Flux's decoder reads on with the same header after an empty line
        if row[0] in ("#datatype", "#group", "#default"):
            if header is not None:
                datatypes = groups = defaults = header = None
            datatypes, groups, defaults = (
                row[1:] if row[0] == "#datatype" else datatypes,
                row[1:] if row[0] == "#group" else groups,
                row[1:] if row[0] == "#default" else defaults,
            )
            continue
        if header is None:
            header, block = row[1:], block + 1
            labels, types = header[2:], [t.replace("RFC3339Nano", "RFC3339") for t in datatypes[2:]]
            key = [c for c, g in zip(labels, groups[2:]) if g == "true"]
            if defaults and defaults[1] != "":  # an empty table: its key values are the defaults
                values = [typed(c, t) for c, t in zip(defaults[2:], types)]
                tables[(block, defaults[1])] = Table(list(zip(labels, types)), key, {c: v for c, v in zip(labels, values) if c in key}, [])
            continue
        cells = [c or (defaults[i] if defaults else "") for i, c in enumerate(row[1:])]
        labels, types = header[2:], [t.replace("RFC3339Nano", "RFC3339") for t in datatypes[2:]]
        key = [c for c, g in zip(labels, groups[2:]) if g == "true"]
        values = [typed(c, t) for c, t in zip(cells[2:], types)]
        ident = (block, cells[1])
        if ident not in tables:
            tables[ident] = Table(list(zip(labels, types)), key, {c: v for c, v in zip(labels, values) if c in key}, [])
        tables[ident].rows.append(values)
    return list(tables.values())


def normalised(tables: list[Table]) -> list:
    """Each table as (group key, columns by label, rows in order), sorted by group key.

    As Flux's testing.diff and InfluxDB's result comparison do, columns are matched by label
    and tables by group key (the cases' SOURCE.txt: column order and table ids in expected.csv
    are not what those tests verify). Nothing else is loosened: every table, empty ones and
    repeated keys included, every column with its type, every row in order, values exact.
    """
    out = []
    for table in tables:
        ident = tuple(sorted((k, repr(table.key_values[k])) for k in table.key))
        labels = table.labels()
        order = sorted(range(len(labels)), key=lambda i: labels[i])
        columns = [table.columns[i] for i in order]
        rows = [[row[i] for i in order] for row in table.rows]
        out.append((ident, columns, rows))
    return sorted(out, key=lambda t: repr(t[0]))


def assert_same_tables(got: list[Table], want: list[Table]) -> None:
    assert normalised(got) == normalised(want)


def emulator_with(tables: list[Table], now: int = NOW_2030) -> Emulator:
    """An emulator whose bucket `test` holds the points of `tables` (as testing.load would)."""
    emulator = Emulator(buckets=("test",), now=lambda: now)
    points = []
    for table in tables:
        labels = table.labels()
        kind = table.types()["_value"]
        tags = [k for k in table.key if k not in ("_measurement", "_field", "_start", "_stop")]
        for row in table.rows:
            r = dict(zip(labels, row))
            points.append((r["_measurement"], tuple(sorted((t, r[t]) for t in tags)), r["_field"], r["_time"], kind, r["_value"]))
    emulator.storage.write("test", points)
    return emulator


# -- Each case with its own query ----------------------------------------------------------------------
DECLINED = {  # case: the Flux feature its query needs, which the loader never sends
    "flux/aggregate_window_mean_create_empty_false_daily": "difference() and map() with math.mMax",
    "flux/window_offset_start_bound": "window()",
    "flux/window_truncated_first_window_and_empty_tables": "window(createEmpty: true)",
    "influxdb_e2e/window_mean_offset_bounds": "window()",
    "influxdb_e2e/window_mean_offset_duplicate_unwindow": "window(), duplicate() and window(every: inf)",
}
BINDINGS = {  # a case whose pipeline is a function: the arguments its testcase passes
    "flux/aggregate_window_mean_empty_windows_timesrc_start": {"every": "10s", "fn": "mean"},
}


def pipeline(text: str, case: str) -> tuple[str, bool]:
    """The case's own query as the emulator takes it, and whether its input goes through storage.

    The input (`csv.from(csv: inData)`, the harness's `from(bucket: v.bucket)`, or a
    transcribed array.from()) becomes the bucket `test`; `testing.load()` marks where
    storage begins. The `|>` steps after that are the query, as written in the case.
    """
    lines = [line.split("//")[0].strip() for line in text.splitlines()]
    for marker in ("testing.load()", "from(bucket: v.bucket)", "csv.from(csv: inData)"):
        start = next((i for i, line in enumerate(lines) if marker in line), None)
        if start is not None:
            break
    loaded = marker != "csv.from(csv: inData)"
    steps, depth = [], 0
    for line in lines[start + 1 :]:
        if depth == 0 and not line.startswith("|>"):
            break
        steps.append(line)
        depth += line.count("(") + line.count("[") - line.count(")") - line.count("]")
    query = ('from(bucket: "test")\n' if loaded else "tables()\n") + "\n".join(steps)
    for name, value in BINDINGS.get(case, {}).items():
        query = re.sub(rf"(\w+: ){name}\b", rf"\g<1>{value}", query)
    return query, loaded


def run_case(folder: Path, case: str) -> list[Table]:
    text = (folder / "query.flux").read_text()
    query, loaded = pipeline(text, case)
    now = re.search(r"option now = \(\) => (\S+)", text)
    now_ns = parse_time(now[1]) if now else NOW_2030
    if not loaded:  # a pipeline over the input itself, without storage
        [(_, got)] = execute(query, Emulator(buckets=()).storage, now_ns, decode((folder / "input.csv").read_text()))
        return got
    if (folder / "input.lp").exists():
        emulator = Emulator(buckets=("test",), now=lambda: now_ns)
        emulator.write_lines("test", (folder / "input.lp").read_text())
    else:
        emulator = emulator_with(decode((folder / "input.csv").read_text()), now_ns)
    [(_, got)] = execute(query, emulator.storage, now_ns)
    return got


CASES = [f"flux/{c}" for c in query_cases("flux")] + [f"influxdb_e2e/{c}" for c in query_cases("influxdb_e2e")]


@pytest.mark.parametrize("case", CASES or ["(none found)"])
def test_each_case_with_its_own_query(case):
    if not CASES:
        unavailable(f"conformance data not found at {CONFORMANCE}")
    folder = conformance(*case.split("/"))
    if case in DECLINED:
        with pytest.raises(FluxError):  # still refused: otherwise the case belongs off this list
            run_case(folder, case)
        pytest.skip(f"declined: needs {DECLINED[case]}, which the loader never sends")
    assert_same_tables(run_case(folder, case), decode((folder / "expected.csv").read_text()))


def test_the_declined_list_names_only_cases_that_exist():
    if not CASES:
        unavailable(f"conformance data not found at {CONFORMANCE}")
    assert set(DECLINED) <= set(CASES)
    print(f"\nconformance: {len(CASES)} query cases, {len(CASES) - len(DECLINED)} run, {len(DECLINED)} declined: {sorted(DECLINED)}")


def test_the_closest_case_to_the_loader_runs_over_http():
    """pivot_after_mean_and_drop and aggregateWindow cases, sent as the loader sends them."""
    import urllib.request

    for case in ("flux/pivot_after_mean_and_drop", "flux/aggregate_window_mean_aligned", "influxdb_e2e/window_mean_aggregatewindow"):
        folder = conformance(*case.split("/"))
        text = (folder / "query.flux").read_text()
        query, _ = pipeline(text, case)
        now = re.search(r"option now = \(\) => (\S+)", text)
        now_ns = parse_time(now[1]) if now else NOW_2030
        if (folder / "input.lp").exists():
            emulator = Emulator(token="t", org="o", buckets=("test",), now=lambda now_ns=now_ns: now_ns)
            emulator.write_lines("test", (folder / "input.lp").read_text())
        else:
            emulator = emulator_with(decode((folder / "input.csv").read_text()), now_ns)
            emulator.token, emulator.org = "t", "o"
        emulator.start()
        try:
            body = json.dumps({"query": query, "dialect": {"annotations": ["datatype", "group", "default"]}}).encode()
            request = urllib.request.Request(
                emulator.url + "/api/v2/query?org=o", data=body, headers={"Authorization": "Token t", "Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                got = decode(answer.read().decode())
        finally:
            emulator.stop()
        assert_same_tables(got, decode((folder / "expected.csv").read_text())), case


# -- Byte-exact wire format: the tables each Flux encoder test feeds in --------------------------
T0, T1 = parse_time("2018-04-17T00:00:00Z"), parse_time("2018-04-17T00:00:01Z")
START, STOP = T0, parse_time("2018-04-17T00:05:00Z")
CPU_COLUMNS = [
    ("_start", "dateTime:RFC3339"),
    ("_stop", "dateTime:RFC3339"),
    ("_time", "dateTime:RFC3339"),
    ("_measurement", "string"),
    ("host", "string"),
    ("_value", "double"),
]
CPU_KEY = ["_start", "_stop", "_measurement", "host"]


def cpu_table(host: str, values: list[float], key: list[str] = CPU_KEY, measurement: str = "cpu") -> Table:
    rows = [[START, STOP, t, measurement, host, v] for t, v in zip((T0, T1), values)]
    return Table(list(CPU_COLUMNS), key, {"_start": START, "_stop": STOP, "_measurement": measurement, "host": host}, rows)


def user_columns_table() -> Table:
    columns = [*CPU_COLUMNS[:4], ("result", "string"), ("table", "string"), ("_value", "double")]
    key = ["_start", "_stop", "_measurement", "result", "table"]
    values = {"_start": START, "_stop": STOP, "_measurement": "cpu", "result": "A", "table": "B"}
    return Table(columns, key, values, [[START, STOP, T0, "cpu", "A", "B", 42.0]])


WIRE_CASES = {
    "single_result.csv": lambda: encode_results([("_result", [cpu_table("A", [42.0, 43.0])])]),
    "group_key_value_change.csv": lambda: encode_results([("_result", [cpu_table("A", [42.0, 43.0]), cpu_table("B", [44.0, 45.0])])]),
    "group_key_column_change.csv": lambda: encode_results(
        [
            (
                "_result",
                [
                    cpu_table("A", [42.0, 43.0]),
                    cpu_table("A", [44.0, 45.0], key=["_start", "_stop", "_measurement"]),
                    cpu_table("B", [46.0, 47.0]),
                ],
            )
        ]
    ),
    "empty_table.csv": lambda: encode_results([("_result", [cpu_table("A", [])])]),
    "two_results.csv": lambda: encode_results([("_result", [cpu_table("A", [42.0, 43.0])]), ("mean", [cpu_table("A", [40.0, 40.1])])]),
    "no_annotations.csv": lambda: encode_result("_result", [cpu_table("A", [42.0, 43.0])], annotations=()),
    "no_annotations_multiple_tables.csv": lambda: encode_result(
        "_result", [cpu_table("A", [42.0, 43.0]), cpu_table("A", [42.0, 43.0], measurement="mem")], annotations=()
    ),
    "error_after_data.csv": lambda: encode_results([("mean", [cpu_table("A", [40.0, 40.1])])]) + "\r\n" + encode_error("test error"),
    "user_columns_named_result_table.csv": lambda: encode_results([("_result", [user_columns_table()])]),
}


def wire_cases() -> list[str]:
    folder = CONFORMANCE / "flux" / "encoder_wire_format"
    return sorted(p.name for p in folder.glob("*.csv")) if folder.exists() else []


@pytest.mark.parametrize("name", wire_cases() or ["(none found)"])
def test_encoder_bytes_match_flux(name):
    expected = conformance("flux", "encoder_wire_format", name).read_bytes()
    assert name in WIRE_CASES, f"{name} is a new encoder case: add the tables its Flux test feeds in"
    assert WIRE_CASES[name]().encode() == expected


# -- influxdb-client's recorded responses, through the loader's reader ----------------------------------
def client_fixtures() -> list[str]:
    folder = CONFORMANCE / "client_fixtures"
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".csv", ".json")) if folder.exists() else []


@pytest.mark.parametrize("name", client_fixtures() or ["(none found)"])
def test_the_loader_reads_each_recorded_client_response(name):
    """Each body as the loader's reader takes it: the same blocks, headers, types and rows as the
    independent decoder finds; an error table as its message; a body that lacks the final empty
    line (these fixtures are trimmed copies; the server always ends with one) as cut off."""
    body = conformance("client_fixtures", name).read_bytes()
    if name.endswith(".json"):
        payload = json.loads(body)
        if "code" in payload:
            assert hml.short_reason(body) == payload["message"]
        else:
            health = Emulator()
            health.start()
            try:
                import urllib.request

                with urllib.request.urlopen(health.url + "/health", timeout=5) as answer:
                    ours = json.loads(answer.read())
            finally:
                health.stop()
            assert {k: type(v) for k, v in payload.items()} == {k: type(ours[k]) for k in payload}
            assert ours["status"] == payload["status"] == "pass"
        return
    text = body.decode()
    if ",error,reference" in text:
        rows = list(csv.reader(text.replace("\r\n", "\n").splitlines()))
        message = rows[rows.index(["", "error", "reference"]) + 1][1]
        with pytest.raises(hml.SourceError) as caught:
            hml.split_blocks(body)
        assert str(caught.value) == f"InfluxDB query failed: {message}"
        return
    if not text.replace("\r\n", "\n").endswith("\n\n") and text.strip():
        with pytest.raises(hml.IncompleteAnswer):
            hml.split_blocks(body)
        return
    blocks = hml.split_blocks(body)
    tables = decode(text)
    assert sum(len([line for line in b.data.split(b"\n") if line.strip()]) for b in blocks) == sum(len(t.rows) for t in tables)
    headers = [b.header[2:] for b in blocks]
    assert all(t.labels() in headers for t in tables)
