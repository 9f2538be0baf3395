"""The emulator in its own right: the target pipeline, the HTTP API and the fault switches."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from influxdb_client import InfluxDBClient
from influxdb_client.client.flux_csv_parser import FluxQueryException
from influxdb_client.rest import ApiException
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from tests.conftest import ORG, TOKEN
from tests.influxdb_emulator import Emulator, Fault, execute, format_double, format_time, parse_line, parse_time

TARGET = """from(bucket: "pulse_oximeter")
  |> range(start: 2021-07-12T14:00:00Z, stop: 2021-07-12T15:00:00Z)
  |> filter(fn: (r) => r._measurement == "spo2")
  |> aggregateWindow(every: 5s, fn: mean, createEmpty: false)
  |> drop(columns: ["_start", "_stop", "_measurement", "uid"])
  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")"""

H14 = 1626098400  # 2021-07-12T14:00:00Z


def request(url: str, path: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
    req = urllib.request.Request(url + path, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def query_body(query: str, annotations=("datatype", "group", "default")) -> bytes:
    return json.dumps({"query": query, "dialect": {"annotations": list(annotations)}}).encode()


AUTH = {"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"}


# -- The target pipeline, point by point (SEMANTICS §11's worked example) ---------------------
def test_target_pipeline_worked_example():
    emulator = Emulator()
    emulator.write_lines(
        "pulse_oximeter",
        "\n".join(
            [
                f"spo2,uid=A pulse=70i,spo2=97.0 {H14}",
                f"spo2,uid=A pulse=73i,spo2=96.0 {H14 + 2}",
                f"spo2,uid=A pulse=75i,spo2=95.5 {H14 + 7}",
                f"spo2,uid=A pulse=80i,spo2=94.0 {H14 + 3599}",
                f"spo2,uid=A pulse=99i,spo2=99.0 {H14 + 3600}",  # the stop instant: left out
                f"spo2,uid=A pulse=50i,spo2=50.0 {H14 - 1}",  # before the start: left out
                f"spo2,uid=B spo2=91.0 {H14 + 3}",
                f"spo2,uid=B temp=36.6 {H14 + 20}",
            ]
        ),
        precision="s",
    )
    body = emulator.answer(TARGET, ("datatype", "group", "default")).decode()
    assert body == (
        "#datatype,string,long,dateTime:RFC3339,double,double,double\r\n"
        "#group,false,false,false,false,false,false\r\n"
        "#default,_result,,,,,\r\n"
        ",result,table,_time,pulse,spo2,temp\r\n"
        ",,0,2021-07-12T14:00:05Z,71.5,91,\r\n"  # B's spo2 table comes after A's: the last value wins
        ",,0,2021-07-12T14:00:10Z,75,95.5,\r\n"
        ",,0,2021-07-12T15:00:00Z,80,94,\r\n"
        ",,0,2021-07-12T14:00:25Z,,,36.6\r\n"  # first appearance order, not time order
        "\r\n"
    )


def test_nothing_matched_is_a_bare_crlf():
    emulator = Emulator()
    assert emulator.answer(TARGET, ("datatype", "group", "default")) == b"\r\n"


def test_clipped_windows_off_grid():
    emulator = Emulator(buckets=("b",))
    emulator.write_lines("b", "m f=1 0\nm f=3 4\nm f=10 7\nm f=20 9", precision="s")
    [(_, [table])] = execute(
        'from(bucket: "b") |> range(start: 1970-01-01T00:00:03Z, stop: 1970-01-01T00:00:08Z) |> aggregateWindow(every: 5s, fn: mean)',
        emulator.storage,
        0,
    )
    assert [(row[2], row[3]) for row in table.rows] == [(5 * 10**9, 3.0), (8 * 10**9, 10.0)]


def test_mean_of_a_string_field_fails_like_influxdb():
    emulator = Emulator()
    emulator.write_lines("pulse_oximeter", f'spo2,uid=A spo2=97,note="ok" {H14 + 1}', precision="s")
    with pytest.raises(Exception, match="unsupported input type for mean aggregate: string"):
        emulator.answer(TARGET, ())


def test_integer_means_are_doubles_and_mixed_uids_merge():
    """Two devices: the means are doubles, and dropping uid merges their tables, so pivot keeps
    one row per time with the value of the table that came last (uid B)."""
    emulator = Emulator()
    lines = [
        f"spo2,uid=A pulse=1i {H14}",
        f"spo2,uid=A pulse=2i {H14 + 1}",
        f"spo2,uid=B pulse=7i {H14 + 2}",
        f"spo2,uid=B spo2=97.5 {H14 + 6}",
    ]
    emulator.write_lines("pulse_oximeter", "\n".join(lines), precision="s")
    assert emulator.answer(TARGET, ("datatype", "group", "default")).decode() == (
        "#datatype,string,long,dateTime:RFC3339,double,double\r\n"
        "#group,false,false,false,false,false\r\n"
        "#default,_result,,,,\r\n"
        ",result,table,_time,pulse,spo2\r\n"
        ",,0,2021-07-12T14:00:05Z,7,\r\n"
        ",,0,2021-07-12T14:00:10Z,,97.5\r\n"
        "\r\n"
    )


# -- Line protocol and formatting ------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "points"),
    [
        ("m,t=a f=1.5 10", [("m", (("t", "a"),), "f", 10, "double", 1.5)]),
        (
            'm f=1i,g=2u,h=true,s="x y" 10',
            [
                ("m", (), "f", 10, "long", 1),
                ("m", (), "g", 10, "unsignedLong", 2),
                ("m", (), "h", 10, "boolean", True),
                ("m", (), "s", 10, "string", "x y"),
            ],
        ),
        (r"my\ m,t\,k=a\ b f=-3 1", [("my m", (("t,k", "a b"),), "f", 1, "double", -3.0)]),
        ("m f=1", [("m", (), "f", 99, "double", 1.0)]),
    ],
)
def test_line_protocol(line, points):
    assert parse_line(line, "ns", now_ns=99) == points


@pytest.mark.parametrize("line", ["m", "m f=", "m,t f=1", "m f=abc 1", "m f=NaN 1"])
def test_bad_line_protocol(line):
    with pytest.raises(ValueError):
        parse_line(line, "ns", now_ns=0)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (42.0, "42"),
        (40.1, "40.1"),
        (13.2, "13.2"),
        (1e21, "1000000000000000000000"),
        (1e-7, "0.0000001"),
        (float("nan"), "NaN"),
        (float("inf"), "+Inf"),
        (-float("inf"), "-Inf"),
        (5713765717.333333, "5713765717.333333"),
    ],
)
def test_doubles_print_like_go(value, text):
    assert format_double(value) == text


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2021-07-12T14:00:05Z", 1626098405 * 10**9),
        ("2021-05-24T08:45:44.7850004Z", 1621845944785000400),
        ("1970-01-01T00:00:00.000000001Z", 1),
    ],
)
def test_times_round_trip_rfc3339nano(text, ns):
    assert parse_time(text) == ns
    assert format_time(ns) == text


# -- HTTP ------------------------------------------------------------------------------------
def test_health_and_ping(influx):
    status, headers, body = request(influx.url, "/health")
    assert status == 200 and json.loads(body)["status"] == "pass"
    status, headers, body = request(influx.url, "/ping")
    assert status == 204 and headers["X-Influxdb-Build"] == "OSS"


@pytest.mark.parametrize(
    "precision, stamp", [("s", "1626098405"), ("ms", "1626098405000"), ("us", "1626098405000000"), ("ns", "1626098405000000000")]
)
def test_write_precisions(influx, precision, stamp):
    status, _, _ = request(
        influx.url, f"/api/v2/write?org={ORG}&bucket=pulse_oximeter&precision={precision}", f"spo2,uid=A spo2=97 {stamp}".encode(), AUTH
    )
    assert status == 204
    status, headers, body = request(influx.url, f"/api/v2/query?org={ORG}", query_body(TARGET), AUTH)
    assert status == 200
    assert headers["Content-Type"] == "text/csv; charset=utf-8"
    assert headers["Transfer-Encoding"] == "chunked"
    assert body.endswith(b",,0,2021-07-12T14:00:10Z,97\r\n\r\n")


@pytest.mark.parametrize(
    ("path", "headers", "body", "status", "code"),
    [
        (f"/api/v2/query?org={ORG}", {"Authorization": "Token wrong"}, query_body(TARGET), 401, "unauthorized"),
        (f"/api/v2/query?org={ORG}", {}, query_body(TARGET), 401, "unauthorized"),
        ("/api/v2/query", AUTH, query_body(TARGET), 400, "invalid"),
        (f"/api/v2/query?org={ORG}", AUTH, query_body(TARGET.replace("pulse_oximeter", "nope")), 404, "not found"),
        (f"/api/v2/query?org={ORG}", AUTH, query_body('from(bucket: "pulse_oximeter") |> nosuch()'), 400, "invalid"),
        (f"/api/v2/query?org={ORG}", AUTH, b"not json", 400, "invalid"),
        (f"/api/v2/write?org={ORG}&bucket=nope", AUTH, b"m f=1 1", 404, "not found"),
        (f"/api/v2/write?org={ORG}&bucket=pulse_oximeter", AUTH, b"m f=", 400, "invalid"),
    ],
)
def test_errors_are_json_like_influxdb(influx, path, headers, body, status, code):
    got_status, got_headers, got_body = request(influx.url, path, body, headers)
    assert got_status == status
    assert got_headers["Content-Type"] == "application/json; charset=utf-8"
    payload = json.loads(got_body)
    assert payload["code"] == code and payload["message"]


def test_vnd_flux_body_has_no_annotations(influx):
    influx.write_lines("pulse_oximeter", f"spo2,uid=A spo2=97 {H14 + 1}", precision="s")
    status, _, body = request(influx.url, f"/api/v2/query?org={ORG}", TARGET.encode(), {**AUTH, "Content-Type": "application/vnd.flux"})
    assert status == 200
    assert body == b",result,table,_time,spo2\r\n,_result,0,2021-07-12T14:00:05Z,97\r\n\r\n"


def test_gzip_only_from_1400_bytes(influx):
    headers = {**AUTH, "Accept-Encoding": "gzip"}
    influx.write_lines("pulse_oximeter", f"spo2,uid=A spo2=97 {H14 + 1}", precision="s")
    _, small_headers, _ = request(influx.url, f"/api/v2/query?org={ORG}", query_body(TARGET), headers)
    assert "Content-Encoding" not in small_headers
    influx.write_lines("pulse_oximeter", "\n".join(f"spo2,uid=A spo2=97 {H14 + s}" for s in range(0, 3600, 5)), precision="s")
    _, big_headers, body = request(influx.url, f"/api/v2/query?org={ORG}", query_body(TARGET), headers)
    assert big_headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).startswith(b"#datatype")


# -- Faults, seen through the real influxdb-client ---------------------------------------------
@pytest.fixture
def client(influx):
    influx.write_lines("pulse_oximeter", "\n".join(f"spo2,uid=A pulse=70i,spo2=97 {H14 + s}" for s in range(60)), precision="s")
    with InfluxDBClient(url=influx.url, token=TOKEN, org=ORG, timeout=2000) as client:
        yield client


def test_fault_429_with_retry_after(influx, client):
    influx.inject(Fault("status", status=429, retry_after=7, message="org has exceeded limited_read plan limit"))
    with pytest.raises(ApiException) as caught:
        client.query_api().query_raw(TARGET)
    assert caught.value.status == 429
    assert caught.value.retry_after == "7"
    assert caught.value.message == "org has exceeded limited_read plan limit"
    assert client.query_api().query_raw(TARGET).data.startswith(b"#datatype")  # one fault, one request


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, "invalid", "compilation failed: error @1:1-1:5: undefined identifier"),
        (401, "unauthorized", "unauthorized access"),
        (403, "forbidden", "insufficient permissions for read:orgs/04014de4ed590000/buckets"),
        (404, "not found", "failed to initialize execute state: could not find bucket"),
        (429, "too many requests", "org 04014de4ed590000 has exceeded limited_read plan limit"),
        (503, "unavailable", "service unavailable"),
        (500, "internal error", "internal error"),
    ],
)
def test_injected_statuses_carry_the_real_code_and_message(influx, status, code, message):
    influx.inject(Fault("status", status=status))
    got, headers, body = request(influx.url, "/api/v2/query?org=" + ORG, query_body(TARGET), AUTH)
    assert (got, headers["X-Platform-Error-Code"], json.loads(body)) == (status, code, {"code": code, "message": message})


@pytest.mark.parametrize(("retry_after", "fractional", "header"), [(1.5, False, "2"), (0, False, "0"), (7, False, "7"), (1.5, True, "1.5")])
def test_retry_after_goes_in_whole_seconds_unless_asked(influx, retry_after, fractional, header):
    influx.inject(Fault("status", status=429, retry_after=retry_after, fractional=fractional))
    _, headers, _ = request(influx.url, "/api/v2/query?org=" + ORG, query_body(TARGET), AUTH)
    assert headers["Retry-After"] == header


def test_a_gateway_page_is_html_without_influxdb_headers(influx):
    influx.inject(Fault("gateway", status=502))
    status, headers, body = request(influx.url, "/api/v2/query?org=" + ORG, query_body(TARGET), AUTH)
    assert (status, headers["Content-Type"], "X-Influxdb-Version" in headers) == (502, "text/html", False)
    assert b"<title>502 Bad Gateway</title>" in body


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_fault_5xx(influx, client, status):
    influx.inject(Fault("status", status=status))
    with pytest.raises(ApiException) as caught:
        client.query_api().query_raw(TARGET)
    assert caught.value.status == status


def test_fault_error_table_after_data(influx, client):
    influx.inject(Fault("error_table", message="panic: runtime error", keep_rows=2))
    body = client.query_api().query_raw(TARGET).data
    assert body.count(b"\r\n,,0,") == 2
    assert body.endswith(b",error,reference\r\n,panic: runtime error,\r\n")
    influx.inject(Fault("error_table", message="panic: runtime error"))
    with pytest.raises(FluxQueryException, match="panic"):
        client.query_api().query(TARGET)


def test_fault_truncated_body(influx, client):
    influx.inject(Fault("truncate", keep_bytes=300))
    with pytest.raises(ProtocolError):
        _ = client.query_api().query_raw(TARGET).data


def test_fault_reset(influx, client):
    influx.inject(Fault("reset"))
    with pytest.raises(ProtocolError):
        client.query_api().query_raw(TARGET)


def test_fault_slow_answer_times_out(influx, client):
    influx.inject(Fault("slow", delay=3))
    with pytest.raises(ReadTimeoutError):
        client.query_api().query_raw(TARGET)


def test_faults_over_http(influx, client):
    status, _, _ = request(
        influx.url, "/emulator/faults", json.dumps([{"kind": "status", "status": 503}]).encode(), {"Content-Type": "application/json"}
    )
    assert status == 204
    with pytest.raises(ApiException) as caught:
        client.query_api().query_raw(TARGET)
    assert caught.value.status == 503


def test_runs_on_its_own():
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.influxdb_emulator", "--port", "0", "--token", "T", "--org", "O"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        url = line.split(" on ")[1].split(" ")[0]
        status, _, body = request(url, "/health")
        assert status == 200 and json.loads(body)["status"] == "pass"
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert "serving on http://127.0.0.1:" in line


def test_answers_are_memoised_by_tokens_until_a_write():
    emulator = Emulator()
    emulator.write_lines("pulse_oximeter", f"spo2,uid=A spo2=97 {H14 + 1}", precision="s")
    first = emulator.answer(TARGET, ())
    assert emulator.answer(" ".join(TARGET.split()), ()) is first  # same tokens, other spacing
    emulator.write_lines("pulse_oximeter", f"spo2,uid=A spo2=99 {H14 + 2}", precision="s")
    assert emulator.answer(TARGET, ()) == b",result,table,_time,spo2\r\n,_result,0,2021-07-12T14:00:05Z,98\r\n\r\n"
