"""The emulator against InfluxDB's and Flux's own test cases.

The cases live outside this repository, in ../shared/conformance (or $CONFORMANCE_DIR):
Flux's stdlib tests and InfluxDB's end-to-end query tests (input, query, expected
annotated CSV) and the Flux encoder's byte-exact outputs. Each is skipped, saying so,
when that folder is absent; test_emulator.py covers the same semantics with cases of
its own, so the suite still checks them.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest

from tests.influxdb_emulator import Emulator, Table, do_drop, do_pivot, encode_result, encode_results, execute, parse_time

CONFORMANCE = Path(os.environ.get("CONFORMANCE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "conformance")
NOW_2030 = parse_time("2030-01-01T00:00:00Z")


def conformance(*parts: str) -> Path:
    path = CONFORMANCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"conformance data not found at {path}")
    return path


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
    """Tables of an annotated CSV (any line ends, any annotation order)."""
    tables: dict[tuple, Table] = {}
    datatypes = groups = defaults = header = None
    for row in csv.reader(text.replace("\r\n", "\n").split("\n")):
        if not row or row == [""]:
            continue  # Flux's decoder reads on with the same header after an empty line
        if row[0] == "#datatype":
            datatypes, header = row[1:], None
        elif row[0] == "#group":
            groups, header = row[1:], None
        elif row[0] == "#default":
            defaults, header = row[1:], None
        elif header is None or row[1:3] == ["result", "table"]:
            header = row[1:]
            block = len(tables)
        else:
            cells = [c or (defaults[i] if defaults else "") for i, c in enumerate(row[1:])]
            labels, types = header[2:], [t.replace("RFC3339Nano", "RFC3339") for t in datatypes[2:]]
            key = [c for c, g in zip(labels, groups[2:]) if g == "true"]
            values = [typed(c, t) for c, t in zip(cells[2:], types)]
            ident = (block, cells[1])
            if ident not in tables:
                tables[ident] = Table(list(zip(labels, types)), key, {c: v for c, v in zip(labels, values) if c in key}, [])
            tables[ident].rows.append(values)
    return list(tables.values())


def normalised(tables: list[Table]) -> dict:
    """Tables by group key; rows as label->value maps. Column order and table ids do not count."""
    out = {}
    for table in tables:
        ident = tuple(sorted((k, table.key_values[k]) for k in table.key))
        labels = table.labels()
        out[ident] = (sorted(table.columns), [dict(zip(labels, row)) for row in table.rows])
    return out


def assert_same_tables(got: list[Table], want: list[Table]) -> None:
    got_n, want_n = normalised(got), normalised(want)
    assert sorted(got_n, key=repr) == sorted(want_n, key=repr)
    for ident, (columns, rows) in want_n.items():
        got_columns, got_rows = got_n[ident]
        assert [c for c, _ in got_columns] == [c for c, _ in columns], ident
        assert dict(got_columns) == dict(columns), ident
        assert len(got_rows) == len(rows), ident
        for g, w in zip(got_rows, rows):
            for label, value in w.items():
                if isinstance(value, float):
                    assert math.isclose(g[label], value, rel_tol=1e-9), (ident, label)
                else:
                    assert g[label] == value, (ident, label)


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


LOAD = 'from(bucket: "test")'
FLUX_CASES = {
    "aggregate_window_mean_aligned": f"{LOAD} |> range(start: 2018-05-22T00:00:00Z, stop: 2018-05-22T00:01:00Z) |> aggregateWindow(every: 30s, fn: mean)",
    "aggregate_window_mean_offset": f"{LOAD} |> range(start: 2018-05-22T00:00:00Z, stop: 2018-05-22T00:01:00Z) |> aggregateWindow(every: 30s, fn: mean, offset: 5s)",
    "aggregate_window_mean_unaligned_start": f"{LOAD} |> range(start: 2018-05-22T19:53:26Z, stop: 2018-05-22T19:55:00Z) |> aggregateWindow(every: 30s, fn: mean)",
    "aggregate_window_mean_filter_two_schemas": f"{LOAD} |> range(start: 2018-05-22T00:00:00Z, stop: 2018-05-22T00:01:00Z)"
    ' |> filter(fn: (r) => r._measurement == "disk" or r._measurement == "mem") |> filter(fn: (r) => r.host == "host.remote")'
    " |> aggregateWindow(every: 30s, fn: mean)",
    "drop_non_existent_and_bounds": f'{LOAD} |> range(start: 2018-05-22T19:53:26Z) |> drop(columns: ["non_existent", "dropme1", "dropme2", "_start", "_stop"])',
    "mean_int_uint_float": f"{LOAD} |> range(start: 2018-12-01T00:00:00Z) |> mean()",
    "pivot_fields_mixed_types": f'{LOAD} |> range(start: 2018-05-22T19:53:26Z) |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")',
    "range_start_inclusive": f"{LOAD} |> range(start: 2018-05-22T19:53:36Z)",
    "range_stop_exclusive": f"{LOAD} |> range(start: 2018-05-22T19:53:36Z, stop: 2018-05-22T19:54:16Z)",
}


@pytest.mark.parametrize("case", sorted(FLUX_CASES))
def test_flux_stdlib_case(case):
    folder = conformance("flux", case)
    emulator = emulator_with(decode((folder / "input.csv").read_text()))
    [(_, got)] = execute(FLUX_CASES[case], emulator.storage, NOW_2030)
    assert_same_tables(got, decode((folder / "expected.csv").read_text()))


def test_flux_drop_merges_tables_in_arrival_order():
    folder = conformance("flux", "drop_key_col_merge_tables")
    got = do_drop(decode((folder / "input.csv").read_text()), {"columns": ["b"]})
    assert_same_tables(got, decode((folder / "expected.csv").read_text()))


def test_flux_pivot_last_value_wins():
    folder = conformance("flux", "pivot_duplicate_rowkey_last_wins")
    got = do_pivot(
        decode((folder / "input.csv").read_text()), {"rowKey": ["_time"], "columnKey": ["_measurement", "_field"], "valueColumn": "_value"}
    )
    assert_same_tables(got, decode((folder / "expected.csv").read_text()))


E2E_CASES = {
    # The launcher's harness binds v.bucket; aggregateWindow(offset:) is what the
    # third case's window |> mean |> duplicate |> window(every: inf) expands to.
    "window_mean_aggregatewindow": f'{LOAD} |> range(start: 1970-01-01T00:00:05Z, stop: 1970-01-01T00:00:20Z) |> aggregateWindow(fn: mean, every: 5s) |> keep(columns: ["_time", "_value"])',
    "window_aggregate_last_create_empty_false": f"{LOAD} |> range(start: 1969-12-31T23:59:59Z, stop: 1970-01-01T00:00:33Z) |> aggregateWindow(every: 10s, fn: last, createEmpty: false)",
    "window_mean_offset_duplicate_unwindow": f'{LOAD} |> range(start: 1970-01-01T00:00:05Z, stop: 1970-01-01T00:00:20Z) |> aggregateWindow(every: 5s, offset: 1s, fn: mean) |> keep(columns: ["_time", "_value"])',
}


@pytest.mark.parametrize("case", sorted(E2E_CASES))
def test_influxdb_end_to_end_case(case):
    folder = conformance("influxdb_e2e", case)
    emulator = Emulator(buckets=("test",))
    emulator.write_lines("test", (folder / "input.lp").read_text())
    [(_, got)] = execute(E2E_CASES[case], emulator.storage, NOW_2030)
    assert_same_tables(got, decode((folder / "expected.csv").read_text()))


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
}


@pytest.mark.parametrize("name", sorted(WIRE_CASES))
def test_encoder_bytes_match_flux(name):
    expected = conformance("flux", "encoder_wire_format", name).read_bytes()
    assert WIRE_CASES[name]().encode() == expected
