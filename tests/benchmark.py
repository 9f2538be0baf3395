"""Speed and memory of the loader, beside the blog's pipeline and the machine's floor.

    .venv/bin/python -m tests.benchmark [--days 30]

Serves synthetic 1 Hz readings (two fields) from the InfluxDB emulator and loads them
into a throwaway PostgreSQL. Every answer the emulator will give is computed before any
timing starts, so its own cost is counted on neither side. Each measured program runs
as its own process: wall time from start to exit, peak RSS from the kernel (wait4).

Measured:
- the loader: a backfill of --days days and of one day through --from/--to, the hourly
  cron call (one missing hour) without and with its re-check of the hours before it,
  and a --verify of the whole backfill;
- the loader with INFLUX_QUERY_LANGUAGE=influxql: the same backfill from the emulator's
  /query and, where influxd is installed, from a real InfluxDB 1.x holding the same points;
- the blog's pipeline on the same data and database: query_data_frame, then
  to_sql(if_exists="append"), hour by hour, with the one change pandas 2 needs; once
  looping over all hours in one process (generous to it: imports paid once), and once
  as cron runs the blog's script, a process per hour (--blog-processes hours of it,
  scaled to the whole span);
- the read side (tests/benchmark_read.py): Grafana's panels over a year of rows, from the
  raw table and from the panel functions, the first run's rollup build, and their upkeep;
- the floor: the bare import of the dependencies, pandas.read_csv of the same
  annotated-CSV bytes (for InfluxQL: json.loads of the same JSON), and COPY ... FROM
  STDIN of the same rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import psycopg2

import health_metrics_loader as hml
from tests.influxdb_emulator import Emulator
from tests.pg_server import ThrowawayPostgres
from tests.synthetic import reading

ROOT = Path(__file__).resolve().parents[1]
TOKEN, ORG = "bench-token", "bench-org"
ANNOTATIONS = ("datatype", "group", "default")
IMPORTS = "import influxdb_client, pandas, sqlalchemy, psycopg2, dotenv"

BLOG_PIPELINE = r"""
import os, sys
from datetime import datetime, timedelta
import pandas as pd
from influxdb_client import InfluxDBClient
from sqlalchemy import create_engine

TOKEN, ORG, URL, PG_CONNECT = (os.environ[k] for k in ("TOKEN", "ORG", "CONNECTION", "PG_CONNECT"))
first, hours = datetime.fromisoformat(sys.argv[1]), int(sys.argv[2])
for i in range(hours):
    last, now = first + timedelta(hours=i), first + timedelta(hours=i + 1)
    last_hour, now = last.strftime("%Y-%m-%dT%H:00:00Z"), now.strftime("%Y-%m-%dT%H:00:00Z")
    client = InfluxDBClient(url=URL, token=TOKEN, org=ORG)
    query_api = client.query_api()
    df_current_sats = query_api.query_data_frame(
        'from(bucket: "pulse_oximeter") '
        "|> range(start: " + last_hour + ", stop: " + now + ") "
        '|> filter(fn: (r) => r._measurement == "spo2") '
        "|> aggregateWindow(every: 5s, fn: mean, createEmpty: false)"
        '|> drop(columns: ["_start","_stop","_measurement","uid"])'
        '|> pivot(rowKey:["_time"], columnKey: ["_field"], valueColumn: "_value")'
    )
    client.__del__()
    try:
        df_current_sats.drop(labels=["table", "result"], axis=1, inplace=True)
        df_current_sats.rename(columns={"_time": "time"}, inplace=True)
        df_current_sats["time"] = pd.to_datetime(df_current_sats["time"])
        # The one change: pandas 2 refuses astype("datetime64[us]") on UTC-aware times.
        df_current_sats["time"] = df_current_sats["time"].dt.tz_localize(None).astype("datetime64[us]")
        df_current_sats.set_index("time", inplace=True)
        engine = create_engine(PG_CONNECT)
        df_current_sats.to_sql("pox_five_second_mean", engine, if_exists="append")
        engine.dispose()
    except KeyError:
        pass
"""


def seed(emulator: Emulator, start: datetime, days: int) -> None:
    first = int(start.timestamp())
    seconds = range(first, first + days * 86400)
    values = [reading(s) for s in seconds]
    times = [s * 10**9 for s in seconds]
    emulator.storage.add_series("pulse_oximeter", "spo2", {"uid": "A"}, "pulse", times, [p for p, _ in values])
    emulator.storage.add_series("pulse_oximeter", "spo2", {"uid": "A"}, "spo2", times, [float(s) for _, s in values])


# Run from a small launcher: a child forked from this process, which holds the emulator's
# data, would report this process's peak RSS as its own (Linux keeps it across exec).
LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
err = process.stderr.read()
_, status, usage = os.wait4(process.pid, 0)
print(json.dumps({"wall": time.perf_counter() - started, "rss": usage.ru_maxrss / 1024, "code": os.waitstatus_to_exitcode(status), "err": err}))
"""


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stderr) of one process."""
    result = json.loads(subprocess.run([sys.executable, "-c", LAUNCHER, *argv], env=env, capture_output=True, text=True, check=True).stdout)
    if result["code"] != 0:
        raise RuntimeError(f"{argv[1:]} failed: {result['err']}")
    return result["wall"], result["rss"], result["err"]


def fresh_database(admin_url: str, name: str) -> str:
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.cursor().execute(f"CREATE DATABASE {name}")
    admin.close()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def row_count(url: str) -> int:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pox_five_second_mean")
        return cursor.fetchone()[0]


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, pandas {pd.__version__}"


def prepare_influxql(emulator: Emulator, settings: hml.Settings, window: hml.Window) -> bytes:
    """Ask the emulator's /query once, as the loader will: its answer is then memoised."""
    import urllib.parse
    import urllib.request

    params = {"db": settings.bucket, "q": hml.influxql_query(settings, window), "epoch": "ns", "chunked": "true"}
    request = urllib.request.Request(f"{emulator.url}/query?{urllib.parse.urlencode(params)}", headers={"Authorization": f"Token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return answer.read()


def start_influxd(start: datetime, days: int):
    """A real InfluxDB 1.x holding the same points, or None where influxd is not installed."""
    from tests.influxd_server import ThrowawayInfluxd, influxd_missing_reason

    if influxd_missing_reason():
        print(f"influxd: {influxd_missing_reason()}; its row is left out", flush=True)
        return None
    server = ThrowawayInfluxd().start()
    server.create_database("pulse_oximeter")
    first = int(start.timestamp())
    for day in range(days + 1):
        seconds = range(first + day * 86400, first + (day + 1) * 86400)
        lines = "\n".join(f"spo2,uid=A pulse={p}i,spo2={s} {t}" for t in seconds for p, s in [reading(t)])
        server.write("pulse_oximeter", lines, precision="s")
    print(f"influxd {server.url} holds the same {days + 1} days", flush=True)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each loader measurement (the median is shown)")
    parser.add_argument("--skip-blog", action="store_true", help="leave out the blog's pipeline (slow)")
    parser.add_argument("--blog-processes", type=int, default=24, metavar="N", help="hours to time as one blog process each (default 24)")
    parser.add_argument("--read-years", type=int, default=1, metavar="N", help="years of rows for the read side (0 leaves it out)")
    parser.add_argument("--read-days", type=int, metavar="N", help="days of rows for the read side instead of years")
    args = parser.parse_args(argv)

    now = datetime.now(timezone.utc)
    end = hml.latest_complete_hour(now, timedelta(minutes=2))  # the last hour is the cron call's
    start = end - timedelta(days=args.days)
    print(f"machine: {machine()}")
    print(f"data: {args.days} days of 1 Hz readings, 2 fields, {hml.iso(start)}..{hml.iso(end + timedelta(hours=1))}", flush=True)

    emulator = Emulator(token=TOKEN, org=ORG, now=lambda: time.time_ns())
    emulator.start()
    seed(emulator, start, args.days + 1)
    settings = hml.settings_from_env({"CONNECTION": emulator.url, "TOKEN": TOKEN, "ORG": ORG, "PG_CONNECT": "postgresql://x@y/z"})
    server_time = 0.0
    day_windows = hml.chunked(hml.Window(start, end + timedelta(hours=1)).hours())
    bodies = [emulator.answer(hml.flux_query(settings, w), ANNOTATIONS) for w in day_windows]
    for hour in hml.Window(start, end).hours():  # the blog's text differs only in spacing: same answer
        emulator.answer(hml.flux_query(settings, hml.Window(hour, hour + timedelta(hours=1))), ANNOTATIONS)
    print(f"emulator answers prepared: {len(emulator.cache)}", flush=True)

    server = ThrowawayPostgres().start()
    env = {**os.environ, "CONNECTION": emulator.url, "TOKEN": TOKEN, "ORG": ORG, "PYTHONPATH": str(ROOT)}
    loader = [sys.executable, str(ROOT / "health_metrics_loader.py")]
    results: dict[str, tuple[float, float, int, int]] = {}
    try:

        def loader_run(name: str, first: datetime, stop: datetime, extra: dict | None = None, queries=lambda: len(emulator.queries)) -> str:
            runs = []
            for i in range(args.repeat):
                url = fresh_database(server.url, f"bench_{len(results)}_{i}")
                emulator.queries.clear()
                before = queries()
                wall, rss, _ = measure(
                    [*loader, "--from", hml.iso(first), "--to", hml.iso(stop)], {**env, "PG_CONNECT": url, **(extra or {})}
                )
                runs.append((wall, rss, row_count(url), queries() - before))
            results[name] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs), runs[0][2], runs[0][3])
            return url

        backfilled = loader_run(f"loader, {args.days}-day backfill", start, end)
        loader_run("loader, 1-day backfill", start, start + timedelta(days=1))

        for name, recheck in (("loader, hourly cron call", "0"), ("  the same, re-checking 6 hours", "6")):
            runs = []
            for i in range(args.repeat):
                url = fresh_database(server.url, f"bench_h{i}")
                subprocess.run(
                    [*loader, "-q", "--from", hml.iso(end - timedelta(hours=71)), "--to", hml.iso(end)],
                    env={**env, "PG_CONNECT": url},
                    check=True,
                )
                before = row_count(url)
                emulator.queries.clear()
                wall, rss, err = measure(loader, {**env, "PG_CONNECT": url, "RECHECK_HOURS": recheck})
                runs.append((wall, rss, row_count(url) - before, len(emulator.queries)))
            results[name] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs), runs[0][2], runs[0][3])

        runs = []
        for _ in range(args.repeat):
            emulator.queries.clear()
            wall, rss, _ = measure([*loader, "--verify", "--from", hml.iso(start), "--to", hml.iso(end)], {**env, "PG_CONNECT": backfilled})
            runs.append((wall, rss, row_count(backfilled), len(emulator.queries)))
        results[f"loader, {args.days}-day --verify"] = (
            statistics.median(r[0] for r in runs),
            max(r[1] for r in runs),
            runs[0][2],
            runs[0][3],
        )

        influxql = {"INFLUX_QUERY_LANGUAGE": "influxql"}
        ql_settings = dataclasses.replace(settings, query_language="influxql")
        json_bodies = [prepare_influxql(emulator, ql_settings, w) for w in day_windows]
        loader_run(f"influxql, {args.days} days, emulator", start, end, influxql)
        real = start_influxd(start, args.days)
        if real:
            try:
                loader_run(
                    f"influxql, {args.days} days, influxd 1.x",
                    start,
                    end,
                    {**influxql, "CONNECTION": real.url},
                    queries=real.queries_answered,
                )
                source = hml.InfluxQLSource(dataclasses.replace(ql_settings, influx_url=real.url))
                started = time.perf_counter()
                for window in day_windows[: args.days]:
                    source.fetch(source.query(window))
                server_time = time.perf_counter() - started
            finally:
                real.stop()

        if not args.skip_blog:
            url = fresh_database(server.url, "bench_blog")
            emulator.queries.clear()
            wall, rss, _ = measure(
                [sys.executable, "-c", BLOG_PIPELINE, start.isoformat(), str(args.days * 24)],
                {**env, "PG_CONNECT": url.replace("postgresql://", "postgresql+psycopg2://")},
            )
            results[f"blog pipeline, {args.days} days"] = (wall, rss, row_count(url), len(emulator.queries))
            url = fresh_database(server.url, "bench_blog_cron")
            emulator.queries.clear()
            blog_env = {**env, "PG_CONNECT": url.replace("postgresql://", "postgresql+psycopg2://")}
            runs = [
                measure([sys.executable, "-c", BLOG_PIPELINE, hour.isoformat(), "1"], blog_env)
                for hour in hml.Window(start, end).hours()[: args.blog_processes]
            ]
            scale = args.days * 24 / len(runs)
            results[f"blog as cron runs it, {args.days} days*"] = (
                sum(r[0] for r in runs) * scale,
                max(r[1] for r in runs),
                int(row_count(url) * scale),
                int(len(emulator.queries) * scale),
            )

        # -- The floor ------------------------------------------------------------------
        imports = statistics.median(measure([sys.executable, "-c", IMPORTS], env)[0] for _ in range(5))
        started = time.perf_counter()
        frames = [pd.read_csv(io.BytesIO(body[: body.rindex(b"\r\n\r\n")]), comment="#") for body in bodies[: args.days]]
        read_csv = time.perf_counter() - started
        started = time.perf_counter()
        for body in json_bodies[: args.days]:
            [json.loads(line) for line in body.splitlines()]
        read_json = time.perf_counter() - started
        rows = pd.concat(frames)[["_time", "pulse", "spo2"]].to_csv(header=False, index=False).encode()
        url = fresh_database(server.url, "bench_copy")
        with psycopg2.connect(url) as connection, connection.cursor() as cursor:
            cursor.execute("CREATE TABLE t (time timestamptz PRIMARY KEY, pulse double precision, spo2 double precision)")
            connection.commit()
            started = time.perf_counter()
            cursor.copy_expert("COPY t FROM STDIN WITH (FORMAT csv)", io.BytesIO(rows))
            connection.commit()
            copy = time.perf_counter() - started
    finally:
        server.stop()
        emulator.stop()

    print(f"\n{'':34}{'wall':>9}{'rows/s':>11}{'peak RSS':>11}{'rows':>9}{'queries':>9}")
    for name, (wall, rss, rows_written, queries) in results.items():
        print(f"{name:34}{wall:8.2f}s{rows_written / wall:11,.0f}{rss:8.0f} MiB{rows_written:9,}{queries:9}")
    floor = imports + read_csv + copy
    print(
        f"\nfloor: import the dependencies {imports:.2f}s, read_csv {read_csv:.2f}s, COPY {copy:.2f}s; {args.days}-day floor {floor:.2f}s"
    )
    backfill = results[f"loader, {args.days}-day backfill"][0]
    print(f"loader {args.days}-day backfill / floor: {backfill / floor:.2f}x (target <= 2)")
    if not args.skip_blog:
        in_one_process = results[f"blog pipeline, {args.days} days"][0]
        as_cron = results[f"blog as cron runs it, {args.days} days*"][0]
        print(f"* a process per hour: {args.blog_processes} hours timed, scaled to {args.days} days")
        print(f"loader vs the blog's pipeline in one process: {in_one_process / backfill:.1f}x faster (target >= 20)")
        print(f"loader vs the blog's script as cron runs it: {as_cron / backfill:.0f}x faster")
    print(f"hourly cron call / bare imports: {results['loader, hourly cron call'][0] / imports:.2f}x (target <= 1.5)")
    hourly = results["loader, hourly cron call"][0]
    print(
        f"hourly call re-checking 6 hours / plain hourly call: {results['  the same, re-checking 6 hours'][0] / hourly:.2f}x (target <= 1.2)"
    )
    print(
        f"{args.days}-day --verify / {args.days}-day backfill: {results[f'loader, {args.days}-day --verify'][0] / backfill:.2f}x (target <= 1.5)"
    )
    ql_floor = imports + read_json + copy
    print(f"InfluxQL floor: imports {imports:.2f}s, json.loads {read_json:.2f}s, COPY {copy:.2f}s; {args.days}-day floor {ql_floor:.2f}s")
    emulated = f"influxql, {args.days} days, emulator"
    print(f"{emulated} / InfluxQL floor: {results[emulated][0] / ql_floor:.2f}x (target <= 2)")
    real_row = f"influxql, {args.days} days, influxd 1.x"
    if real_row in results:
        print(f"influxd's own time for the {args.days} day queries, asked one after another: {server_time:.2f}s")
        print(f"{real_row} / (InfluxQL floor + influxd's own time): {results[real_row][0] / (ql_floor + server_time):.2f}x")
    if args.read_years or args.read_days:
        from tests import benchmark_read

        print("\nThe read side: Grafana's panels over the archive", flush=True)
        benchmark_read.main(["--years", str(args.read_years), *(["--days", str(args.read_days)] if args.read_days else [])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
