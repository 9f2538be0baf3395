"""Behaviours that a small change to the loader could break unnoticed, each pinned to its
exact outcome: the line, the count, the value."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import psycopg2
import pytest

import health_metrics_loader as hml
from tests.conftest import TOKEN, error_lines, run_loader, utc
from tests.influxdb_emulator import Fault
from tests.synthetic import line_protocol

H10 = utc(2021, 7, 12, 10)


def call(capsys, argv=(), now=H10 + timedelta(hours=1, minutes=5)):
    return run_loader(capsys, argv, now)


def test_verify_calls_a_value_half_a_percent_off_changed(loader_env, influx, capsys, pg):
    influx.write_lines("pulse_oximeter", f"spo2,uid=A spo2=97.5 {int(H10.timestamp()) + 1}\n", precision="s")
    assert call(capsys, ["--hour", "2021-07-12T10"])[0] == 0
    with pg.cursor() as cursor:
        cursor.execute("UPDATE pox_five_second_mean SET spo2 = 97.0")
    code, out, _ = call(capsys, ["--verify", "--hour", "2021-07-12T10"])
    assert code == 1
    assert out.splitlines()[0] == "2021-07-12T10:00:00Z  missing 0, changed 1, kept 0"


def test_from_to_whose_last_hour_is_still_settling_sends_no_query(loader_env, influx, capsys):
    code, _, err = call(capsys, ["--from", "2021-07-12T08", "--to", "2021-07-12T11"], now=H10 + timedelta(hours=1, minutes=1))
    assert code == 2
    assert error_lines(err) == [
        "health_metrics_loader: error: hour 2021-07-12T10:00:00Z is not complete yet: an hour counts as complete SETTLE_MINUTES (2) "
        "after it ends; the latest complete hour is 2021-07-12T09:00:00Z"
    ]
    assert influx.queries == []


def test_a_later_ordinary_load_keeps_the_hours_checked_at(loader_env, influx, capsys, pg):
    influx.write_lines("pulse_oximeter", line_protocol(H10, 1), precision="s")
    assert call(capsys, ["--hour", "2021-07-12T10"])[0] == 0
    assert call(capsys, ["--verify", "--hour", "2021-07-12T10"], now=H10 + timedelta(hours=2))[0] == 0
    with pg.cursor() as cursor:
        cursor.execute("SELECT checked_at FROM loaded_hours")
        (checked,) = cursor.fetchone()
    assert checked == H10 + timedelta(hours=2)
    assert call(capsys, ["--hour", "2021-07-12T10"], now=H10 + timedelta(hours=3))[0] == 0
    with pg.cursor() as cursor:
        cursor.execute("SELECT checked_at FROM loaded_hours")
        assert cursor.fetchone() == (checked,)


def test_a_retry_after_longer_than_what_is_left_of_the_budget_says_so(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("RETRY_BUDGET", "3")
    influx.inject(
        Fault("status", status=503, retry_after=1, fractional=True), Fault("status", status=429, retry_after=2.5, fractional=True)
    )
    code, _, err = call(capsys, ["--hour", "2021-07-12T10"])
    assert code == 1
    assert error_lines(err) == [
        "health_metrics_loader: error: InfluxDB is rate-limiting this organization (429: org 04014de4ed590000 has exceeded "
        "limited_read plan limit); gave up after 2 tries: InfluxDB asked to wait 2.5s, more than is left of RETRY_BUDGET 3s"
    ]


def test_a_long_secret_inside_a_word_is_masked():
    assert hml.Redactor(["db8chars"]).redact('database "healthdb8charsx" does not exist') == 'database "health***x" does not exist'


def test_a_secret_in_a_log_line_s_arguments_is_masked(loader_env, influx, capsys, monkeypatch):
    """A retry warning quotes the server's message, which echoes the token."""
    monkeypatch.setenv("RETRY_BUDGET", "5")
    influx.write_lines("pulse_oximeter", line_protocol(H10, 1), precision="s")
    influx.inject(Fault("status", status=503, retry_after=0.01, fractional=True, message=f"bad token {TOKEN} somewhere"))
    code, _, err = call(capsys, ["--hour", "2021-07-12T10"])
    assert code == 0
    retries = [line.split(" WARNING ", 1)[1] for line in err.splitlines() if " WARNING " in line]
    assert retries == ["InfluxDB had a server error (503: bad token *** somewhere); retry 1 in 0.5s"]


def test_catch_up_hours_zero_has_its_own_message(loader_env, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "0")
    code, _, err = call(capsys)
    assert code == 2
    assert error_lines(err) == ["health_metrics_loader: error: CATCH_UP_HOURS must be a whole number from 1 to 720"]


def test_after_a_failed_run_the_background_fetch_asks_nothing_more(loader_env, influx, capsys, monkeypatch, pg):
    """Day 1 fails in PostgreSQL while day 2's fetch waits out a 2-second Retry-After: past it,
    InfluxDB has seen the two first tries and nothing else. (Long-lived callers such as Airflow
    would otherwise keep querying for a run that is over.)"""
    monkeypatch.setenv("RETRY_BUDGET", "100")
    pg.cursor().execute("CREATE TABLE pox_five_second_mean (time timestamptz PRIMARY KEY, pulse double precision, spo2 integer)")
    influx.write_lines("pulse_oximeter", line_protocol(H10, 1), precision="s")
    influx.inject(Fault("slow", delay=0), Fault("status", status=503, retry_after=2))
    code, _, err = call(capsys, ["--from", "2021-07-12T00", "--to", "2021-07-14T00"], now=utc(2021, 7, 15))
    assert code == 1, err
    time.sleep(3)
    assert len(influx.queries) == 2


def test_a_run_that_ended_logs_nothing_more(loader_env, influx, capsys, monkeypatch, pg, caplog):
    monkeypatch.setenv("RETRY_BUDGET", "100")
    pg.cursor().execute("CREATE TABLE pox_five_second_mean (time timestamptz PRIMARY KEY, pulse double precision, spo2 integer)")
    influx.write_lines("pulse_oximeter", line_protocol(H10, 1), precision="s")
    influx.inject(Fault("slow", delay=0.5), Fault("status", status=503, retry_after=0.01, fractional=True))
    assert call(capsys, ["--from", "2021-07-12T00", "--to", "2021-07-14T00"], now=utc(2021, 7, 15))[0] == 1
    heard: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = heard.append  # type: ignore[method-assign]
    logging.getLogger("health_metrics_loader").addHandler(handler)
    try:
        time.sleep(2)
    finally:
        logging.getLogger("health_metrics_loader").removeHandler(handler)
    assert heard == []


@pytest.mark.parametrize("argv", [["--days", "3"], ["--verify", "--days", "3"]])
def test_days_goes_with_status_only(loader_env, capsys, argv):
    code, _, err = call(capsys, argv)
    assert (code, error_lines(err)) == (2, ["health_metrics_loader: error: --days goes with --status (see --help)"])


def test_repair_dry_run_exits_like_verify(loader_env, influx, capsys, pg):
    influx.write_lines("pulse_oximeter", line_protocol(H10, 1), precision="s")
    assert call(capsys, ["--hour", "2021-07-12T10"])[0] == 0
    with pg.cursor() as cursor:
        cursor.execute("DELETE FROM pox_five_second_mean WHERE time = '2021-07-12T10:30:00Z'")
    for argv in (["--verify"], ["--repair", "--dry-run"]):
        code, out, _ = call(capsys, [*argv, "--hour", "2021-07-12T10"])
        assert code == 1
        assert out.splitlines()[0].startswith("2021-07-12T10:00:00Z  missing 1, changed 0, kept 0")
    with psycopg2.connect(loader_env["PG_CONNECT"]) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pox_five_second_mean")
        assert cursor.fetchone() == (719,)  # the dry run wrote nothing


@pytest.mark.parametrize("language", ["flux", "influxql"])
def test_a_refused_connection_fails_in_seconds_not_minutes(loader_env, capsys, monkeypatch, language):
    """A wrong port answers at once, and the same way every time: three tries, not the whole budget."""
    from tests.pg_server import free_port

    monkeypatch.setenv("INFLUX_QUERY_LANGUAGE", language)
    monkeypatch.setenv("CONNECTION", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    code, _, err = call(capsys, ["--hour", "2021-07-12T10"])
    assert code == 1 and time.monotonic() - started < 15
    assert [line.rsplit("; ", 1)[1] for line in err.splitlines() if " WARNING " in line] == [
        line.rsplit("; ", 1)[1] for line in err.splitlines() if "; retry " in line
    ]
    assert len([line for line in err.splitlines() if "; retry " in line]) == 2
    assert error_lines(err)[0].endswith("check CONNECTION and the network; gave up after 3 tries")
