"""Fixtures: a real PostgreSQL (TEST_DATABASE_URL, or a throwaway server) and the InfluxDB emulator."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psycopg2
import pytest

from tests.influxdb_emulator import Emulator
from tests.pg_server import ThrowawayPostgres

ROOT = Path(__file__).resolve().parents[1]
# A developer's own .env (in the checkout, beside the script) must not change what the tests
# see: the loader reads no .env file in them, nor in the processes they start, unless a test says so.
os.environ["LOADER_ENV_FILE"] = ""
TOKEN = "influx-test-token-9d2c"
ORG = "test-org"


@pytest.fixture(autouse=True)
def no_stray_prefetch():
    """A failed run leaves its next fetch behind to end on its own; wait for it here, so that
    no test hears what another test's run did."""
    import threading

    import health_metrics_loader as hml

    yield
    for thread in threading.enumerate():
        if thread.name == hml.PREFETCH_THREAD:
            thread.join(timeout=30)


@pytest.fixture(scope="session")
def pg_admin_url():
    """A PostgreSQL URL whose user may create databases."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
        return
    # A wait inside libpq cannot be interrupted by pytest-timeout's signal: the server ends any
    # statement (a lock wait included) before the test's own time limit, so a hang fails its test.
    server = ThrowawayPostgres(statement_timeout="110s").start()
    try:
        yield server.url
    finally:
        server.stop()


def with_database(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def fresh_db(pg_admin_url):
    """The URL of a new, empty database, dropped afterwards."""
    name = "hml_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield with_database(pg_admin_url, name)
    finally:
        admin.cursor().execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


@pytest.fixture
def pg(fresh_db):
    """A psycopg2 connection to the fresh database, in autocommit mode, for checks."""
    connection = psycopg2.connect(fresh_db)
    connection.autocommit = True
    yield connection
    connection.close()


@pytest.fixture(scope="session")
def influx_server():
    emulator = Emulator(token=TOKEN, org=ORG)
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def influx(influx_server):
    """The emulator, emptied of points, faults and logged queries."""
    influx_server.reset()
    yield influx_server
    influx_server.reset()


@pytest.fixture
def loader_env(monkeypatch, tmp_path, influx, fresh_db):
    """Every setting the loader reads, pointing at the emulator and the fresh database."""
    settings = {
        "CONNECTION": influx.url,
        "TOKEN": TOKEN,
        "ORG": ORG,
        "PG_CONNECT": fresh_db,
        "INFLUX_BUCKET": "pulse_oximeter",
        "INFLUX_MEASUREMENT": "spo2",
        "AGGREGATE_EVERY": "5s",
        "PG_TABLE": "pox_five_second_mean",
        "QUERY_TIMEOUT": "10",
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return settings


@pytest.fixture
def tls_influx(tmp_path, monkeypatch):
    """An emulator serving https with a self-signed certificate, as CONNECTION; retries off."""
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    emulator = Emulator(token=TOKEN, org=ORG)
    monkeypatch.setenv("CONNECTION", emulator.start(tls=(str(cert), str(key))))
    monkeypatch.setenv("RETRY_BUDGET", "0")
    yield emulator
    emulator.stop()


def unavailable(reason: str) -> None:
    """Skip a test whose real server or recorded cases are missing, saying why; under CI
    (CI=true), where .ci/run installs everything, that is a failure instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: these tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def influxd_server():
    """A real InfluxDB 1.x server, started for the session."""
    from tests.influxd_server import ThrowawayInfluxd, influxd_missing_reason

    reason = influxd_missing_reason()
    if reason:
        unavailable(reason)
    server = ThrowawayInfluxd().start()
    yield server
    server.stop()


@pytest.fixture
def influxd(influxd_server):
    """The real server with a fresh, empty database `pulse_oximeter`."""
    influxd_server.create_database("pulse_oximeter")
    yield influxd_server
    influxd_server.drop_database("pulse_oximeter")


def pairs(url: str, table: str, sql: str) -> dict:
    """The two columns of `sql` as a dict; empty while `table` does not exist yet."""
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
        if not cursor.fetchone()[0]:
            return {}
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute(sql)
        return dict(cursor.fetchall())


def ledger(url: str) -> dict:
    """hour -> rows recorded for the default table; empty if there is no ledger yet."""
    return pairs(
        url, "loaded_hours", "SELECT hour, rows FROM loaded_hours WHERE target_table = 'public.pox_five_second_mean' ORDER BY hour"
    )


def recorded_tables(url: str) -> dict:
    """The tables the loader has filled or checked, with their averaging window."""
    return pairs(url, "loader_tables", "SELECT target_table, aggregate_every FROM loader_tables")


def run_loader(capsys, argv, now: datetime) -> tuple[int, str, str]:
    """main([...]) on a fixed clock: the exit code, stdout and stderr; never a traceback."""
    import health_metrics_loader as hml

    code = hml.main(list(argv), now=now)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def error_lines(err: str) -> list[str]:
    """The loader's own lines on stderr: errors, and the note of a cron call that steps aside."""
    return [line for line in err.splitlines() if line.startswith("health_metrics_loader: ")]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def seconds(moment: datetime) -> int:
    return int(moment.timestamp())
