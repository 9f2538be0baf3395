"""Rollups and the panel functions: after every path that writes rows, each panel equals
Grafana's own macros over the raw rows, bucket for bucket, and the rollups equal a rebuild."""

from __future__ import annotations

import math
from datetime import timedelta

import psycopg2
import pytest

import health_metrics_loader as hml
from tests.conftest import run_loader, utc
from tests.grafana_macros import expand, rfc3339nano
from tests.synthetic import line_protocol

DAY0 = utc(2021, 7, 12)
TABLE = ("public", "pox_five_second_mean")
STEPS_MS = [1000, 7000, 45000, 60000, 120000, 300000, 420000, 1800000, 3600000, 10800000, 86400000, 604800000]


def call(capsys, argv=(), now=DAY0 + timedelta(days=3, minutes=5)):
    return run_loader(capsys, argv, now)


def fields_of(pg, table: str = "pox_five_second_mean") -> list[str]:
    with pg.cursor() as cursor:
        columns = hml.table_columns(cursor, ("public", table))
    return hml.rollup_fields(columns)


def grafana_rows(pg, start, stop, step_ms, table: str = "pox_five_second_mean") -> list[tuple]:
    """The README's raw-table panel: what Grafana's macros give over the raw rows."""
    values = ", ".join(f'avg("{f}"), min("{f}"), max("{f}")' for f in fields_of(pg, table))
    sql = f"SELECT $__timeGroupAlias(time, $__interval), {values} FROM {table} WHERE $__timeFilter(time) GROUP BY 1 ORDER BY 1"
    with pg.cursor() as cursor:
        cursor.execute(expand(sql, start, stop, step_ms))
        return [(float(row[0]), *row[1:]) for row in cursor.fetchall()]


def panel_rows(pg, start, stop, step_ms, table: str = "pox_five_second_mean") -> list[tuple]:
    sql = f"SELECT extract(epoch FROM time)::float8, * FROM {table}_series($__timeFrom(), $__timeTo(), $__interval_ms)"
    with pg.cursor() as cursor:
        cursor.execute(expand(sql, start, stop, step_ms))
        return [(row[0], *row[2:]) for row in cursor.fetchall()]


def assert_same_buckets(got: list[tuple], want: list[tuple]) -> None:
    """The same buckets; means to 1e-9, minima and maxima exactly, NULL where Grafana has NULL."""
    assert [row[0] for row in got] == [row[0] for row in want]
    for g, w in zip(got, want):
        for i, (a, b) in enumerate(zip(g[1:], w[1:])):
            if a is None or b is None:
                assert a is None and b is None, (g, w)
            elif i % 3 == 0:
                assert math.isclose(a, b, rel_tol=1e-9), (g, w)
            else:
                assert a == b, (g, w)


QUICK_STEPS_MS = [7000, 60000, 1800000, 3600000]  # an odd step, and one for each rollup


def assert_panels_exact(pg, start, stop, table: str = "pox_five_second_mean", steps=STEPS_MS) -> None:
    """Every step over the whole span, and over a range whose ends cut buckets."""
    ranges = [(start, stop), (start + timedelta(minutes=17, seconds=23, microseconds=500000), stop - timedelta(minutes=18, seconds=7))]
    for low, high in ranges:
        for step in steps:
            assert_same_buckets(panel_rows(pg, low, high, step, table), grafana_rows(pg, low, high, step, table))
        assert_stats_exact(pg, low, high, table)


def assert_stats_exact(pg, low, high, table: str = "pox_five_second_mean") -> None:
    fields = fields_of(pg, table)
    values = ", ".join(f'avg("{f}"), min("{f}"), max("{f}")' for f in fields)
    with pg.cursor() as cursor:
        cursor.execute(f"SELECT {values} FROM {table} WHERE time BETWEEN %s AND %s", (low, high))
        want = cursor.fetchone()
        cursor.execute(f"SELECT * FROM {table}_stats(%s, %s)", (low, high))
        got = cursor.fetchone()
    assert_same_buckets([(0, *got)], [(0, *want)])


def rollups(pg, table: tuple[str, ...] = TABLE) -> dict[str, list[tuple]]:
    with pg.cursor() as cursor:
        return {
            grain: (cursor.execute(f"SELECT * FROM {hml.qualified(hml.rollup_of(table, grain))} ORDER BY bucket"), cursor.fetchall())[1]
            for grain in hml.ROLLUPS
        }


def assert_rollups_equal_a_rebuild(url: str, table: tuple[str, ...] = TABLE) -> None:
    connection = psycopg2.connect(url)
    try:
        connection.cursor().execute("SET TIME ZONE 'UTC'")
        kept = rollups(connection, table)
        with connection.cursor() as cursor:
            hml.rebuild_rollups(cursor, table, hml.table_columns(cursor, table))
        rebuilt = rollups(connection, table)
        connection.rollback()
    finally:
        connection.close()
    for grain in hml.ROLLUPS:
        assert [r[0] for r in kept[grain]] == [r[0] for r in rebuilt[grain]], grain
        for a, b in zip(kept[grain], rebuilt[grain]):
            assert all(x == y or (isinstance(x, float) and math.isclose(x, y, rel_tol=1e-12)) for x, y in zip(a, b)), (a, b)


def late(influx, moment, **fields) -> None:
    values = ",".join(f"{k}={v}" for k, v in fields.items())
    influx.write_lines("pulse_oximeter", f"spo2,uid=A {values} {int(moment.timestamp())}\n", precision="s")


# -- The SQL, as a reader sees it ------------------------------------------------------------------
def test_the_minutes_come_from_the_raw_rows_and_each_coarser_grain_from_the_one_before():
    assert hml.refresh_sql(TABLE, ["spo2"], "_1m") == (
        'DELETE FROM "public"."pox_five_second_mean_1m" WHERE bucket >= %(start)s AND bucket <= %(stop)s;'
        ' INSERT INTO "public"."pox_five_second_mean_1m" (bucket, rows, "spo2_n", "spo2_sum", "spo2_min", "spo2_max")'
        ' SELECT date_trunc(\'minute\', r.time::timestamptz), count(*), count(r."spo2"), sum(r."spo2"), min(r."spo2"), max(r."spo2")'
        ' FROM "public"."pox_five_second_mean" r WHERE r.time >= %(start)s'
        " AND r.time < %(stop)s::timestamptz + interval '60 seconds' GROUP BY 1"
    )
    assert hml.refresh_sql(TABLE, ["spo2"], "_5m") == (
        'DELETE FROM "public"."pox_five_second_mean_5m" WHERE bucket >= %(start)s AND bucket <= %(stop)s;'
        ' INSERT INTO "public"."pox_five_second_mean_5m" (bucket, rows, "spo2_n", "spo2_sum", "spo2_min", "spo2_max")'
        " SELECT to_timestamp(date_part('epoch', r.bucket)::bigint / 300 * 300), sum(r.rows),"
        ' sum(r."spo2_n"), sum(r."spo2_sum"), min(r."spo2_min"), max(r."spo2_max")'
        ' FROM "public"."pox_five_second_mean_1m" r WHERE r.bucket >= %(start)s'
        " AND r.bucket < %(stop)s::timestamptz + interval '300 seconds' GROUP BY 1"
    )
    assert 'FROM "public"."pox_five_second_mean_5m" r' in hml.refresh_sql(TABLE, ["spo2"], "_1h")


def test_long_names_stay_within_postgresql_s_63_bytes_and_apart():
    long = "x" * 60
    assert hml.suffixed("spo2", "_sum") == "spo2_sum"
    names = {hml.suffixed(long + "a", "_sum"), hml.suffixed(long + "b", "_sum")}
    assert len(names) == 2 and all(len(n.encode()) == 63 and n.endswith("_sum") for n in names)


# -- Every write path keeps them exact --------------------------------------------------------------
def test_every_write_path_keeps_the_panels_exact(loader_env, influx, capsys, pg, monkeypatch):
    url = loader_env["PG_CONNECT"]
    influx.write_lines("pulse_oximeter", line_protocol(DAY0, 50), precision="s")
    first, stop = DAY0, DAY0 + timedelta(hours=50)

    def check(steps=QUICK_STEPS_MS):
        assert_rollups_equal_a_rebuild(url)
        assert_panels_exact(pg, first, stop, steps=steps)

    code, _, err = call(capsys, ["--from", "2021-07-12T00", "--to", "2021-07-12T12"])  # --from/--to
    assert code == 0, err
    check()
    code, _, err = call(capsys, ["--hour", "2021-07-12T20"])  # --hour, leaving a gap
    assert code == 0, err
    monkeypatch.setenv("CATCH_UP_HOURS", "72")
    code, _, err = call(capsys, now=DAY0 + timedelta(hours=49, minutes=5))  # the cron call catches up
    assert code == 0, err
    check()
    late(influx, DAY0 + timedelta(hours=46, minutes=3, seconds=2), spo2=80.5)  # a dip that arrived late
    late(influx, DAY0 + timedelta(hours=49, minutes=30, seconds=1), temp=36.6)  # a new field in the next hour
    code, _, err = call(capsys, now=DAY0 + timedelta(hours=50, minutes=5))  # the cron call with its re-check
    assert code == 0, err
    check()
    assert fields_of(pg) == ["pulse", "spo2", "temp"]
    late(influx, DAY0 + timedelta(hours=10, minutes=59, seconds=59), spo2=71.25, pulse="140i")  # a late point days back
    code, _, err = call(capsys, ["--repair"], now=DAY0 + timedelta(hours=50, minutes=5))  # --repair
    assert code == 0, err
    check()
    influx.storage.forget_before("pulse_oximeter", int((DAY0 + timedelta(hours=5, minutes=30)).timestamp()) * 10**9)
    assert call(capsys, ["--hour", "2021-07-12T05", "--replace"], now=DAY0 + timedelta(hours=50, minutes=5))[0] == 0  # --replace
    check(STEPS_MS)


def test_the_lowest_spo2_of_a_minute_survives_any_range(loader_env, influx, capsys, pg):
    """A 30-second desaturation is invisible in an hour's mean; its minimum is exact at every step."""
    influx.write_lines("pulse_oximeter", line_protocol(DAY0, 24), precision="s")
    dip = DAY0 + timedelta(hours=13, minutes=7)
    influx.write_lines("pulse_oximeter", "".join(f"spo2,uid=A spo2=84 {int(dip.timestamp()) + s}\n" for s in range(30)), precision="s")
    assert call(capsys, ["--from", "2021-07-12T00", "--to", "2021-07-13T00"])[0] == 0
    for step in (60000, 3600000, 86400000):
        rows = panel_rows(pg, DAY0, DAY0 + timedelta(days=1), step)
        spo2_min = [row[5] for row in rows]  # time, pulse, pulse_min, pulse_max, spo2, spo2_min, spo2_max
        assert min(spo2_min) == 84.0


def test_a_load_that_rolls_back_leaves_the_rollups_as_they_were(loader_env, influx, capsys, pg):
    influx.write_lines("pulse_oximeter", line_protocol(DAY0, 3), precision="s")
    assert call(capsys, ["--from", "2021-07-12T00", "--to", "2021-07-12T02"])[0] == 0
    before = rollups(pg)
    with pg.cursor() as cursor:  # the ledger refuses hour 2, after the rows and the rollups were written
        cursor.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.hour = '2021-07-12T02:00Z' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$"
        )
        cursor.execute("CREATE TRIGGER refuse BEFORE INSERT ON loaded_hours FOR EACH ROW EXECUTE FUNCTION refuse()")
    code, _, err = call(capsys, ["--hour", "2021-07-12T02"])
    assert code == 1 and "refused" in err
    assert rollups(pg) == before


# -- The first run of this version, and a hand-edited table ----------------------------------------------
def make_year(url: str, blog: bool = True) -> None:
    """A year of archive the way the blog's script left it (naive UTC times, no key, no ledger):
    an hour of 5-second rows a day, with a field that is sometimes NULL."""
    kind = "timestamp" if blog else "timestamptz"
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE pox_five_second_mean (time {kind}, pulse double precision, spo2 double precision)")
        cursor.execute(
            "INSERT INTO pox_five_second_mean SELECT t, 70 + 10 * sin(extract(epoch FROM t) / 900),"
            " CASE WHEN extract(minute FROM t) = 41 THEN NULL ELSE round((96 + 3 * cos(extract(epoch FROM t) / 600))::numeric, 2) END"
            " FROM generate_series(timestamp '2020-07-01 06:00:05', timestamp '2021-06-30 06:00:05', interval '1 day') d,"
            " LATERAL generate_series(d, d + interval '1 hour' - interval '5 seconds', interval '5 seconds') t"
        )


def test_an_old_year_gains_its_rollups_on_the_first_run(loader_env, influx, capsys, pg):
    make_year(loader_env["PG_CONNECT"])
    influx.write_lines("pulse_oximeter", line_protocol(DAY0 + timedelta(days=2), 1), precision="s")
    code, _, err = call(capsys)
    assert code == 0, err
    built = [line.split(" INFO ", 1)[1] for line in err.splitlines() if "built the rollups" in line]
    assert len(built) == 1 and built[0].startswith("built the rollups of public.pox_five_second_mean from 262800 rows in ")
    assert_rollups_equal_a_rebuild(loader_env["PG_CONNECT"])
    year = (utc(2020, 7, 1), DAY0 + timedelta(days=3))
    for step in (3600000, 86400000, 604800000, 60000 * 7):
        assert_same_buckets(panel_rows(pg, *year, step), grafana_rows(pg, *year, step))
    assert_stats_exact(pg, *year)
    assert "built the rollups" not in call(capsys, now=DAY0 + timedelta(days=3, hours=1, minutes=5))[2]


def test_the_panels_do_not_depend_on_the_session_s_time_zone(loader_env, influx, capsys, pg):
    """Grafana's session may run in any zone; the blog's naive UTC times must not shift."""
    make_year(loader_env["PG_CONNECT"])
    influx.write_lines("pulse_oximeter", line_protocol(DAY0 + timedelta(days=2), 1), precision="s")
    assert call(capsys)[0] == 0
    span = (utc(2021, 6, 1, 3, 10), utc(2021, 6, 20, 22, 50))
    with pg.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
    want = {step: grafana_rows(pg, *span, step) for step in (60000, 3600000, 7000)}
    with pg.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'Asia/Kolkata'")
    for step, rows in want.items():
        assert_same_buckets(panel_rows(pg, *span, step), rows)


def test_rebuild_rollups_after_a_hand_edit(loader_env, influx, capsys, pg):
    influx.write_lines("pulse_oximeter", line_protocol(DAY0, 2), precision="s")
    assert call(capsys, ["--from", "2021-07-12T00", "--to", "2021-07-12T02"])[0] == 0
    with pg.cursor() as cursor:
        cursor.execute("UPDATE pox_five_second_mean SET spo2 = 50 WHERE time = '2021-07-12T00:30:05Z'")
    assert panel_rows(pg, DAY0, DAY0 + timedelta(hours=2), 3600000) != grafana_rows(pg, DAY0, DAY0 + timedelta(hours=2), 3600000)
    code, out, err = call(capsys, ["--rebuild-rollups"])
    assert code == 0, err
    assert [line.split(" INFO ", 1)[1].split(" in ")[0] for line in err.splitlines() if " INFO " in line] == [
        "built the rollups of public.pox_five_second_mean from 1440 rows"
    ]
    assert_panels_exact(pg, DAY0, DAY0 + timedelta(hours=2))


def test_the_expander_speaks_grafana_s_formats():
    sql = "SELECT $__timeGroupAlias(time, $__interval) FROM t WHERE $__timeFilter(time) AND $__interval_ms > 0"
    start, stop = utc(2021, 7, 12, 10, 0, 0), utc(2021, 7, 12, 11, 30, 0) + timedelta(microseconds=250000)
    assert expand(sql, start, stop, 300000) == (
        'SELECT floor(extract(epoch from time)/300)*300 AS "time" FROM t'
        " WHERE time BETWEEN '2021-07-12T10:00:00Z' AND '2021-07-12T11:30:00.25Z' AND 300000 > 0"
    )
    assert rfc3339nano(stop) == "2021-07-12T11:30:00.25Z"
    with pytest.raises(ValueError):
        expand(sql, start, stop, 90000)  # $__interval would say 1m: not a step a panel can have
