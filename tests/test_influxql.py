"""InfluxQL over the v1 /query API: the query and its answer, the emulator against the recorded
cases and against a real InfluxDB 1.x, and the loader end to end against that real server."""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from datetime import timedelta

import psycopg2
import pytest

import health_metrics_loader as hml
from tests.conftest import ROOT, TOKEN, unavailable, utc
from tests.influxdb_emulator import Emulator, Fault
from tests.synthetic import expected_rows, line_protocol
from tests.test_catch_up import ledger
from tests.test_main import assert_rows, stored

CASES = ROOT.parent / "shared" / "conformance" / "influxql"
H14 = utc(2021, 7, 12, 14)
WINDOW = hml.Window(H14, H14 + timedelta(hours=1))
DAY0 = utc(2021, 7, 12)


def settings(**changes: str) -> hml.Settings:
    env = {"CONNECTION": "http://x", "PG_CONNECT": "postgresql://u:pg-secret@h/d", "INFLUX_QUERY_LANGUAGE": "influxql", **changes}
    return hml.settings_from_env(env)


# -- The query -------------------------------------------------------------------------------------
def test_the_query_is_the_blog_pipeline_in_influxql():
    assert hml.influxql_query(settings(), WINDOW) == (
        "SELECT mean(*) FROM \"spo2\" WHERE time >= '2021-07-12T14:00:00Z' AND time < '2021-07-12T15:00:00Z' GROUP BY time(5s) fill(none)"
    )


@pytest.mark.parametrize(
    ("name", "quoted"),
    [("spo2", '"spo2"'), ("spo2 quoted", '"spo2 quoted"'), ('a"b', '"a\\"b"'), ("a\\b", '"a\\\\b"'), ('x"; DROP', '"x\\"; DROP"')],
)
def test_identifiers_are_quoted_the_influxql_way(name, quoted):
    assert hml.influxql_identifier(name) == quoted


@pytest.mark.parametrize(
    ("every", "literal"), [("5s", "5s"), ("1m30s", "90s"), ("1m", "1m"), ("1h", "1h"), ("60m", "1h"), ("1500ms", "1500ms")]
)
def test_windows_are_one_number_and_one_unit(every, literal):
    assert f"GROUP BY time({literal}) fill(none)" in hml.influxql_query(settings(AGGREGATE_EVERY=every), WINDOW)


@pytest.mark.parametrize(
    ("token", "header"),
    [
        ("", {}),
        ("apiToken-abc==", {"Authorization": "Token apiToken-abc=="}),
        ("admin:pw", {"Authorization": "Basic " + base64.b64encode(b"admin:pw").decode()}),
    ],
)
def test_credentials(token, header):
    assert hml.influxql_auth(token) == header


def test_influxql_needs_neither_token_nor_org():
    chosen = settings(INFLUX_RETENTION_POLICY="autogen")
    assert (chosen.query_language, chosen.token, chosen.org, chosen.retention_policy) == ("influxql", "", "", "autogen")
    with pytest.raises(hml.ConfigError, match="INFLUX_QUERY_LANGUAGE must be flux"):
        settings(INFLUX_QUERY_LANGUAGE="sql")


def test_a_user_password_token_is_masked_in_both_forms():
    chosen = settings(TOKEN="admin:s3cret-pw")
    assert hml.Redactor(chosen.secrets()).redact("u=admin p=s3cret-pw t=admin:s3cret-pw") == "u=admin p=*** t=***"


# -- The answer -------------------------------------------------------------------------------------
def recorded(case: str) -> bytes:
    path = CASES / case / "body"
    if not path.exists():
        unavailable(f"the recorded InfluxQL answers are missing: {CASES}")
    return path.read_bytes()


def frame_rows(frame) -> list[tuple]:
    return [tuple(None if v != v else v for v in row) for row in frame.itertuples(index=False)]


@pytest.mark.parametrize("case", ["edges_epoch_ns", "edges_chunked"])
def test_window_starts_become_window_stops(case):
    frame = hml.clean(hml.read_influxql_answer(recorded(case), 5 * 10**9, WINDOW))
    assert frame_rows(frame) == [
        (utc(2021, 7, 12, 14, 0, 5), 61.5, 91.5),
        (utc(2021, 7, 12, 14, 0, 10), 63.0, 93.0),
        (utc(2021, 7, 12, 15), 64.0, 94.0),  # the point at 14:59:59.999999999 belongs to hour 14
    ]


def test_a_missing_field_is_null_and_integers_are_floats():
    frame = hml.clean(hml.read_influxql_answer(recorded("missing_fields_and_empty_windows"), 5 * 10**9, WINDOW))
    assert frame_rows(frame) == [(utc(2021, 7, 12, 14, 0, 5), 72.0, None), (utc(2021, 7, 12, 14, 0, 25), None, 92.0)]
    integers = hml.clean(hml.read_influxql_answer(recorded("integer_fields"), 5 * 10**9, WINDOW))
    assert list(integers.dtypes.astype(str)) == ["datetime64[ns, UTC]", "float64", "float64"]


def test_the_last_window_is_clipped_at_the_chunk_stop():
    body = b'{"results":[{"statement_id":0,"series":[{"name":"m","columns":["time","mean_x"],"values":[[1626101995000000000,1]]}]}]}\n'
    frame = hml.read_influxql_answer(body, 60 * 10**9, WINDOW)
    assert list(frame["_time"]) == [WINDOW.stop]


def test_no_data_is_an_empty_frame():
    assert hml.read_influxql_answer(recorded("no_such_measurement"), 5 * 10**9, WINDOW).empty


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_such_database", "InfluxDB query failed: database not found: nosuchdb: check INFLUX_BUCKET (the database)"),
        ("string_field_named", "InfluxDB query failed: unsupported mean iterator type: *query.stringInterruptIterator"),
    ],
)
def test_a_statement_error_inside_a_200_is_an_error(case, message):
    with pytest.raises(hml.SourceError) as caught:
        hml.read_influxql_answer(recorded(case), 5 * 10**9, WINDOW)
    assert str(caught.value) == message and not isinstance(caught.value, hml.TransientSourceError)


@pytest.mark.parametrize(
    "cut",
    [
        lambda body: body[: len(body) // 2],  # ends mid-line
        lambda body: body.splitlines(keepends=True)[0],  # the first of two documents, which says more is to come
        lambda body: b"",
    ],
)
def test_a_cut_off_answer_is_incomplete(cut):
    with pytest.raises(hml.IncompleteAnswer):
        hml.read_influxql_answer(cut(recorded("edges_chunked")), 5 * 10**9, WINDOW)


def test_a_partial_answer_from_a_row_limit_is_never_stored():
    body = b'{"results":[{"statement_id":0,"series":[{"name":"m","columns":["time","mean_x"],"values":[[1626098400000000000,1]],"partial":true}]}]}\n'
    with pytest.raises(hml.IncompleteAnswer, match="more was to come"):
        hml.read_influxql_answer(body, 5 * 10**9, WINDOW)


# -- The emulator against every recorded case ----------------------------------------------------------
def case_order() -> list[str]:
    index = CASES / "INDEX.md"
    if not index.exists():
        return []
    listed = [line.split("|")[1].strip() for line in index.read_text().splitlines()[2:] if line.startswith("|")]
    return listed + sorted(p.name for p in CASES.iterdir() if p.is_dir() and p.name not in listed)


def send(url: str, request: dict, token: str | None) -> tuple[int, bytes]:
    """The recorded request, its `<user:password>` placeholders made real."""
    headers = {}
    for key, value in request.get("headers", {}).items():
        match = re.fullmatch(r"(Basic|Token) <(.*)>", value)
        if match:
            value = f"{match[1]} " + (base64.b64encode(match[2].encode()).decode() if match[1] == "Basic" else match[2])
        headers[key] = value
    if token:
        headers.setdefault("Authorization", f"Token {token}")
    address = url + request["path"] + "?" + urllib.parse.urlencode(request["params"])
    try:
        with urllib.request.urlopen(urllib.request.Request(address, headers=headers, method=request["method"]), timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.parametrize("case", case_order() or ["(none found)"])
def test_the_emulator_answers_each_recorded_case_byte_for_byte(case):
    """Each case runs on a new emulator that first replays the writes of the cases before it,
    as the recording did; a case recorded with authentication on gets a server with its user."""
    order = case_order()
    if not order:
        unavailable(f"the recorded InfluxQL cases are missing: {CASES}")
    request = json.loads((CASES / case / "request.json").read_text())
    if request.get("server"):
        emulator = Emulator(buckets=(), v1_users={"admin": "pw"})
    else:
        emulator = Emulator(token=TOKEN, buckets=("pulse_oximeter", "pulse oximeter"))
        for earlier in order[: order.index(case) + 1]:
            lines = (CASES / earlier / "write.lp").read_text()
            earlier_request = json.loads((CASES / earlier / "request.json").read_text())
            if lines.strip() and not earlier_request.get("server"):
                emulator.write_lines(earlier_request["params"].get("db", "pulse_oximeter"), lines)
    emulator.start()
    try:
        status, body = send(emulator.url, request, None if request.get("server") else TOKEN)
    finally:
        emulator.stop()
    want = json.loads((CASES / case / "response.json").read_text())
    assert (status, body) == (want["status"], (CASES / case / "body").read_bytes())


# -- The emulator against the real server, on generated data -------------------------------------------
MIXED = "\n".join(
    [
        line_protocol(H14 - timedelta(minutes=3), 0.2).rstrip(),
        *(f"spo2,uid=A temp={36 + i / 7} {int(H14.timestamp()) + 61 * i}" for i in range(40)),  # a field in some windows only
        *(
            f"spo2_two,uid={u} pulse={60 + i % 9}i,spo2={95.5 + (i % 4) / 3} {int(H14.timestamp()) + 3 * i + (u == 'B')}"
            for u in "AB"
            for i in range(400)
        ),
        *(f'spo2_str,uid=A pulse=70,note="n{i}",ok={str(i % 2 == 0).lower()} {int(H14.timestamp()) + i}' for i in range(30)),
    ]
)
QUERIES = [
    "SELECT mean(*) FROM \"spo2\" WHERE time >= '2021-07-12T14:00:00Z' AND time < '2021-07-12T15:00:00Z' GROUP BY time(5s) fill(none)",
    "SELECT mean(*) FROM \"spo2\" WHERE time >= '2021-07-12T13:00:00Z' AND time < '2021-07-13T13:00:00Z' GROUP BY time(10s) fill(none)",
    "SELECT mean(*) FROM spo2 WHERE time >= '2021-07-12T14:00:00Z' AND time < '2021-07-12T15:00:00Z' GROUP BY time(1m) fill(none)",
    "SELECT mean(*) FROM \"spo2_two\" WHERE time >= '2021-07-12T14:00:00Z' AND time < '2021-07-12T15:00:00Z' GROUP BY time(5s) fill(none)",
    "SELECT mean(*) FROM \"spo2_str\" WHERE time >= '2021-07-12T14:00:00Z' AND time < '2021-07-12T15:00:00Z' GROUP BY time(15s) fill(none)",
    "SELECT mean(pulse), mean(note) FROM spo2_str WHERE time >= '2021-07-12T14:00:00Z' AND time < '2021-07-12T15:00:00Z' GROUP BY time(5s) fill(none)",
    "SELECT mean(*) FROM \"nothing_here\" WHERE time >= '2021-07-12T14:00:00Z' AND time < '2021-07-12T15:00:00Z' GROUP BY time(5s) fill(none)",
    'SHOW FIELD KEYS FROM "spo2_str"',
    'SHOW FIELD KEYS FROM "spo2"',
    "SELECT mean(*) FROM \"spo2\" WHERE time >= '2021-07-12T14:00:00Z' AND time < '2021-07-12T15:00:00Z' GROUP BY time(5s) fill(none",
    "SELECT mean(*) FROM \"spo2\" WHERE time >= '2021-07-12T14:00:00Z' AND time < '2021-07-12T15:00:00Z' GROUP BY time(5s) fill(none) garbage",
]


@pytest.fixture(scope="module")
def twins(influxd_server):
    """The real server and the emulator, holding the same points."""
    influxd_server.create_database("twins")
    influxd_server.write("twins", MIXED + "\n", precision="s")
    emulator = Emulator(token=TOKEN, buckets=("twins",))
    emulator.write_lines("twins", MIXED, precision="s")
    emulator.start()
    yield influxd_server, emulator
    emulator.stop()
    influxd_server.drop_database("twins")


@pytest.mark.parametrize("params", [{"epoch": "ns"}, {"epoch": "ns", "chunked": "true", "chunk_size": "7"}, {}])
@pytest.mark.parametrize("query", QUERIES)
def test_the_emulator_answers_as_the_real_server_does(twins, query, params):
    real, emulator = twins
    request = {"method": "GET", "path": "/query", "params": {"db": "twins", "q": query, **params}}
    want = send(real.url, request, None)
    got = send(emulator.url, request, TOKEN)
    assert got[0] == want[0]
    assert [json.loads(line) for line in got[1].splitlines()] == [json.loads(line) for line in want[1].splitlines()]


@pytest.mark.parametrize("database", ["nosuchdb", ""])
def test_an_unknown_database_is_answered_alike(twins, database):
    real, emulator = twins
    request = {"method": "GET", "path": "/query", "params": {"db": database, "q": QUERIES[0], "epoch": "ns"}}
    assert send(emulator.url, request, TOKEN) == send(real.url, request, None)


# -- The loader against the real server ---------------------------------------------------------------
@pytest.fixture
def ql_env(loader_env, influxd, monkeypatch):
    """The loader's settings pointing at the real InfluxDB 1.x (no authentication)."""
    monkeypatch.setenv("INFLUX_QUERY_LANGUAGE", "influxql")
    monkeypatch.setenv("CONNECTION", influxd.url)
    monkeypatch.delenv("TOKEN")
    monkeypatch.delenv("ORG")
    return {**loader_env, "CONNECTION": influxd.url}


def call(capsys, argv=(), now=H14 + timedelta(hours=1, minutes=5)):
    code = hml.main(list(argv), now=now)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_the_hour_edges_against_a_real_influxdb(ql_env, influxd, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    edge = int(H14.timestamp()) * 10**9
    influxd.write(
        "pulse_oximeter",
        "\n".join(
            [
                f"spo2,uid=a pulse=60,spo2=90 {edge - 1}",  # hour 13
                f"spo2,uid=a pulse=61,spo2=91 {edge}",  # exactly H: the first window of hour 14
                f"spo2,uid=a pulse=62 {edge + 4_999_999_999}",
                f"spo2,uid=a pulse=64,spo2=94 {edge + 3600 * 10**9 - 1}",  # H+1h-1ns: the last window
                f"spo2,uid=a pulse=65,spo2=95 {edge + 3600 * 10**9}",  # H+1h: hour 15
            ]
        ),
    )
    code, _, err = call(capsys)
    assert code == 0, err
    assert stored(ql_env["PG_CONNECT"]) == [(utc(2021, 7, 12, 14, 0, 5), 61.5, 91.0), (utc(2021, 7, 12, 15), 64.0, 94.0)]
    assert ledger(ql_env["PG_CONNECT"]) == {H14: 2}


def test_integer_fields_two_devices_and_a_missing_field(ql_env, influxd, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    second = int(H14.timestamp())
    influxd.write(
        "pulse_oximeter",
        "\n".join(
            [
                f"spo2,uid=a pulse=70i,spo2=96i {second + 1}",
                f"spo2,uid=b pulse=81i,spo2=98i {second + 2}",  # InfluxQL averages the devices together
                f"spo2,uid=a pulse=72i {second + 7}",  # no spo2 in this window
            ]
        ),
        precision="s",
    )
    code, _, err = call(capsys)
    assert code == 0, err
    assert stored(ql_env["PG_CONNECT"]) == [(utc(2021, 7, 12, 14, 0, 5), 75.5, 97.0), (utc(2021, 7, 12, 14, 0, 10), 72.0, None)]


def test_a_string_field_is_skipped_with_one_warning(ql_env, influxd, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    second = int(H14.timestamp())
    lines = [f'spo2,uid=a pulse=70,spo2=96,note="cuff loose" {second + 1}', f"spo2,uid=a pulse=72,spo2=97 {second + 3601}"]
    influxd.write("pulse_oximeter", "\n".join(lines), precision="s")
    code, _, err = call(capsys)  # the first load creates the table: the moment to say what mean(*) leaves out
    assert code == 0, err
    assert [line.split(" WARNING ")[1] for line in err.splitlines() if " WARNING " in line] == [
        "field 'note' of measurement 'spo2' is not a number, so mean(*) skips it and it is not archived"
    ]
    assert stored(ql_env["PG_CONNECT"]) == [(utc(2021, 7, 12, 14, 0, 5), 70.0, 96.0)]
    code, _, err = call(capsys, now=H14 + timedelta(hours=2, minutes=5))
    assert code == 0 and " WARNING " not in err  # once: later loads that lack no field ask nothing


def test_a_field_that_turned_into_a_string_is_named(ql_env, influxd, capsys, monkeypatch):
    """A field's type is fixed per shard (a week here): in a later week spo2 arrives as text. mean(*)
    then skips it, the answer lacks a column the table has, and the loader asks for the types."""
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    week_before = H14 - timedelta(days=7)
    influxd.write("pulse_oximeter", f"spo2,uid=a pulse=70,spo2=96 {int(week_before.timestamp()) + 1}", precision="s")
    influxd.write("pulse_oximeter", f'spo2,uid=a pulse=71,spo2="96%" {int(H14.timestamp()) + 1}', precision="s")
    assert call(capsys, ["--hour", "2021-07-05T14"])[0] == 0
    code, _, err = call(capsys)
    assert code == 0, err
    assert [line.split(" WARNING ")[1] for line in err.splitlines() if " WARNING " in line] == [
        "field 'spo2' of measurement 'spo2' is not a number, so mean(*) skips it and it is not archived"
    ]
    assert stored(ql_env["PG_CONNECT"]) == [(week_before + timedelta(seconds=5), 70.0, 96.0), (H14 + timedelta(seconds=5), 71.0, None)]


def test_an_unknown_database_fails_and_records_nothing(ql_env, influxd, capsys, monkeypatch):
    monkeypatch.setenv("INFLUX_BUCKET", "no_such_db")
    code, _, err = call(capsys)
    assert code == 1
    assert err.splitlines() == [
        "health_metrics_loader: error: InfluxDB query failed: database not found: no_such_db: check INFLUX_BUCKET (the database)"
    ]
    assert ledger(ql_env["PG_CONNECT"]) == {}


def test_catch_up_over_a_gap_then_a_30_day_backfill(ql_env, influxd, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "12")
    monkeypatch.setenv("RECHECK_HOURS", "0")
    influxd.write("pulse_oximeter", line_protocol(DAY0, 12), precision="s")
    assert call(capsys, now=DAY0 + timedelta(hours=6, minutes=5))[0] == 0
    code, _, err = call(capsys, now=DAY0 + timedelta(hours=12, minutes=5))  # the Pi was off from 7:05 to 11:05
    assert code == 0, err
    assert ledger(ql_env["PG_CONNECT"])[DAY0 + timedelta(hours=11)] == 720
    assert_rows(stored(ql_env["PG_CONNECT"]), expected_rows(DAY0, 12))


def test_a_30_day_backfill_from_a_real_influxdb(ql_env, influxd, capsys):
    start = utc(2021, 6, 1)
    influxd.write("pulse_oximeter", line_protocol(start, 30 * 24), precision="s")
    code, _, err = call(capsys, ["--from", "2021-06-01T00", "--to", "2021-07-01T00"], now=utc(2021, 7, 2))
    assert code == 0, err
    assert err.count(" loaded ") == 30
    assert_rows(stored(ql_env["PG_CONNECT"]), expected_rows(start, 30 * 24))


def test_basic_auth_for_a_real_influxdb_with_users(loader_env, capsys, monkeypatch):
    from tests.influxd_server import ThrowawayInfluxd, influxd_missing_reason

    if influxd_missing_reason():
        unavailable(influxd_missing_reason())
    server = ThrowawayInfluxd(admin=("admin", "pw-1x-secret")).start()
    try:
        server.create_database("pulse_oximeter")
        server.write("pulse_oximeter", line_protocol(H14, 1), precision="s")
        monkeypatch.setenv("INFLUX_QUERY_LANGUAGE", "influxql")
        monkeypatch.setenv("CONNECTION", server.url)
        monkeypatch.setenv("CATCH_UP_HOURS", "1")
        monkeypatch.setenv("TOKEN", "admin:wrong")
        code, out, err = call(capsys)
        assert code == 1
        assert err.splitlines() == [
            "health_metrics_loader: error: InfluxDB refused the token (401: authorization failed): "
            "check TOKEN in .env (an API token, or user:password for InfluxDB 1.x)"
        ]
        monkeypatch.setenv("TOKEN", "admin:pw-1x-secret")
        code, out, err = call(capsys, ["-v"])
        assert code == 0, err
        assert "pw-1x-secret" not in out + err
        assert_rows(stored(loader_env["PG_CONNECT"]), expected_rows(H14, 1))
    finally:
        server.stop()


# -- One table, either dialect ---------------------------------------------------------------------------
def table_text(url: str) -> list[tuple]:
    """The rows as PostgreSQL prints them: equal text is equal bytes."""
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute("SELECT time::text, pulse::text, spo2::text FROM pox_five_second_mean ORDER BY time")
        return cursor.fetchall()


def test_both_dialects_give_identical_tables(ql_env, influxd, influx, capsys, monkeypatch, pg_admin_url):
    """The same points through the Flux emulator and through the real InfluxDB 1.x."""
    from tests.conftest import with_database

    points = line_protocol(DAY0, 6) + f"spo2,uid=A pulse=71i {int(DAY0.timestamp()) + 7203}\n"
    influxd.write("pulse_oximeter", points, precision="s")
    influx.write_lines("pulse_oximeter", points, precision="s")
    argv = ["--from", "2021-07-12T00", "--to", "2021-07-12T06"]
    assert call(capsys, argv, now=DAY0 + timedelta(days=1))[0] == 0
    via_influxql = table_text(ql_env["PG_CONNECT"])
    flux_db = "hml_flux_" + ql_env["PG_CONNECT"].rsplit("_", 1)[1]
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {flux_db}")
    try:
        for key, value in {"INFLUX_QUERY_LANGUAGE": "flux", "CONNECTION": influx.url, "TOKEN": TOKEN, "ORG": "test-org"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("PG_CONNECT", with_database(pg_admin_url, flux_db))
        assert call(capsys, argv, now=DAY0 + timedelta(days=1))[0] == 0
        assert table_text(with_database(pg_admin_url, flux_db)) == via_influxql
    finally:
        admin.cursor().execute(f"DROP DATABASE {flux_db} WITH (FORCE)")
        admin.close()
    assert len(via_influxql) == 6 * 720


def test_switching_dialects_on_a_filled_table_adds_nothing_twice(ql_env, influxd, influx, capsys, monkeypatch):
    points = line_protocol(DAY0, 4)
    influxd.write("pulse_oximeter", points, precision="s")
    influx.write_lines("pulse_oximeter", points, precision="s")
    for key, value in {"INFLUX_QUERY_LANGUAGE": "flux", "CONNECTION": influx.url, "TOKEN": TOKEN, "ORG": "test-org"}.items():
        monkeypatch.setenv(key, value)
    assert call(capsys, ["--from", "2021-07-12T00", "--to", "2021-07-12T03"], now=DAY0 + timedelta(days=1))[0] == 0
    for key, value in {"INFLUX_QUERY_LANGUAGE": "influxql", "CONNECTION": influxd.url}.items():
        monkeypatch.setenv(key, value)
    code, _, err = call(capsys, ["--from", "2021-07-12T01", "--to", "2021-07-12T04"], now=DAY0 + timedelta(days=1))
    assert code == 0, err
    assert "loaded 2021-07-12T01:00:00Z..2021-07-12T04:00:00Z: 720 rows in " in err and "(2 hours already up to date)" in err
    assert_rows(stored(ql_env["PG_CONNECT"]), expected_rows(DAY0, 4))


# -- Faults on the InfluxQL path, through the emulator -------------------------------------------------------
@pytest.fixture
def emulated_ql(loader_env, influx, monkeypatch):
    monkeypatch.setenv("INFLUX_QUERY_LANGUAGE", "influxql")
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    monkeypatch.setenv("RETRY_BUDGET", "30")
    influx.write_lines("pulse_oximeter", line_protocol(H14, 1), precision="s")
    return loader_env


@pytest.mark.parametrize(
    ("fault", "logged"),
    [
        (
            Fault("status", status=429, retry_after=1, message="quota"),
            "InfluxDB is rate-limiting this organization (429: quota); retry 1 in 1.0s",
        ),
        (Fault("gateway", status=502), "InfluxDB had a server error (502: 502 Bad Gateway); retry 1 in "),
        (Fault("gateway", status=503), "InfluxDB had a server error (503: 503 Service Unavailable); retry 1 in "),
        (Fault("reset"), "did not answer ("),
        (Fault("truncate", keep_bytes=3000), "did not answer ("),
        (
            Fault("canned", body='{"results":[{"statement_id":0,"series":[{"name":"spo2","columns":["time","mean_pulse"],"values":[[1'),
            "ended early (cut off mid-line)",
        ),
    ],
)
def test_transient_faults_are_retried_on_the_influxql_path(emulated_ql, influx, capsys, fault, logged):
    influx.inject(fault)
    code, _, err = call(capsys)
    assert code == 0, err
    assert logged in err
    assert [q.split()[0] for q in influx.queries] == ["SELECT", "SELECT", "SHOW"]  # the try, the retry; the new table's field check
    assert_rows(stored(emulated_ql["PG_CONNECT"]), expected_rows(H14, 1))


def test_an_error_after_data_writes_nothing(emulated_ql, influx, capsys):
    influx.inject(Fault("error_table", message="query interrupted", keep_rows=50))
    code, _, err = call(capsys)
    assert code == 1
    assert err.splitlines() == ["health_metrics_loader: error: InfluxDB query failed: query interrupted"]
    assert ledger(emulated_ql["PG_CONNECT"]) == {}


def test_flux_against_a_server_without_flux_names_influxql(loader_env, capsys, monkeypatch, influxd):
    monkeypatch.setenv("CONNECTION", influxd.url)
    monkeypatch.setenv("RETRY_BUDGET", "0")
    code, _, err = call(capsys)
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith("health_metrics_loader: error: InfluxDB does not take Flux queries here (")
    assert line.endswith("): try INFLUX_QUERY_LANGUAGE=influxql (InfluxDB 1.x, 3 and Cloud Serverless)")


def test_tls_certificates_are_verified_on_the_influxql_path(emulated_ql, capsys, tls_influx):
    code, _, err = call(capsys)
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith("health_metrics_loader: error: InfluxDB could not be reached securely (") and "CERTIFICATE_VERIFY_FAILED" in line
    assert line.endswith("): check CONNECTION and the server's certificate")
    assert tls_influx.queries == []
