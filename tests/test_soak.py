"""A fault soak: random sequences of InfluxDB and PostgreSQL faults, then one clean cron call.

Invariant: after every call, each hour in the ledger holds exactly the rows the ledger
says (no half-loaded hour), no time is stored twice, and once the faults clear, one more
cron call leaves every hour of the catch-up span loaded once with the emulator's exact
values.

Replay: SOAK_SEED picks the run (default below), SOAK_SEQUENCES how many sequences,
SOAK_ONLY one sequence by its index, as printed when it fails.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter
from datetime import timedelta

import psycopg2
import pytest

import health_metrics_loader as hml
from tests.conftest import utc
from tests.influxdb_emulator import Fault
from tests.pg_server import free_port
from tests.synthetic import expected_rows, line_protocol

SEED = int(os.environ.get("SOAK_SEED", "20261127"))
SEQUENCES = int(os.environ.get("SOAK_SEQUENCES", "200"))
SPAN = 6
BASE = utc(2021, 7, 12, 6)
DATA_START, DATA_HOURS = BASE - timedelta(hours=SPAN + 1), SPAN + 24

INFLUX_FAULTS = {
    "429": lambda rng: Fault("status", status=429, retry_after=0, message="quota"),
    "503": lambda rng: Fault("status", status=503, retry_after=0),
    "500": lambda rng: Fault("status", status=500),
    "502": lambda rng: Fault("status", status=502),
    "reset": lambda rng: Fault("reset"),
    "truncate": lambda rng: Fault("truncate", keep_bytes=rng.randint(1, 60000)),
    "error_table": lambda rng: Fault("error_table", message="panic: boom", keep_rows=rng.randint(0, 500)),
    "401": lambda rng: Fault("status", status=401, message="unauthorized access"),
    "timeout": lambda rng: Fault("slow", delay=0.4),
}
PG_FAULTS = ("pg_down", "pg_reject", "pg_locked")
KINDS = [*INFLUX_FAULTS, *PG_FAULTS]


def check_consistent(cursor) -> None:
    """Every ledger hour holds exactly its recorded rows; no time is stored twice."""
    cursor.execute("SELECT count(*), count(DISTINCT time) FROM pox_five_second_mean")
    total, distinct = cursor.fetchone()
    assert total == distinct, "a time is stored twice"
    cursor.execute(
        "SELECT l.hour, l.rows, count(p.time) FROM loaded_hours l LEFT JOIN pox_five_second_mean p"
        " ON p.time > l.hour AND p.time <= l.hour + interval '1 hour' GROUP BY 1, 2 HAVING l.rows <> count(p.time)"
    )
    assert cursor.fetchall() == [], "an hour holds other rows than its ledger says"


def table_exists(cursor, name: str) -> bool:
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
    return cursor.fetchone()[0]


@pytest.fixture
def soak_env(loader_env, influx, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", str(SPAN))
    monkeypatch.setenv("RETRY_BUDGET", "20")
    monkeypatch.setenv("QUERY_TIMEOUT", "0.2")
    monkeypatch.setenv("LOCK_TIMEOUT", "0")
    influx.write_lines("pulse_oximeter", line_protocol(DATA_START, DATA_HOURS), precision="s")
    return hml.settings_from_env(os.environ)


def run_sequence(index: int, settings, influx, admin, stats: Counter) -> None:
    rng = random.Random(f"{SEED}-{index}")
    cursor = admin.cursor()
    cursor.execute("DROP TABLE IF EXISTS pox_five_second_mean, loaded_hours")
    now = BASE + timedelta(minutes=rng.randint(0, 120))
    waits: list[float] = []
    for _ in range(rng.randint(1, 5)):
        now += timedelta(minutes=rng.randint(0, 150))
        kinds = rng.choices(KINDS, k=rng.randint(0, 3))
        stats.update(kinds)
        influx.inject(*(INFLUX_FAULTS[k](rng) for k in kinds if k in INFLUX_FAULTS))
        run_settings = settings
        if "pg_down" in kinds:
            run_settings = dataclasses.replace(settings, pg_url=settings.pg_url.rsplit(":", 1)[0] + f":{free_port()}/x")
        if "pg_reject" in kinds:
            if not table_exists(cursor, "loaded_hours"):
                hml.ensure_ledger(cursor, ("loaded_hours",))
            cursor.execute("ALTER TABLE loaded_hours ADD CONSTRAINT soak_reject CHECK (false) NOT VALID")
        locker = None
        if "pg_locked" in kinds:
            locker = psycopg2.connect(settings.pg_url.replace("+psycopg2", ""))
            locker.cursor().execute("SELECT pg_advisory_lock(hashtext('health_metrics_loader:public.pox_five_second_mean'))")
        try:
            hml.run(run_settings, hml.Plan(), now=now, sleep=waits.append)
            stats["runs ok"] += 1
        except hml.LoaderError:
            stats["runs failed"] += 1
        finally:
            influx.faults.clear()
            if locker:
                locker.close()
            if "pg_reject" in kinds:
                cursor.execute("ALTER TABLE loaded_hours DROP CONSTRAINT soak_reject")
        if table_exists(cursor, "loaded_hours") and table_exists(cursor, "pox_five_second_mean"):
            check_consistent(cursor)
    stats["retry waits"] += len(waits)
    now += timedelta(minutes=rng.randint(0, 60))
    hml.run(settings, hml.Plan(), now=now, sleep=waits.append)  # the faults have cleared
    check_consistent(cursor)
    span = hml.complete_hours(now, settings.settle, SPAN)
    cursor.execute("SELECT hour FROM loaded_hours WHERE hour >= %s ORDER BY hour", (span[0],))
    assert [row[0] for row in cursor.fetchall()] == span
    cursor.execute("SET TIME ZONE 'UTC'")
    cursor.execute("SELECT time, pulse, spo2 FROM pox_five_second_mean WHERE time > %s ORDER BY time", (span[0],))
    got = cursor.fetchall()
    assert got == expected_rows(span[0], SPAN), "stored values differ from the emulator's"
    stats["rows checked"] += len(got)
    stats["sequences"] += 1


@pytest.mark.parametrize(("dialect", "sequences"), [("flux", SEQUENCES), ("influxql", max(1, SEQUENCES // 4))])
def test_fault_soak(soak_env, influx, pg, dialect, sequences):
    stats: Counter = Counter()
    only = os.environ.get("SOAK_ONLY")
    settings = dataclasses.replace(soak_env, query_language=dialect)
    for index in [int(only)] if only else range(sequences):
        try:
            run_sequence(index, settings, influx, pg, stats)
        except AssertionError as exc:
            raise AssertionError(f"soak sequence {index} (SOAK_SEED={SEED} SOAK_ONLY={index}): {exc}") from exc
    faults = {k: stats[k] for k in KINDS}
    print(
        f"\nsoak ({dialect}): {stats['sequences']} sequences, {stats['runs ok'] + stats['runs failed']} faulty runs "
        f"({stats['runs failed']} failed), {sum(faults.values())} faults {faults}, {stats['retry waits']} retries, "
        f"{stats['rows checked']} rows checked, 0 lost"
    )
    assert stats["sequences"] == (1 if only else sequences)
    assert all(faults[k] > 0 for k in KINDS) or only
