"""Late points, --verify and --repair: the table proven equal to InfluxDB, hour by hour."""

from __future__ import annotations

from datetime import timedelta

import psycopg2
import pytest

import health_metrics_loader as hml
from tests.conftest import utc
from tests.synthetic import expected_rows, line_protocol
from tests.test_catch_up import ledger
from tests.test_main import assert_rows, stored

DAY0 = utc(2021, 7, 12)


def at(hours: float, minutes: int = 5):
    return DAY0 + timedelta(hours=hours, minutes=minutes)


def call(capsys, argv=(), now=None):
    code = hml.main(list(argv), now=now)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def loaded_at(url: str) -> dict:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT hour, loaded_at FROM loaded_hours ORDER BY hour")
        return dict(cursor.fetchall())


def late_point(influx, moment, field: str = "temp", value: float = 36.6) -> None:
    """A point the device uploads late: a new field, so one 5-second row changes."""
    influx.write_lines("pulse_oximeter", f"spo2,uid=A {field}={value} {int(moment.timestamp())}", precision="s")


def temps(url: str) -> list[tuple]:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'pox_five_second_mean' AND column_name = 'temp'")
        if not cursor.fetchone()[0]:
            return []
        cursor.execute("SELECT time, temp FROM pox_five_second_mean WHERE temp IS NOT NULL ORDER BY time")
        return cursor.fetchall()


@pytest.fixture
def day(loader_env, influx, capsys, monkeypatch):
    """A day of readings, loaded by the cron call at 00:05 the next day (CATCH_UP_HOURS 72)."""
    influx.write_lines("pulse_oximeter", line_protocol(DAY0, 24), precision="s")
    assert call(capsys, now=at(24))[0] == 0
    influx.queries.clear()
    return loader_env


# -- Late points ------------------------------------------------------------------------------------
def test_a_late_point_two_hours_back_is_picked_up_by_the_next_cron_call(day, influx, capsys):
    influx.write_lines("pulse_oximeter", line_protocol(at(24, 0), 1), precision="s")
    late_point(influx, at(22, 30) + timedelta(seconds=2))
    before = loaded_at(day["PG_CONNECT"])
    code, _, err = call(capsys, now=at(25))
    assert code == 0, err
    assert len(influx.queries) == 1
    assert "range(start: 2021-07-12T18:00:00Z, stop: 2021-07-13T01:00:00Z)" in influx.queries[0]
    assert "loaded 2021-07-12T18:00:00Z..2021-07-13T01:00:00Z: 1440 rows in " in err and "(5 hours already up to date)" in err
    after = loaded_at(day["PG_CONNECT"])
    rewritten = sorted(hour for hour in after if after[hour] != before.get(hour))
    assert rewritten == [at(22, 0), at(24, 0)]  # the late hour and the new one; nothing else was written
    assert temps(day["PG_CONNECT"]) == [(at(22, 30) + timedelta(seconds=5), 36.6)]


def test_an_ordinary_cron_call_writes_only_the_new_hour(day, influx, capsys, pg):
    influx.write_lines("pulse_oximeter", line_protocol(at(24, 0), 1), precision="s")
    with pg.cursor() as cursor:
        cursor.execute("SELECT time, xmin::text FROM pox_five_second_mean")
        versions = dict(cursor.fetchall())
    code, _, err = call(capsys, now=at(25))
    assert code == 0, err
    assert len(influx.queries) == 1
    with pg.cursor() as cursor:
        cursor.execute("SELECT time, xmin::text FROM pox_five_second_mean")
        after = dict(cursor.fetchall())
    assert {t: v for t, v in after.items() if t in versions} == versions  # not one old row was rewritten
    assert len(after) == len(versions) + 720


@pytest.mark.parametrize("hours_back", [48, 30])
def test_a_late_point_days_back_is_found_by_verify_and_fixed_by_repair(loader_env, influx, capsys, hours_back):
    influx.write_lines("pulse_oximeter", line_protocol(DAY0, 72), precision="s")
    assert call(capsys, now=at(72))[0] == 0
    late = at(72 - hours_back, 0) + timedelta(minutes=17, seconds=3)
    late_point(influx, late)
    hour = hml.hour_floor(late)
    assert call(capsys, now=at(73))[0] == 0  # the cron call re-checks only the last hours
    assert temps(loader_env["PG_CONNECT"]) == []
    influx.queries.clear()
    code, out, err = call(capsys, ["--verify"], now=at(73))
    assert code == 1, err
    assert out.splitlines() == [
        f"{hml.iso(hour)}  missing 0, changed 1, kept 0",
        "72 hours checked: 71 equal, 1 with missing or changed rows (0 missing, 1 changed), 0 with rows InfluxDB no longer has (0 kept)",
    ]
    assert len(influx.queries) == 3  # 72 hours: one query per 24 hours
    assert temps(loader_env["PG_CONNECT"]) == []  # --verify writes no row
    code, out, err = call(capsys, ["--repair"], now=at(73))
    assert code == 0, err
    assert out.splitlines()[0] == f"{hml.iso(hour)}  missing 0, changed 1, kept 0 (reloaded)"
    assert out.splitlines()[-1].endswith("; reloaded 1 hour")
    assert temps(loader_env["PG_CONNECT"]) == [(late + timedelta(seconds=2), 36.6)]
    code, out, _ = call(capsys, ["--verify"], now=at(73))
    assert code == 0
    assert out.splitlines() == [
        "72 hours checked: 72 equal, 0 with missing or changed rows (0 missing, 0 changed), 0 with rows InfluxDB no longer has (0 kept)"
    ]


def test_an_hour_first_recorded_empty_gets_its_late_points(loader_env, influx, capsys):
    influx.write_lines("pulse_oximeter", line_protocol(DAY0, 10), precision="s")
    influx.write_lines("pulse_oximeter", line_protocol(at(11, 0), 13), precision="s")  # the device was off in hour 10
    assert call(capsys, now=at(24))[0] == 0
    assert ledger(loader_env["PG_CONNECT"])[at(10, 0)] == 0
    influx.write_lines("pulse_oximeter", line_protocol(at(10, 0), 1), precision="s")  # it uploads its buffer a day later
    code, out, _ = call(capsys, ["--verify"], now=at(36))
    assert code == 1
    assert f"{hml.iso(at(10, 0))}  missing 720, changed 0, kept 0" in out.splitlines()
    code, out, _ = call(capsys, ["--repair", "--from", "2021-07-12T00", "--to", "2021-07-13T00"], now=at(36))
    assert code == 0
    assert ledger(loader_env["PG_CONNECT"])[at(10, 0)] == 720
    assert_rows(stored(loader_env["PG_CONNECT"]), expected_rows(DAY0, 24))


# -- A table that drifted from the source ----------------------------------------------------------------
def test_a_hand_edited_row_is_named_and_restored(day, influx, capsys, pg):
    pg.cursor().execute("UPDATE pox_five_second_mean SET spo2 = 12 WHERE time = '2021-07-12 07:30:05+00'")
    pg.cursor().execute("DELETE FROM pox_five_second_mean WHERE time = '2021-07-12 07:45:00+00'")
    code, out, _ = call(capsys, ["--verify", "--hour", "2021-07-12T07"], now=at(30))
    assert code == 1
    assert out.splitlines() == [
        "2021-07-12T07:00:00Z  missing 1, changed 1, kept 0",
        "1 hour checked: 0 equal, 1 with missing or changed rows (1 missing, 1 changed), 0 with rows InfluxDB no longer has (0 kept)",
    ]
    assert call(capsys, ["--repair", "--hour", "2021-07-12T07"], now=at(30))[0] == 0
    assert_rows(stored(day["PG_CONNECT"]), expected_rows(DAY0, 24))


def test_a_tiny_float_difference_is_not_a_change(day, influx, capsys, pg):
    pg.cursor().execute("UPDATE pox_five_second_mean SET spo2 = spo2 * (1 + 1e-12) WHERE time = '2021-07-12 07:30:05+00'")
    code, out, _ = call(capsys, ["--verify", "--hour", "2021-07-12T07"], now=at(30))
    assert code == 0, out


def test_rows_influxdb_no_longer_has_are_kept_and_reported(day, influx, capsys):
    influx.reset()
    influx.write_lines("pulse_oximeter", line_protocol(at(12, 0), 12), precision="s")  # retention took hours 0 to 11
    code, out, _ = call(capsys, ["--verify", "--from", "2021-07-12T10", "--to", "2021-07-12T14"], now=at(30))
    assert code == 0
    assert out.splitlines() == [
        "2021-07-12T10:00:00Z  missing 0, changed 0, kept 720",
        "2021-07-12T11:00:00Z  missing 0, changed 0, kept 720",
        "4 hours checked: 4 equal, 0 with missing or changed rows (0 missing, 0 changed), 2 with rows InfluxDB no longer has (1440 kept)",
    ]
    code, out, err = call(capsys, ["--repair", "--from", "2021-07-12T10", "--to", "2021-07-12T14"], now=at(30))
    assert code == 0
    assert out.splitlines()[-1].endswith("; reloaded 0 hours")
    assert_rows(stored(day["PG_CONNECT"]), expected_rows(DAY0, 24))
    code, out, _ = call(capsys, ["--repair", "--replace", "--hour", "2021-07-12T10"], now=at(30))
    assert code == 0
    assert out.splitlines()[0] == "2021-07-12T10:00:00Z  missing 0, changed 0, kept 720 (reloaded)"
    assert len(stored(day["PG_CONNECT"])) == 23 * 720


def test_repair_dry_run_says_what_it_would_reload_and_writes_nothing(day, influx, capsys, pg):
    pg.cursor().execute("UPDATE pox_five_second_mean SET spo2 = 12 WHERE time = '2021-07-12 07:30:05+00'")
    before = loaded_at(day["PG_CONNECT"])
    code, out, _ = call(capsys, ["--repair", "--dry-run", "--hour", "2021-07-12T07"], now=at(30))
    assert code == 1  # as --verify exits for the same state
    assert out.splitlines()[0] == "2021-07-12T07:00:00Z  missing 0, changed 1, kept 0 (would reload)"
    assert loaded_at(day["PG_CONNECT"]) == before
    with pg.cursor() as cursor:
        cursor.execute(
            "SELECT spo2, (SELECT count(*) FROM loaded_hours WHERE checked_at IS NOT NULL) FROM pox_five_second_mean WHERE time = '2021-07-12 07:30:05+00'"
        )
        assert cursor.fetchone() == (12.0, 0)


def test_verify_takes_no_row_and_leaves_loaded_at(day, influx, capsys, pg):
    before = loaded_at(day["PG_CONNECT"])
    with pg.cursor() as cursor:
        cursor.execute("SELECT xmin::text FROM pox_five_second_mean ORDER BY time")
        versions = cursor.fetchall()
    assert call(capsys, ["--verify"], now=at(30))[0] == 0
    assert loaded_at(day["PG_CONNECT"]) == before
    with pg.cursor() as cursor:
        cursor.execute("SELECT xmin::text FROM pox_five_second_mean ORDER BY time")
        assert cursor.fetchall() == versions


# -- --status and the ledger -----------------------------------------------------------------------------------
def test_status_shows_when_each_day_was_checked_and_repaired(day, influx, capsys, pg):
    pg.cursor().execute("UPDATE pox_five_second_mean SET spo2 = 12 WHERE time > '2021-07-12 07:00+00' AND time < '2021-07-12 09:00+00'")
    assert call(capsys, ["--repair"], now=at(24, 30))[0] == 0
    code, out, _ = call(capsys, ["--status", "--days", "2"], now=at(24, 40))
    assert code == 0
    assert out.splitlines()[3:5] == [
        "  2021-07-12  ########################  24/24   17280 rows  checked 2021-07-13T00:30:00Z  2 repaired",
        "  2021-07-13                             0/24       0 rows",  # hour 00 is not complete yet
    ]


def test_an_older_ledger_gains_its_new_columns_in_place(loader_env, influx, capsys, pg):
    pg.cursor().execute(
        "CREATE TABLE loaded_hours (target_table text NOT NULL, hour timestamptz NOT NULL, rows integer NOT NULL,"
        " loaded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (target_table, hour))"
    )
    pg.cursor().execute("INSERT INTO loaded_hours VALUES ('pox_five_second_mean', '2021-07-12 10:00+00', 0, '2021-07-12 11:05+00')")
    code, out, _ = call(capsys, ["--status", "--days", "1"], now=at(12))
    assert out.splitlines()[0] == "newest loaded hour: 2021-07-12T10:00:00Z (0 rows), loaded 60 minutes ago"
    influx.write_lines("pulse_oximeter", line_protocol(at(11, 0), 1), precision="s")
    assert call(capsys, ["--hour", "2021-07-12T11"], now=at(12))[0] == 0
    with pg.cursor() as cursor:
        cursor.execute("SELECT target_table, hour, rows, checked_at, repaired_at FROM loaded_hours ORDER BY hour")
        assert cursor.fetchall() == [
            ("public.pox_five_second_mean", at(10, 0), 0, None, None),
            ("public.pox_five_second_mean", at(11, 0), 720, None, None),
        ]


def test_verify_with_dry_run_is_refused(capsys):
    """--verify writes no row; a dry run of it would also skip the lock, so the pair is refused."""
    assert hml.main(["--verify", "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "health_metrics_loader: error: --verify writes no row already; --dry-run goes with a load or --repair (see --help)\n"
    )
