"""The read side: Grafana's panels over years of 5-second rows, from the raw table (the
macros over the raw rows) and from the panel functions that read the rollups.

    .venv/bin/python -m tests.benchmark_read [--years 1]

A throwaway PostgreSQL gets --years of 5-second rows (two fields, as the loader makes the
table). The rollups are built as the first run of the loader builds them, and timed. Each
panel query runs warm, five times, and the median is shown, with whether it wrote a
temporary file. Parallel workers are off, as on a Raspberry Pi with little memory. Also:
the upkeep (what a load adds to rebuild the buckets of its hours) and the storage.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timedelta, timezone

import psycopg2

import health_metrics_loader as hml
from tests.grafana_macros import expand, panel_interval_ms
from tests.pg_server import ThrowawayPostgres

TABLE = ("public", "pox_five_second_mean")
RANGES = [("6 h", timedelta(hours=6)), ("24 h", timedelta(days=1)), ("7 d", timedelta(days=7)), ("30 d", timedelta(days=30))]
RAW_PANEL = (
    "SELECT $__timeGroupAlias(time, $__interval), avg(spo2) AS spo2, min(spo2) AS spo2_min, max(spo2) AS spo2_max,"
    " avg(pulse) AS pulse, min(pulse) AS pulse_min, max(pulse) AS pulse_max"
    " FROM pox_five_second_mean WHERE $__timeFilter(time) GROUP BY 1 ORDER BY 1"
)
FUNCTION_PANEL = "SELECT * FROM pox_five_second_mean_series($__timeFrom(), $__timeTo(), $__interval_ms)"
RAW_STAT = "SELECT avg(spo2), min(spo2) FROM pox_five_second_mean WHERE $__timeFilter(time)"
FUNCTION_STAT = "SELECT spo2, spo2_min FROM pox_five_second_mean_stats($__timeFrom(), $__timeTo())"


def fill(cursor, start: datetime, stop: datetime) -> int:
    cursor.execute("CREATE TABLE pox_five_second_mean (time timestamptz PRIMARY KEY, pulse double precision, spo2 double precision)")
    cursor.execute(
        "INSERT INTO pox_five_second_mean SELECT t, 72 + round(8 * sin(extract(epoch FROM t) / 600)),"
        " round((96.5 + 1.5 * sin(extract(epoch FROM t) / 900))::numeric, 1)"
        " FROM generate_series(%s::timestamptz, %s::timestamptz - interval '5 seconds', interval '5 seconds') t",
        (start + timedelta(seconds=5), stop + timedelta(seconds=5)),
    )
    cursor.execute("VACUUM ANALYZE pox_five_second_mean")
    cursor.execute("SELECT count(*) FROM pox_five_second_mean")
    return cursor.fetchone()[0]


def timed(cursor, sql: str, runs: int = 5) -> tuple[float, bool]:
    """Median milliseconds of `sql` warm, and whether any run wrote a temporary file."""
    cursor.execute(sql)  # warm
    cursor.fetchall()
    cursor.execute("SELECT temp_files FROM pg_stat_database WHERE datname = current_database()")
    before = cursor.fetchone()[0]
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        cursor.execute(sql)
        cursor.fetchall()
        seconds.append(time.perf_counter() - started)
    cursor.execute("SELECT pg_stat_force_next_flush()")
    cursor.execute("SELECT temp_files FROM pg_stat_database WHERE datname = current_database()")
    return statistics.median(seconds) * 1000, cursor.fetchone()[0] > before


def upkeep(cursor, hours: list[datetime], per_call: int) -> float:
    """Milliseconds to refresh the rollups of `hours`, `per_call` hours at a time (a load's chunk)."""
    columns = hml.table_columns(cursor, TABLE)
    started = time.perf_counter()
    for i in range(0, len(hours), per_call):
        hml.refresh_rollups(cursor, TABLE, columns, hours[i : i + per_call])
    return (time.perf_counter() - started) * 1000


def size(cursor, table: tuple[str, ...]) -> int:
    cursor.execute("SELECT pg_total_relation_size(%s)", (hml.qualified(table),))
    return cursor.fetchone()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--years", type=int, default=1)
    parser.add_argument("--days", type=int, help="days of rows instead of years (a quick check of the benchmark itself)")
    args = parser.parse_args(argv)
    stop = datetime(2026, 11, 1, tzinfo=timezone.utc)
    span_days = args.days or 365 * args.years
    start = stop - timedelta(days=span_days)
    server = ThrowawayPostgres().start()
    try:
        connection = psycopg2.connect(server.url)
        connection.autocommit = True
        cursor = connection.cursor()
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute("SET max_parallel_workers_per_gather = 0")
        started = time.perf_counter()
        rows = fill(cursor, start, stop)
        print(f"{rows} rows of 5-second means, {hml.iso(start)}..{hml.iso(stop)}, made in {time.perf_counter() - started:.1f}s", flush=True)
        started = time.perf_counter()
        cursor.execute("BEGIN")
        hml.build_rollups(cursor, TABLE, hml.table_columns(cursor, TABLE))
        cursor.execute("COMMIT")
        cursor.execute("VACUUM ANALYZE pox_five_second_mean_1m")
        cursor.execute("VACUUM ANALYZE pox_five_second_mean_1h")
        print(f"first run on this table: rollups built in {time.perf_counter() - started:.2f}s (target <= 10 s)")
        raw, rolled = size(cursor, TABLE), sum(size(cursor, hml.rollup_of(TABLE, g)) for g in hml.ROLLUPS)
        print(f"storage: raw table {raw / 2**20:.0f} MiB, rollups {rolled / 2**20:.1f} MiB ({rolled / raw:.1%}; target <= 15%)")

        spans = [*RANGES, *((f"{y} y", timedelta(days=365 * y)) for y in range(1, args.years + 1))]
        spans = [(name, span) for name, span in spans if span <= timedelta(days=span_days)]
        print(
            f"\n{'panel range':<12}{'step':>8}{'raw table':>12}{'function':>11}{'speed-up':>10}{'raw stat':>11}{'stat fn':>9}  temp file (raw / fn)"
        )
        for name, span in spans:
            low, high = stop - span, stop
            step = panel_interval_ms(int(span.total_seconds() * 1000), 1000, 5000)
            raw_ms, raw_temp = timed(cursor, expand(RAW_PANEL, low, high, step), runs=3 if span > timedelta(days=60) else 5)
            fn_ms, fn_temp = timed(cursor, expand(FUNCTION_PANEL, low, high, step))
            raw_stat, _ = timed(cursor, expand(RAW_STAT, low, high, step), runs=3 if span > timedelta(days=60) else 5)
            fn_stat, _ = timed(cursor, expand(FUNCTION_STAT, low, high, step))
            print(
                f"{name:<12}{step // 1000:>7}s{raw_ms:>10.1f}ms{fn_ms:>9.2f}ms{raw_ms / fn_ms:>9.0f}x{raw_stat:>9.1f}ms{fn_stat:>7.2f}ms"
                f"  {'yes' if raw_temp else 'no'} / {'yes' if fn_temp else 'no'}"
            )
        print("targets: every panel range <= 15 ms with no temporary file; a stat panel <= 5 ms")

        hour = stop - timedelta(hours=2)
        cursor.execute("BEGIN")
        single = statistics.median(upkeep(cursor, [hour], 1) for _ in range(20))
        month = upkeep(cursor, [stop - timedelta(days=min(30, span_days)) + i * hml.HOUR for i in range(24 * min(30, span_days))], 24)
        cursor.execute("ROLLBACK")
        print(
            f"\nupkeep: the hourly call's hour {single:.2f} ms (target <= 2 ms); a 30-day backfill's 720 hours, a day at a time, {month:.0f} ms"
        )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
