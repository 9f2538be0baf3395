"""Try the loader without an InfluxDB account.

Starts the InfluxDB emulator with six hours of synthetic 1 Hz pulse-oximeter data
and a throwaway PostgreSQL, runs the real loader against them (a backfill of the first
three hours, then the cron call, which catches up on the rest, then --verify), loads the
same hours again through InfluxQL into a second table, and prints what it loaded.

    .venv/bin/python -m tests.demo
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2

import health_metrics_loader as hml
from tests.influxdb_emulator import Emulator
from tests.pg_server import ThrowawayPostgres
from tests.synthetic import line_protocol

ROOT = Path(__file__).resolve().parents[1]
HOURS = 6


def loader(env: dict[str, str], *argv: str) -> None:
    command = [sys.executable, str(ROOT / "health_metrics_loader.py"), *argv]
    print(f"\n$ health_metrics_loader.py {' '.join(argv)}", flush=True)
    subprocess.run(command, env=env, check=False, stderr=subprocess.STDOUT)


def report(url: str) -> None:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute(
            "SELECT date_trunc('hour', time - interval '1 microsecond'), count(*), round(avg(pulse)::numeric, 1), round(avg(spo2)::numeric, 2)"
            " FROM pox_five_second_mean GROUP BY 1 ORDER BY 1"
        )
        print("\nIn PostgreSQL, table pox_five_second_mean:")
        print(f"  {'hour (UTC)':<22}{'rows':>6}{'avg pulse':>11}{'avg spo2':>10}")
        for hour, rows, pulse, spo2 in cursor.fetchall():
            print(f"  {hour:%Y-%m-%d %H:00:00}   {rows:>6}{pulse:>11}{spo2:>10}")
        cursor.execute("SELECT time, pulse, spo2 FROM pox_five_second_mean ORDER BY time LIMIT 3")
        print("\n  first rows:")
        for time_, pulse, spo2 in cursor.fetchall():
            print(f"  {time_:%Y-%m-%d %H:%M:%S%z}  pulse {pulse:<6g}  spo2 {spo2:.2f}")


def same_rows(url: str) -> bool:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM ((TABLE pox_five_second_mean EXCEPT TABLE pox_via_influxql)"
            " UNION ALL (TABLE pox_via_influxql EXCEPT TABLE pox_five_second_mean)) AS differences"
        )
        return cursor.fetchone()[0] == 0


def main() -> int:
    now = datetime.now(timezone.utc)
    settle = timedelta(minutes=2)  # the loader's default SETTLE_MINUTES, set below
    last = hml.Window(hml.latest_complete_hour(now, settle), hml.latest_complete_hour(now, settle) + hml.HOUR)
    first = last.start - timedelta(hours=HOURS - 1)
    emulator = Emulator(token="demo-token", org="demo-org")
    emulator.start()
    emulator.write_lines("pulse_oximeter", line_protocol(first, (now - first) / timedelta(hours=1)), precision="s")
    print(f"InfluxDB emulator on {emulator.url}: {HOURS * 3600} seconds of readings from {hml.iso(first)}")
    server = ThrowawayPostgres().start()
    print(f"Throwaway PostgreSQL on 127.0.0.1:{server.port}")
    # The loader's defaults, whatever a .env in the checkout or the shell says: the demo shows what they do.
    env = {
        **os.environ,
        **hml.DEFAULTS,
        "LOADER_ENV_FILE": "",
        "CONNECTION": emulator.url,
        "TOKEN": "demo-token",
        "ORG": "demo-org",
        "PG_CONNECT": server.url,
    }
    try:
        loader(env, "--from", hml.iso(first), "--to", hml.iso(first + timedelta(hours=3)))
        loader(env)
        loader(env, "--verify", "--from", hml.iso(first), "--to", hml.iso(last.stop))
        loader(env, "--status", "--days", "2")
        report(server.url)
        influxql = {**env, "INFLUX_QUERY_LANGUAGE": "influxql", "PG_TABLE": "pox_via_influxql"}
        print("\nThe same hours through InfluxQL (INFLUX_QUERY_LANGUAGE=influxql), into the table pox_via_influxql:", end="")
        loader(influxql, "--from", hml.iso(first), "--to", hml.iso(last.stop))
        print(f"\nThe two tables hold the same rows: {'yes' if same_rows(server.url) else 'NO'}")
    finally:
        server.stop()
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
