"""Faults, bad input and secrets: retried where it helps, one clear line where not, nothing partial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import psycopg2
import pytest

import health_metrics_loader as hml
from tests.conftest import ROOT, TOKEN, utc
from tests.influxdb_emulator import Fault
from tests.pg_server import PASSWORD, free_port
from tests.synthetic import expected_rows, line_protocol
from tests.test_catch_up import ledger
from tests.test_main import assert_rows, stored

H13, H14 = utc(2021, 7, 12, 13), utc(2021, 7, 12, 14)
NOW = utc(2021, 7, 12, 15, 5)


@pytest.fixture
def env(loader_env, influx, monkeypatch):
    """Settings for a two-hour catch-up span (hours 13 and 14), with data in InfluxDB."""
    monkeypatch.setenv("CATCH_UP_HOURS", "2")
    monkeypatch.setenv("RETRY_BUDGET", "30")
    influx.write_lines("pulse_oximeter", line_protocol(H13, 2), precision="s")
    return loader_env


def call(capsys, argv=(), now=NOW):
    code = hml.main(list(argv), now=now)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert TOKEN not in out + err and PASSWORD not in out + err, "a secret was printed"
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("health_metrics_loader: ")]
    assert len(lines) == 1, err
    return lines[0]


def ledger_hours(url: str) -> list:
    return list(ledger(url))


def row_count(url: str) -> int:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('pox_five_second_mean') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return 0
        cursor.execute("SELECT count(*) FROM pox_five_second_mean")
        return cursor.fetchone()[0]


def assert_complete(url: str) -> None:
    assert ledger_hours(url) == [H13, H14]
    assert_rows(stored(url), expected_rows(H13, 2))


def assert_untouched(url: str) -> None:
    assert ledger_hours(url) == [] and row_count(url) == 0


# -- Transient source errors are retried ---------------------------------------------------------
@pytest.mark.parametrize(
    ("faults", "logged"),
    [
        (
            [Fault("status", status=429, retry_after=0, message="org 04014de4ed590000 has exceeded limited_read plan limit")],
            "rate-limiting this organization (429",
        ),
        ([Fault("status", status=503, retry_after=0)] * 3, "server error (503"),
        ([Fault("status", status=500)], "server error (500"),
        ([Fault("status", status=502), Fault("status", status=504)], "server error (504"),
        ([Fault("reset")], "did not answer"),
        ([Fault("truncate", keep_bytes=700)], "did not answer"),
    ],
)
def test_transient_errors_are_retried(env, influx, capsys, faults, logged):
    influx.inject(*faults)
    code, _, err = call(capsys)
    assert code == 0, err
    assert logged in err and f"retry {len(faults)} in " in err
    assert len(influx.queries) == len(faults) + 1
    assert_complete(env["PG_CONNECT"])


def test_retry_after_is_honoured(env, influx, capsys):
    influx.inject(Fault("status", status=429, retry_after=2, message="quota"))  # whole seconds, as real servers send it
    started = time.monotonic()
    code, _, err = call(capsys)
    assert code == 0 and time.monotonic() - started >= 2
    assert "WARNING InfluxDB is rate-limiting this organization (429: quota); retry 1 in 2.0s\n" in err


def test_a_fractional_retry_after_is_honoured_too(env, influx, capsys):
    influx.inject(Fault("status", status=503, retry_after=0.7, fractional=True, message="busy"))
    code, _, err = call(capsys)
    assert code == 0
    assert "WARNING InfluxDB had a server error (503: busy); retry 1 in 0.7s\n" in err


def test_retry_budget_bounds_the_waiting(env, influx, capsys, monkeypatch):
    monkeypatch.setenv("RETRY_BUDGET", "2")
    influx.inject(Fault("status", status=429, retry_after=60, message="quota"))
    started = time.monotonic()
    code, _, err = call(capsys)
    assert code == 1 and time.monotonic() - started < 5
    assert (
        error_line(err) == "health_metrics_loader: error: InfluxDB is rate-limiting this organization (429: quota); gave up after 1 try: "
        "InfluxDB asked to wait 60s, more than is left of RETRY_BUDGET 2s"
    )
    assert_untouched(env["PG_CONNECT"])


def test_a_slow_answer_times_out_and_is_retried(env, influx, capsys, monkeypatch):
    monkeypatch.setenv("QUERY_TIMEOUT", "0.5")
    influx.inject(Fault("slow", delay=1.5))
    code, _, err = call(capsys)
    assert code == 0, err
    assert "Read timed out" in err and "retry 1" in err
    assert_complete(env["PG_CONNECT"])


def test_a_body_that_stalls_after_the_headers_times_out_and_is_retried(env, influx, capsys, monkeypatch):
    """QUERY_TIMEOUT bounds each wait for the next bytes, after the headers too."""
    monkeypatch.setenv("QUERY_TIMEOUT", "0.5")
    influx.inject(Fault("slow_body", keep_bytes=500, delay=1.5))
    code, _, err = call(capsys)
    assert code == 0, err
    assert "did not answer (" in err and "retry 1" in err
    assert_complete(env["PG_CONNECT"])


@pytest.mark.parametrize(("status", "title"), [(502, "502 Bad Gateway"), (503, "503 Service Unavailable"), (504, "504 Gateway Time-out")])
def test_a_gateway_page_is_one_short_line(env, influx, capsys, monkeypatch, status, title):
    monkeypatch.setenv("RETRY_BUDGET", "0")
    influx.inject(Fault("gateway", status=status))
    code, _, err = call(capsys)
    assert code == 1
    assert (
        error_line(err)
        == f"health_metrics_loader: error: InfluxDB had a server error ({status}: {title}); gave up after 1 try (RETRY_BUDGET 0s)"
    )


def test_status_with_postgresql_down(env, influx, capsys, monkeypatch):
    monkeypatch.setenv("PG_CONNECT", env["PG_CONNECT"].rsplit(":", 1)[0] + f":{free_port()}/x")
    code, out, err = call(capsys, ["--status"])
    assert code == 1 and out == ""
    line = error_line(err)
    assert line.startswith("health_metrics_loader: error: cannot connect to PostgreSQL (connection to server at ")
    assert "Connection refused" in line and line.endswith("): check PG_CONNECT")


def test_a_wrong_organisation_id_is_named(env, influx, capsys, monkeypatch):
    monkeypatch.setenv("ORG", "0123456789abcdef")
    code, _, err = call(capsys)
    assert code == 1
    assert error_line(err) == (
        "health_metrics_loader: error: InfluxDB found no such bucket or organization "
        "(404: failed to decode request body: organization not found: 0123456789abcdef): check INFLUX_BUCKET and ORG"
    )


def test_a_password_that_reaches_a_message_is_masked(env, influx, capsys, monkeypatch):
    """libpq never echoes the password, so make it part of the database name, which it does echo."""
    monkeypatch.setenv("PG_CONNECT", env["PG_CONNECT"].rsplit("/", 1)[0] + f"/{PASSWORD}_archive")
    code, _, err = call(capsys)
    assert code == 1
    assert 'database "***_archive" does not exist' in error_line(err)


@pytest.mark.parametrize(
    ("attempt", "jitter", "delay"),
    [(0, 0.0, 0.5), (0, 1.0, 1.0), (1, 0.0, 1.0), (3, 1.0, 8.0), (10, 1.0, 60.0)],
)
def test_backoff_is_exponential_jittered_and_capped(attempt, jitter, delay):
    assert hml.Retrier(budget=100, jitter=lambda: jitter).delay(attempt, None) == delay


def test_retrier_stops_at_its_budget():
    waits = []
    retrier = hml.Retrier(budget=10, sleep=waits.append, jitter=lambda: 1.0)

    def always_failing():
        raise hml.TransientSourceError("down")

    with pytest.raises(hml.SourceError, match=r"down; gave up after 4 tries \(RETRY_BUDGET 10s\)"):
        retrier.call(always_failing)
    assert waits == [1.0, 2.0, 4.0]


# -- Permanent source errors fail at once -----------------------------------------------------
@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (
            Fault("status", status=400, message="compilation failed: error @1:1-1:5: undefined identifier"),
            "InfluxDB rejected the query (400: compilation failed",
        ),
        (
            Fault("status", status=401, message="unauthorized access"),
            "InfluxDB refused the token (401: unauthorized access): check TOKEN in .env",
        ),
        (
            Fault("status", status=403, message="insufficient permissions"),
            "InfluxDB denied access (403: insufficient permissions): check that TOKEN may read INFLUX_BUCKET",
        ),
        (
            Fault("status", status=404, message='bucket "x" not found'),
            'InfluxDB found no such bucket or organization (404: bucket "x" not found): check INFLUX_BUCKET and ORG',
        ),
    ],
)
def test_permanent_errors_fail_at_once(env, influx, capsys, fault, message):
    influx.inject(fault)
    code, _, err = call(capsys)
    assert code == 1
    assert message in error_line(err)
    assert len(influx.queries) == 1
    assert_untouched(env["PG_CONNECT"])


# -- A damaged answer writes nothing ---------------------------------------------------------------
@pytest.mark.parametrize("keep_bytes", [40, 300, 9000, 40000])
def test_a_cut_connection_writes_nothing(env, influx, capsys, monkeypatch, keep_bytes):
    monkeypatch.setenv("RETRY_BUDGET", "0")
    influx.inject(Fault("truncate", keep_bytes=keep_bytes))
    code, _, err = call(capsys)
    assert code == 1
    assert "did not answer" in error_line(err)
    assert_untouched(env["PG_CONNECT"])


def test_an_error_table_writes_nothing(env, influx, capsys):
    influx.inject(Fault("error_table", message="panic: runtime error: index out of range", keep_rows=100))
    code, _, err = call(capsys)
    assert code == 1
    assert error_line(err) == "health_metrics_loader: error: InfluxDB query failed: panic: runtime error: index out of range"
    assert_untouched(env["PG_CONNECT"])


def test_a_body_without_its_last_line_writes_nothing(env, influx, capsys, monkeypatch):
    monkeypatch.setenv("RETRY_BUDGET", "0")
    body = "#datatype,string,long,dateTime:RFC3339,double\r\n#group,false,false,false,false\r\n#default,_result,,,\r\n,result,table,_time,spo2\r\n,,0,2021-07-12T13:00:05Z,97\r\n"
    influx.inject(Fault("canned", body=body))
    code, _, err = call(capsys)
    assert code == 1 and "ended early" in error_line(err)
    assert_untouched(env["PG_CONNECT"])


# -- PostgreSQL faults ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make_url", "message"),
    [
        (lambda url: url.rsplit(":", 1)[0] + f":{free_port()}/x", "Connection refused"),
        (lambda url: url.replace(PASSWORD, "wrong-" + PASSWORD), 'password authentication failed for user "postgres"'),
        (lambda url: url.rsplit("/", 1)[0] + "/no_such_db", 'database "no_such_db" does not exist'),
    ],
)
def test_postgres_unreachable_or_refusing(env, influx, capsys, monkeypatch, make_url, message):
    monkeypatch.setenv("PG_CONNECT", make_url(env["PG_CONNECT"]))
    code, _, err = call(capsys)
    line = error_line(err)
    assert code == 1
    assert line.startswith("health_metrics_loader: error: cannot connect to PostgreSQL (") and message in line
    assert "wrong-" not in err
    assert influx.queries == []


def test_a_type_clash_rolls_back(env, influx, capsys, pg):
    pg.cursor().execute("CREATE TABLE pox_five_second_mean (time timestamptz PRIMARY KEY, pulse double precision, spo2 integer)")
    code, _, err = call(capsys)
    assert code == 1
    line = error_line(err)
    assert "PostgreSQL refused the load of 2021-07-12T13:00:00Z..2021-07-12T15:00:00Z (invalid input syntax for type integer" in line
    assert line.endswith("nothing of it was written")
    assert_untouched(env["PG_CONNECT"])


SLOW_ROW = """
CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.time = '2021-07-12 14:30:00+00' THEN PERFORM pg_sleep(2); END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER slow_row BEFORE INSERT ON pox_five_second_mean FOR EACH ROW EXECUTE FUNCTION slow_row();
"""


def start_loader_stuck_in_copy(pg, argv):
    """A loader process whose COPY is inside the slow trigger; returns (process, backend pid)."""
    process = subprocess.Popen([sys.executable, str(ROOT / "health_metrics_loader.py"), *argv], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with pg.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query LIKE 'COPY%'")
            found = cursor.fetchone()
        if found:
            return process, found[0]
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"the loader never reached COPY: {process.stderr.read()}")


def wait_until_gone(pg, pid):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with pg.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            if cursor.fetchone()[0] == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"backend {pid} is still there")


def prepare_table_with_slow_row(env, capsys, pg):
    assert call(capsys, ["--hour", "2021-07-12T13"], now=NOW)[0] == 0  # creates the table, loads hour 13
    pg.cursor().execute(SLOW_ROW)


def test_connection_dies_mid_copy(env, influx, capsys, pg):
    prepare_table_with_slow_row(env, capsys, pg)
    process, pid = start_loader_stuck_in_copy(pg, ["--hour", "2021-07-12T14"])
    pg.cursor().execute("SELECT pg_terminate_backend(%s)", (pid,))
    code, err = process.wait(timeout=30), process.stderr.read()
    assert code == 1, err
    assert (
        "PostgreSQL refused the load of 2021-07-12T14:00:00Z..2021-07-12T15:00:00Z (server closed the connection unexpectedly); nothing of it was written"
        in error_line(err)
    )
    assert TOKEN not in err and PASSWORD not in err
    assert ledger_hours(env["PG_CONNECT"]) == [H13]
    assert_rows(stored(env["PG_CONNECT"]), expected_rows(H13, 1))


def test_killed_mid_copy_leaves_no_half_hour(env, influx, capsys, pg):
    prepare_table_with_slow_row(env, capsys, pg)
    process, pid = start_loader_stuck_in_copy(pg, ["--from", "2021-07-12T13", "--to", "2021-07-12T15"])
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    wait_until_gone(pg, pid)  # PostgreSQL notices the dead client and rolls back
    assert ledger_hours(env["PG_CONNECT"]) == [H13]
    assert_rows(stored(env["PG_CONNECT"]), expected_rows(H13, 1))  # hour 13 as it was, nothing of 14
    pg.cursor().execute("DROP TRIGGER slow_row ON pox_five_second_mean")
    pg.cursor().execute("DELETE FROM loaded_hours")
    code, _, err = call(capsys)  # the next cron call completes the span
    assert code == 0, err
    assert_complete(env["PG_CONNECT"])


# -- Bad data ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('note="ok"', "field 'note' of measurement 'spo2' is not numeric, so InfluxDB cannot average it: write it to another measurement"),
        ("note=true", "field 'note' of measurement 'spo2' is not numeric, so InfluxDB cannot average it: write it to another measurement"),
        (
            "spo2=97",  # with a second tag: the same time twice
            "time 2021-07-12T14:01:05Z appears more than once in InfluxDB's answer: the measurement has a tag besides uid "
            "(keep one device per measurement)",
        ),
    ],
)
def test_data_that_cannot_be_stored_fails_its_hour_only(env, influx, capsys, bad_line, reason):
    tags = "uid=A,host=kitchen" if bad_line == "spo2=97" else "uid=A"
    influx.write_lines("pulse_oximeter", f"spo2,{tags} {bad_line} {int(H14.timestamp()) + 60}", precision="s")
    code, _, err = call(capsys)
    assert code == 1
    assert error_line(err) == f"health_metrics_loader: error: 2021-07-12T14:00:00Z was not loaded: {reason}"
    assert ledger_hours(env["PG_CONNECT"]) == [H13]  # the good hour is in, the bad one is retried by the next call
    assert_rows(stored(env["PG_CONNECT"]), expected_rows(H13, 1))


def test_a_bad_hour_does_not_hold_back_the_days_after_it(loader_env, influx, capsys, monkeypatch):
    """Three days to catch up; one hour of the first day is bad. Every other hour lands, in every chunk."""
    monkeypatch.setenv("CATCH_UP_HOURS", "72")
    monkeypatch.setenv("RECHECK_HOURS", "0")
    day0 = utc(2021, 7, 12)
    influx.write_lines("pulse_oximeter", line_protocol(day0, 72), precision="s")
    bad = day0 + timedelta(hours=5)
    influx.write_lines("pulse_oximeter", f"spo2,uid=A,host=kitchen spo2=97 {int(bad.timestamp()) + 60}", precision="s")
    now = day0 + timedelta(hours=72, minutes=5)
    code, _, err = call(capsys, now=now)
    assert code == 1
    assert error_line(err).startswith("health_metrics_loader: error: 2021-07-12T05:00:00Z was not loaded: time 2021-07-12T05:01:05Z")
    assert "2021-07-12T00:00:00Z..2021-07-13T00:00:00Z cannot be stored as it is" in err
    assert ledger_hours(loader_env["PG_CONNECT"]) == [day0 + timedelta(hours=h) for h in range(72) if h != 5]
    assert len(stored(loader_env["PG_CONNECT"])) == 71 * 720
    code, _, err = call(capsys, now=now + timedelta(minutes=10))  # the next call tries the bad hour alone, and only it
    assert code == 1 and len(influx.queries) == 3 + 24 + 1
    assert "range(start: 2021-07-12T05:00:00Z, stop: 2021-07-12T06:00:00Z)" in influx.queries[-1]


def test_nan_and_infinity_are_stored_as_null(env, influx, capsys):
    body = (
        "#datatype,string,long,dateTime:RFC3339,double,double\r\n#group,false,false,false,false,false\r\n#default,_result,,,,\r\n"
        ",result,table,_time,pulse,spo2\r\n,,0,2021-07-12T13:00:05Z,NaN,97\r\n,,0,2021-07-12T13:00:10Z,+Inf,-Inf\r\n,,0,2021-07-12T13:00:15Z,71,\r\n\r\n"
    )
    influx.inject(Fault("canned", body=body), Fault("canned", body="\r\n"))
    assert call(capsys)[0] == 0
    assert stored(env["PG_CONNECT"]) == [
        (utc(2021, 7, 12, 13, 0, 5), None, 97.0),
        (utc(2021, 7, 12, 13, 0, 10), None, None),
        (utc(2021, 7, 12, 13, 0, 15), 71.0, None),
    ]


# -- Secrets and settings ---------------------------------------------------------------------------
def test_env_file_readable_by_others_is_warned_about(env, influx, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LOADER_ENV_FILE", str(tmp_path / ".env"))
    (tmp_path / ".env").write_text("ORG=ignored\n")
    (tmp_path / ".env").chmod(0o644)
    code, _, err = call(capsys)
    assert code == 0
    assert f"{tmp_path / '.env'} can be read by other users (mode 644); it holds secrets: chmod 600 {tmp_path / '.env'}" in err
    (tmp_path / ".env").chmod(0o600)
    assert "can be read by other users" not in call(capsys, now=NOW + timedelta(hours=1))[2]


def test_tls_certificates_are_verified(env, capsys, tls_influx):
    code, _, err = call(capsys)
    assert code == 1
    assert "InfluxDB could not be reached securely (" in error_line(err) and "CERTIFICATE_VERIFY_FAILED" in err
    assert tls_influx.queries == []


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("PG_TABLE", 'pox"; DROP TABLE x; --'),
        ("INFLUX_BUCKET", "a\x01b"),
        ("AGGREGATE_EVERY", "5s)"),
        ("CONNECTION", "file:///etc/passwd"),
        ("CATCH_UP_HOURS", "721"),
    ],
)
def test_bad_settings_exit_2_and_are_named(env, influx, capsys, monkeypatch, setting, value):
    monkeypatch.setenv(setting, value)
    code, _, err = call(capsys)
    assert code == 2
    assert setting in error_line(err)
    assert influx.queries == []


def test_quoted_settings_reach_influxdb_escaped(env, influx, capsys, monkeypatch):
    monkeypatch.setenv("INFLUX_MEASUREMENT", 'spo2") |> drop(columns: ["_value"]) //')
    code, _, _ = call(capsys)
    assert code == 0
    assert 'r._measurement == "spo2\\") |> drop(columns: [\\"_value\\"]) //"' in influx.queries[0]
    assert row_count(env["PG_CONNECT"]) == 0  # no such measurement: nothing matched, nothing dropped


def test_secrets_never_reach_exception_text(env, influx, capsys, monkeypatch):
    monkeypatch.setenv("PG_CONNECT", env["PG_CONNECT"].replace("/hml_", f"/{TOKEN}_"))
    code, out, err = call(capsys)  # the database name now holds the token: it must be masked
    assert code == 1 and "***" in err
    assert os.environ["TOKEN"] == TOKEN
