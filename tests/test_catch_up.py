"""Never lose an hour: the ledger, catch-up, late data, one run at a time, and --status."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta

import psycopg2
import pytest

import health_metrics_loader as hml
from tests.conftest import ROOT, ledger, utc
from tests.influxdb_emulator import Fault
from tests.synthetic import expected_rows, line_protocol
from tests.test_main import assert_rows, stored

DAY0 = utc(2021, 7, 12)


def seed(influx, start, hours):
    influx.write_lines("pulse_oximeter", line_protocol(start, hours), precision="s")


def cron(capsys, now):
    code = hml.main([], now=now)
    out, err = capsys.readouterr()
    return code, out, err


def hours(start, count):
    return [start + timedelta(hours=i) for i in range(count)]


@pytest.fixture
def span12(monkeypatch, loader_env):
    monkeypatch.setenv("CATCH_UP_HOURS", "12")
    return loader_env


def test_everyday_call_is_one_query_and_a_complete_ledger_none(span12, influx, capsys):
    seed(influx, DAY0, 13)
    assert cron(capsys, DAY0 + timedelta(hours=12, minutes=5))[0] == 0
    assert len(influx.queries) == 1  # 12 contiguous missing hours: one query
    code, _, err = cron(capsys, DAY0 + timedelta(hours=13, minutes=5))
    assert code == 0
    assert len(influx.queries) == 2  # the everyday case: exactly one query, the previous hour and the 6 re-checked before it
    assert "range(start: 2021-07-12T06:00:00Z, stop: 2021-07-12T13:00:00Z)" in influx.queries[1]
    assert "loaded 2021-07-12T06:00:00Z..2021-07-12T13:00:00Z: 720 rows in " in err
    assert err.rstrip().endswith("s (6 hours already up to date)")
    code, _, err = cron(capsys, DAY0 + timedelta(hours=13, minutes=30))
    assert code == 0 and len(influx.queries) == 2  # nothing missing: no query at all
    assert "nothing to load" in err
    assert ledger(span12["PG_CONNECT"]) == dict.fromkeys(hours(DAY0, 13), 720)


def test_catch_up_after_a_three_hour_outage(span12, influx, capsys, monkeypatch):
    monkeypatch.setenv("RECHECK_HOURS", "0")
    seed(influx, DAY0, 12)
    cron(capsys, DAY0 + timedelta(hours=6, minutes=5))
    influx.queries.clear()
    code, _, err = cron(capsys, DAY0 + timedelta(hours=9, minutes=5))  # the Pi was off at 7:05 and 8:05
    assert code == 0, err
    assert influx.queries and len(influx.queries) == 1
    assert "range(start: 2021-07-12T06:00:00Z, stop: 2021-07-12T09:00:00Z)" in influx.queries[0]
    assert_rows(stored(span12["PG_CONNECT"]), expected_rows(DAY0, 9))
    assert list(ledger(span12["PG_CONNECT"])) == hours(DAY0 - timedelta(hours=6), 15)


def test_catch_up_after_a_three_day_outage(loader_env, influx, capsys):
    seed(influx, DAY0, 73)
    code, _, err = cron(capsys, DAY0 + timedelta(hours=73, minutes=5))
    assert code == 0, err
    assert len(influx.queries) == 3  # 72 hours: three one-day queries, oldest first
    starts = [q.split("range(start: ")[1][:20] for q in influx.queries]
    assert starts == ["2021-07-12T01:00:00Z", "2021-07-13T01:00:00Z", "2021-07-14T01:00:00Z"]
    assert ledger(loader_env["PG_CONNECT"]) == dict.fromkeys(hours(DAY0 + timedelta(hours=1), 72), 720)
    assert_rows(stored(loader_env["PG_CONNECT"]), expected_rows(DAY0 + timedelta(hours=1), 72))


def test_a_hole_in_the_middle_is_filled(span12, influx, capsys, monkeypatch):
    monkeypatch.setenv("RECHECK_HOURS", "0")
    seed(influx, DAY0, 12)
    assert hml.main(["--from", "2021-07-12T00", "--to", "2021-07-12T05"], now=DAY0 + timedelta(hours=12, minutes=5)) == 0
    assert hml.main(["--from", "2021-07-12T06", "--to", "2021-07-12T12"], now=DAY0 + timedelta(hours=12, minutes=5)) == 0
    capsys.readouterr()
    influx.queries.clear()
    code, _, err = cron(capsys, DAY0 + timedelta(hours=12, minutes=5))
    assert code == 0, err
    assert len(influx.queries) == 1 and "range(start: 2021-07-12T05:00:00Z, stop: 2021-07-12T06:00:00Z)" in influx.queries[0]
    assert_rows(stored(span12["PG_CONNECT"]), expected_rows(DAY0, 12))


def test_a_failed_chunk_is_not_recorded_and_is_retried(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "48")
    seed(influx, DAY0, 49)
    influx.inject(Fault("slow", delay=0), Fault("status", status=400, message="compilation failed: boom"))  # the 2nd chunk fails
    code, _, err = cron(capsys, DAY0 + timedelta(hours=48, minutes=5))
    assert code == 1
    assert "InfluxDB rejected the query (400: compilation failed: boom)" in err
    assert list(ledger(loader_env["PG_CONNECT"])) == hours(DAY0, 24)
    code, _, err = cron(capsys, DAY0 + timedelta(hours=48, minutes=10))
    assert code == 0, err
    assert list(ledger(loader_env["PG_CONNECT"])) == hours(DAY0, 48)
    assert_rows(stored(loader_env["PG_CONNECT"]), expected_rows(DAY0, 48))


def test_empty_hours_are_recorded_and_not_asked_again(span12, influx, capsys):
    seed(influx, DAY0 + timedelta(hours=6), 1)
    assert cron(capsys, DAY0 + timedelta(hours=12, minutes=5))[0] == 0
    recorded = ledger(span12["PG_CONNECT"])
    assert recorded == {hour: (720 if hour == DAY0 + timedelta(hours=6) else 0) for hour in hours(DAY0, 12)}
    influx.queries.clear()
    assert cron(capsys, DAY0 + timedelta(hours=12, minutes=30))[0] == 0
    assert influx.queries == []


@pytest.mark.parametrize(("minute", "latest"), [(0, 13), (1, 13), (2, 14), (59, 14)])
def test_an_hour_settles_before_it_counts(minute, latest):
    now = DAY0 + timedelta(hours=15, minutes=minute)
    assert hml.latest_complete_hour(now, timedelta(minutes=2)) == DAY0 + timedelta(hours=latest)


def test_hour_still_settling_is_refused(span12, influx, capsys):
    code = hml.main(["--hour", "2021-07-12T14"], now=DAY0 + timedelta(hours=15, minutes=1))
    err = capsys.readouterr().err
    assert code == 2
    assert "hour 2021-07-12T14:00:00Z is not complete yet" in err and "SETTLE_MINUTES (2)" in err
    assert influx.queries == []


def test_cron_call_respects_the_settle_delay(span12, influx, capsys):
    seed(influx, DAY0, 15)
    cron(capsys, DAY0 + timedelta(hours=15, minutes=1))
    assert max(ledger(span12["PG_CONNECT"])) == DAY0 + timedelta(hours=13)


# -- One run at a time ------------------------------------------------------------------------
@pytest.fixture
def held_lock(fresh_db):
    connection = psycopg2.connect(fresh_db)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(hashtext('health_metrics_loader:public.pox_five_second_mean'))")
    yield connection
    connection.close()


def test_cron_call_steps_aside_when_locked(span12, influx, held_lock, capsys):
    seed(influx, DAY0, 12)
    code, out, err = cron(capsys, DAY0 + timedelta(hours=12, minutes=5))
    assert code == 0
    assert (
        err.strip() == "health_metrics_loader: another run is loading public.pox_five_second_mean; it will catch up, so this one stops here"
    )
    assert influx.queries == []


def test_explicit_load_waits_then_gives_up(span12, influx, held_lock, capsys, monkeypatch):
    monkeypatch.setenv("LOCK_TIMEOUT", "1.5")
    started = time.monotonic()
    code = hml.main(["--hour", "2021-07-12T10"], now=DAY0 + timedelta(hours=12))
    waited = time.monotonic() - started
    assert code == 1
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in lines[:1]] == [  # after the timestamp: a wait said out loud, then the error
        "INFO another run is loading public.pox_five_second_mean; waiting up to 1.5s for it (LOCK_TIMEOUT)"
    ]
    assert lines[1:] == [
        "health_metrics_loader: error: another run kept public.pox_five_second_mean locked for over 1.5s (LOCK_TIMEOUT); try again later"
    ]
    assert 1.4 < waited < 10
    assert influx.queries == []


def test_explicit_load_waits_for_the_lock(span12, influx, held_lock, capsys):
    seed(influx, DAY0 + timedelta(hours=10), 1)
    threading = __import__("threading")
    threading.Timer(1.0, held_lock.close).start()
    assert hml.main(["--hour", "2021-07-12T10"], now=DAY0 + timedelta(hours=12)) == 0
    assert ledger(span12["PG_CONNECT"]) == {DAY0 + timedelta(hours=10): 720}


LOADER_AT = "import sys, datetime, health_metrics_loader as h; raise SystemExit(h.main(sys.argv[2:], now=datetime.datetime.fromisoformat(sys.argv[1])))"


def start_loader(now, *argv: str) -> subprocess.Popen:
    """The loader in a process of its own, with a fixed clock."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", LOADER_AT, now.isoformat(), *argv], env=env, stderr=subprocess.PIPE, text=True)


def advisory_locks(url: str) -> list[bool]:
    """`granted` of each advisory lock held or awaited on the server."""
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT granted FROM pg_locks WHERE locktype = 'advisory' ORDER BY granted DESC")
        return [row[0] for row in cursor.fetchall()]


def test_three_loaders_at_once_meet_at_the_lock_and_leave_one_copy(span12, influx, monkeypatch):
    """A blog-made table (no primary key: a lost lock would duplicate rows), one span, one clock.
    The first loader holds the lock while its answer is slow; a second waits for it (seen in
    pg_locks), a cron call steps aside; in the end every row is there once."""
    from tests.test_load import make_blog_table

    monkeypatch.setenv("CATCH_UP_HOURS", "6")
    make_blog_table(span12["PG_CONNECT"])
    seed(influx, DAY0, 6)
    now = DAY0 + timedelta(hours=6, minutes=5)
    influx.inject(Fault("slow", delay=3))
    first = start_loader(now, "--from", "2021-07-12T00", "--to", "2021-07-12T06")
    deadline = time.monotonic() + 20
    while advisory_locks(span12["PG_CONNECT"]) != [True] and time.monotonic() < deadline:
        time.sleep(0.02)
    second = start_loader(now, "-v", "--from", "2021-07-12T00", "--to", "2021-07-12T06")
    while advisory_locks(span12["PG_CONNECT"]) != [True, False] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert advisory_locks(span12["PG_CONNECT"]) == [True, False], "the second loader never waited for the lock"
    cron = start_loader(now)
    results = [(p.wait(timeout=120), p.stderr.read()) for p in (first, second, cron)]
    assert [code for code, _ in results] == [0, 0, 0], results
    assert "INFO another run is loading public.pox_five_second_mean; waiting up to 300s for it (LOCK_TIMEOUT)\n" in results[1][1]
    assert results[2][1].strip().endswith("another run is loading public.pox_five_second_mean; it will catch up, so this one stops here")
    with psycopg2.connect(span12["PG_CONNECT"]) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*), count(DISTINCT time) FROM pox_five_second_mean")
        assert cursor.fetchone() == (6 * 720 + 2, 6 * 720 + 2)  # and the blog's two rows of hour 13
    assert "(6 hours already up to date)" in results[1][1]  # the second found the first's rows and rewrote none


# -- The blog's table, and schedulers ---------------------------------------------------------
def test_blog_table_is_caught_up_without_losing_rows(span12, influx, capsys):
    from tests.test_load import make_blog_table  # two rows in hour 13: 13:00:05 and 14:00:00

    make_blog_table(span12["PG_CONNECT"])
    seed(influx, DAY0 + timedelta(hours=12), 1)  # InfluxDB has hour 12, but has forgotten hour 13
    code, _, err = cron(capsys, DAY0 + timedelta(hours=14, minutes=5))
    assert code == 0, err
    assert (
        "WARNING InfluxDB no longer has 2 of the 2 rows stored for 2021-07-12T13:00:00Z; kept them (--hour 2021-07-12T13 --replace drops them)\n"
        in err
    )
    with psycopg2.connect(span12["PG_CONNECT"]) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT time::text, pulse FROM pox_five_second_mean WHERE time > '2021-07-12 13:00:00' ORDER BY time")
        assert cursor.fetchall() == [("2021-07-12 13:00:05", 70.0), ("2021-07-12 14:00:00", 71.0)]
        cursor.execute("SELECT count(*), count(DISTINCT time) FROM pox_five_second_mean")
        assert cursor.fetchone() == (720 + 2, 720 + 2)
    assert ledger(span12["PG_CONNECT"])[DAY0 + timedelta(hours=13)] == 2
    assert ledger(span12["PG_CONNECT"])[DAY0 + timedelta(hours=12)] == 720


def test_catch_up_and_status_on_a_server_in_another_time_zone(span12, influx, capsys, pg):
    """The server's zone is New York's, the blog's table has naive times: the loader's session is UTC."""
    from tests.test_load import make_blog_table

    database = span12["PG_CONNECT"].rsplit("/", 1)[1]
    pg.cursor().execute(f"ALTER DATABASE {database} SET timezone = 'America/New_York'")
    make_blog_table(span12["PG_CONNECT"])  # 13:00:05 and 14:00:00, naive UTC
    seed(influx, DAY0 + timedelta(hours=3), 9)
    code, _, err = cron(capsys, DAY0 + timedelta(hours=12, minutes=5))
    assert code == 0, err
    assert ledger(span12["PG_CONNECT"]) == {hour: 720 if hour.hour >= 3 else 0 for hour in hours(DAY0, 12)}
    with psycopg2.connect(span12["PG_CONNECT"]) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT min(time)::text, max(time)::text, count(*) FROM pox_five_second_mean WHERE time < '2021-07-12 13:00'")
        assert cursor.fetchone() == ("2021-07-12 03:00:05", "2021-07-12 12:00:00", 9 * 720)
    code = hml.main(["--status", "--days", "1"], now=DAY0 + timedelta(hours=12, minutes=10))
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0] == "newest loaded hour: 2021-07-12T11:00:00Z (720 rows), loaded 5 minutes ago"
    assert out.splitlines()[3] == "  2021-07-12  " + "ooo" + "#" * 9 + " " * 12 + "  12/24    6480 rows"


def test_load_window_for_schedulers(span12, influx):
    seed(influx, DAY0, 2)
    settings = hml.settings_from_env(os.environ)
    assert hml.load_window(settings, DAY0, DAY0 + timedelta(hours=2)) == 1440
    assert ledger(span12["PG_CONNECT"]) == {DAY0: 720, DAY0 + timedelta(hours=1): 720}
    assert hml.load_window(settings, DAY0, DAY0 + timedelta(hours=2)) == 0  # nothing differs: nothing written
    with pytest.raises(ValueError):
        hml.load_window(settings, DAY0 + timedelta(minutes=30), DAY0 + timedelta(hours=2))


def test_load_window_takes_airflow_3s_point_interval_as_pendulum_datetimes(span12, influx):
    """The README's DAG: Airflow 3 hands the 15:05 run start == end == 15:05, as pendulum DateTimes."""
    pendulum = pytest.importorskip("pendulum")
    seed(influx, DAY0 + timedelta(hours=13), 3)
    settings = hml.settings_from_env(os.environ)
    end = pendulum.datetime(2021, 7, 12, 15, 5, tz="UTC")
    hour = hml.latest_complete_hour(end, settings.settle)
    assert type(hour) is datetime and hour == DAY0 + timedelta(hours=14)
    assert hml.load_window(settings, hour, hour + timedelta(hours=1)) == 720
    assert influx.queries == [hml.flux_query(settings, hml.Window(DAY0 + timedelta(hours=14), DAY0 + timedelta(hours=15)))]
    local = pendulum.datetime(2021, 7, 12, 17, 0, tz="Europe/Berlin")  # 15:00 UTC
    assert hml.load_window(settings, local, local.add(hours=1)) == 720
    assert ledger(span12["PG_CONNECT"]) == {DAY0 + timedelta(hours=14): 720, DAY0 + timedelta(hours=15): 720}


@pytest.mark.parametrize("minute", [0, 1])
def test_load_window_refuses_an_hour_that_has_not_settled(span12, influx, minute):
    pendulum = pytest.importorskip("pendulum")
    settings = hml.settings_from_env(os.environ)
    start = pendulum.datetime(2021, 7, 12, 14, tz="UTC")
    with pytest.raises(hml.ConfigError) as caught:
        hml.load_window(settings, start, start.add(hours=1), now=pendulum.datetime(2021, 7, 12, 15, minute, tz="UTC"))
    assert str(caught.value) == (
        "hour 2021-07-12T14:00:00Z is not complete yet: an hour counts as complete SETTLE_MINUTES (2) after it ends; "
        "the latest complete hour is 2021-07-12T13:00:00Z"
    )
    assert isinstance(caught.value, ValueError) and influx.queries == []


def test_load_window_refuses_naive_datetimes(span12):
    settings = hml.settings_from_env(os.environ)
    with pytest.raises(hml.ConfigError, match="timezone-aware"):
        hml.load_window(settings, datetime(2021, 7, 12, 10), datetime(2021, 7, 12, 11))


# -- --status -----------------------------------------------------------------------------------
def test_status_report_text():
    settings = hml.settings_from_env(
        {"CONNECTION": "http://x", "TOKEN": "t", "ORG": "o", "PG_CONNECT": "postgresql://u:p@h/d", "CATCH_UP_HOURS": "27"}
    )
    now = utc(2021, 7, 13, 3, 10)
    loaded_at = utc(2021, 7, 13, 2, 5)
    book = {hour: hml.LedgerEntry(720, loaded_at) for hour in hours(utc(2021, 7, 12, 0), 27) if hour.hour not in (5, 6, 7, 20)}
    book[utc(2021, 7, 12, 9)] = hml.LedgerEntry(0, loaded_at)
    text, code = hml.status_report(book, now, settings, days=2)
    assert text.splitlines() == [
        "newest loaded hour: 2021-07-13T02:00:00Z (720 rows), loaded 65 minutes ago",
        "newest reading: none yet",
        "last 2 days (UTC), one mark per hour: # loaded, o loaded but empty, . missing",
        "  2021-07-12  #####...#o##########.###  20/24   13680 rows  missing 05-07,20",
        "  2021-07-13  ###                        3/24    2160 rows",
        "not loaded, and InfluxDB still holds them (4 hours):",
        "  2021-07-12T05:00:00Z..2021-07-12T08:00:00Z  forgotten in 29.1 days; load it with --from 2021-07-12T05 --to 2021-07-12T08",
        "  2021-07-12T20:00:00Z  forgotten in 29.7 days; load it with --from 2021-07-12T20 --to 2021-07-12T21",
    ]
    assert code == 0


@pytest.mark.parametrize(
    ("newest", "code"),
    [(utc(2021, 7, 13, 2), 0), (utc(2021, 7, 13, 1), 0), (utc(2021, 7, 13, 0), 1), (None, 1)],
)
def test_status_exit_code(newest, code):
    settings = hml.settings_from_env({"CONNECTION": "http://x", "TOKEN": "t", "ORG": "o", "PG_CONNECT": "postgresql://u:p@h/d"})
    book = {newest: hml.LedgerEntry(720, newest)} if newest else {}
    assert hml.status_report(book, utc(2021, 7, 13, 3, 10), settings, days=1)[1] == code


def test_status_end_to_end(span12, influx, capsys):
    seed(influx, DAY0, 12)
    assert hml.main(["--from", "2021-07-12T00", "--to", "2021-07-12T03"], now=DAY0 + timedelta(hours=12)) == 0
    capsys.readouterr()
    code = hml.main(["--status", "--days", "1"], now=DAY0 + timedelta(hours=12, minutes=5))
    out = capsys.readouterr().out
    assert code == 1  # the newest loaded hour, 02:00, ended 9 hours ago
    assert "  2021-07-12  ###.........               3/24    2160 rows  missing 03-11" in out
    assert out.splitlines()[1] == "newest reading: 2021-07-12T03:00:00Z, 9 hours ago"
    assert out.splitlines()[-2:] == [
        "not loaded, and InfluxDB still holds them (9 hours):",
        "  2021-07-12T03:00:00Z..2021-07-12T12:00:00Z  forgotten in 29.6 days; load it with --from 2021-07-12T03 --to 2021-07-12T12",
    ]
    assert cron(capsys, DAY0 + timedelta(hours=12, minutes=5))[0] == 0
    assert hml.main(["--status", "--days", "1"], now=DAY0 + timedelta(hours=12, minutes=6)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "not loaded, and InfluxDB still holds them: none"
