"""An archive never shrinks by accident, stalls, hangs or leaks: each case as a user would meet it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import psycopg2
import pytest

import health_metrics_loader as hml
from tests.conftest import ROOT, TOKEN, error_lines, run_loader, utc, with_database
from tests.influxdb_emulator import Fault
from tests.pg_server import PASSWORD
from tests.synthetic import expected_rows, line_protocol
from tests.test_catch_up import ledger
from tests.test_load import make_blog_table
from tests.test_main import assert_rows, stored

DAY0 = utc(2021, 7, 12)
H10, H12, H13 = utc(2021, 7, 12, 10), utc(2021, 7, 12, 12), utc(2021, 7, 12, 13)


def call(capsys, argv=(), now=DAY0 + timedelta(hours=15, minutes=5)):
    return run_loader(capsys, argv, now)


def count_rows(url: str, where: str = "true") -> int:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM pox_five_second_mean WHERE {where}")
        return cursor.fetchone()[0]


def fill_blog_table(url: str, start, hours: int) -> None:
    """A blog-made table (no primary key, naive UTC times) holding `hours` hours of 5-second means."""
    make_blog_table(url)
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("DELETE FROM pox_five_second_mean")
        rows = [(t.replace(tzinfo=None), p, s) for t, p, s in expected_rows(start, hours)]
        cursor.executemany("INSERT INTO pox_five_second_mean (time, pulse, spo2) VALUES (%s, %s, %s)", rows)


# -- 1. A load never removes a row that InfluxDB's answer does not replace -------------------------
def test_backfill_over_hours_influxdb_forgot_keeps_them(loader_env, influx, capsys):
    """The upgrade path of a blog user: --from/--to over hours past InfluxDB's retention."""
    fill_blog_table(loader_env["PG_CONNECT"], H10, 3)
    influx.write_lines("pulse_oximeter", line_protocol(H12, 1), precision="s")  # only hour 12 is still in InfluxDB
    code, _, err = call(capsys, ["--from", "2021-07-12T10", "--to", "2021-07-12T13"])
    assert code == 0, err
    assert count_rows(loader_env["PG_CONNECT"]) == 3 * 720
    for hour in ("2021-07-12T10", "2021-07-12T11"):
        line = f"InfluxDB no longer has 720 of the 720 rows stored for {hour}:00:00Z; kept them (--hour {hour} --replace drops them)"
        assert err.count(line) == 1, err
    assert ledger(loader_env["PG_CONNECT"]) == {H10: 720, H10 + timedelta(hours=1): 720, H12: 720}
    assert_rows(stored(loader_env["PG_CONNECT"]), [(t.replace(tzinfo=None), p, s) for t, p, s in expected_rows(H10, 3)])


def test_replace_makes_the_hours_exactly_influxdb_answer(loader_env, influx, capsys):
    fill_blog_table(loader_env["PG_CONNECT"], H10, 3)
    influx.write_lines("pulse_oximeter", line_protocol(H12 + timedelta(minutes=30), 0.5), precision="s")
    code, _, err = call(capsys, ["--from", "2021-07-12T10", "--to", "2021-07-12T13", "--replace"])
    assert code == 0, err
    assert "kept them" not in err
    assert count_rows(loader_env["PG_CONNECT"]) == 360
    assert ledger(loader_env["PG_CONNECT"]) == {H10: 0, H10 + timedelta(hours=1): 0, H12: 360}


def test_catch_up_at_the_retention_edge_keeps_the_forgotten_half_hour(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    fill_blog_table(loader_env["PG_CONNECT"], H12, 1)
    influx.write_lines("pulse_oximeter", line_protocol(H12 + timedelta(minutes=30), 0.5), precision="s")
    code, _, err = call(capsys, now=H13 + timedelta(minutes=5))
    assert code == 0, err
    assert count_rows(loader_env["PG_CONNECT"]) == 720
    assert "InfluxDB no longer has 360 of the 720 rows stored for 2021-07-12T12:00:00Z; kept them" in err
    assert ledger(loader_env["PG_CONNECT"]) == {H12: 720}


@pytest.mark.parametrize("replace", [False, True])
def test_load_window_follows_the_same_rule(loader_env, influx, replace):
    fill_blog_table(loader_env["PG_CONNECT"], H10, 1)
    settings = hml.settings_from_env(os.environ)
    assert hml.load_window(settings, H10, H10 + timedelta(hours=1), now=H12, replace=replace) == 0
    assert count_rows(loader_env["PG_CONNECT"]) == (0 if replace else 720)


# -- 2. Windows that do not divide the hour ---------------------------------------------------------
@pytest.mark.parametrize("every", ["7s", "7m", "59m", "1m7s"])
def test_a_window_that_does_not_divide_the_hour_is_refused(loader_env, influx, capsys, monkeypatch, every):
    monkeypatch.setenv("AGGREGATE_EVERY", every)
    code, _, err = call(capsys)
    assert code == 2
    assert error_lines(err) == [
        "health_metrics_loader: error: AGGREGATE_EVERY must be a duration from 1s to 1h that divides an hour evenly, "
        "e.g. 5s, 10s, 15s, 1m, 1m30s, 5m or 1h"
    ]
    assert influx.queries == []


@pytest.mark.parametrize("every", ["1s", "5s", "1500ms", "1m30s", "2m", "7m30s", "1h", "60m"])
def test_windows_that_divide_the_hour_are_taken(every):
    settings = hml.settings_from_env(
        {"CONNECTION": "http://x", "TOKEN": "t", "ORG": "o", "PG_CONNECT": "postgresql://u:p@h/d", "AGGREGATE_EVERY": every}
    )
    assert settings.every == every


# -- 3. Field names PostgreSQL would cut ---------------------------------------------------------------
LONG = "oxygen_saturation_measured_at_the_left_index_finger_with_the_new_clip"  # 70 bytes
UNICODE = "Sauerstoffsättigung_gemessen_am_linken_Zeigefinger_mit_dem_Clip"  # 63 characters, 64 bytes


@pytest.mark.parametrize("name", [LONG, UNICODE])
def test_a_long_field_name_loads_on_every_run(loader_env, influx, capsys, monkeypatch, name):
    """Each hourly call also re-reads the hour before, so the cut column must be found again."""
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    column = name.encode()[:63].decode(errors="ignore")
    assert len(column.encode()) <= 63 and column != name
    for hour in range(3):
        start = int((H10 + timedelta(hours=hour)).timestamp())
        influx.write_lines("pulse_oximeter", f"spo2,uid=A {name}=97.5 {start + 1}", precision="s")
    for hour in range(3):
        code, _, err = call(capsys, now=H10 + timedelta(hours=hour + 1, minutes=5))
        assert code == 0, err
        assert len(ledger(loader_env["PG_CONNECT"])) == hour + 1
    with psycopg2.connect(loader_env["PG_CONNECT"]) as connection, connection.cursor() as cursor:
        cursor.execute(f'SELECT time, "{column}" FROM pox_five_second_mean ORDER BY time')
        assert cursor.fetchall() == [(H10 + timedelta(hours=h, seconds=5), 97.5) for h in range(3)]


def test_two_fields_that_would_share_a_column_are_one_clear_error(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    second = int((H12 + timedelta(minutes=1)).timestamp())
    influx.write_lines("pulse_oximeter", f"spo2,uid=A {LONG}=1,{LONG[:63]}_x=2 {second}", precision="s")
    code, _, err = call(capsys, now=H13 + timedelta(minutes=5))
    assert code == 1
    assert error_lines(err) == [
        f"health_metrics_loader: error: 2021-07-12T12:00:00Z was not loaded: field '{LONG}' would be stored in column "
        f"'{LONG[:63]}', which field '{LONG[:63]}_x' already takes: rename the field in InfluxDB (PostgreSQL keeps 63 bytes of a name)"
    ]


def test_a_field_named_time_is_a_data_error(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    influx.write_lines("pulse_oximeter", f"spo2,uid=A time=5 {int(H12.timestamp()) + 60}", precision="s")
    code, _, err = call(capsys, now=H13 + timedelta(minutes=5))
    assert code == 1
    assert error_lines(err) == [
        "health_metrics_loader: error: 2021-07-12T12:00:00Z was not loaded: field 'time' would be stored in column 'time', "
        "which the time column already takes: rename the field in InfluxDB (PostgreSQL keeps 63 bytes of a name)"
    ]


# -- 5-7. Nothing hangs or loops -------------------------------------------------------------------------
@pytest.mark.parametrize(("budget", "tries"), [("0", 1), ("30", 10)])
def test_retry_after_zero_forever_ends(loader_env, influx, capsys, monkeypatch, budget, tries):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    monkeypatch.setenv("RETRY_BUDGET", budget)
    influx.inject(*[Fault("status", status=503, retry_after=0, message="overloaded")] * 50)
    started = time.monotonic()
    code, _, err = call(capsys, now=H13 + timedelta(minutes=5))
    assert code == 1 and time.monotonic() - started < 15
    assert len(influx.queries) == tries
    suffix = "gave up after 1 try (RETRY_BUDGET 0s)" if tries == 1 else "gave up after 10 tries"
    assert error_lines(err) == [f"health_metrics_loader: error: InfluxDB had a server error (503: overloaded); {suffix}"]


def test_a_failed_load_does_not_wait_for_the_next_fetch(loader_env, influx, capsys, monkeypatch, pg):
    """Day 1 fails in PostgreSQL while day 2's fetch waits out a Retry-After of 40 s."""
    monkeypatch.setenv("RETRY_BUDGET", "100")
    pg.cursor().execute("CREATE TABLE pox_five_second_mean (time timestamptz PRIMARY KEY, pulse double precision, spo2 integer)")
    influx.write_lines("pulse_oximeter", line_protocol(DAY0, 1), precision="s")
    influx.inject(Fault("slow", delay=0), Fault("status", status=503, retry_after=40))
    started = time.monotonic()
    code, _, err = call(capsys, ["--from", "2021-07-12T00", "--to", "2021-07-14T00"], now=utc(2021, 7, 15))
    assert code == 1
    assert time.monotonic() - started < 10, err
    assert "PostgreSQL refused the load of 2021-07-12T00:00:00Z..2021-07-13T00:00:00Z" in error_lines(err)[0]


def test_lock_timeout_zero_does_not_wait(loader_env, influx, capsys, monkeypatch, fresh_db):
    monkeypatch.setenv("LOCK_TIMEOUT", "0")
    holder = psycopg2.connect(fresh_db)
    holder.cursor().execute("SELECT pg_advisory_lock(hashtext('health_metrics_loader:public.pox_five_second_mean'))")
    try:
        started = time.monotonic()
        code, _, err = call(capsys, ["--hour", "2021-07-12T10"])
        assert time.monotonic() - started < 5
    finally:
        holder.close()
    assert code == 1
    assert error_lines(err) == [
        "health_metrics_loader: error: another run is loading public.pox_five_second_mean, and LOCK_TIMEOUT is 0; try again later"
    ]


@pytest.mark.parametrize("name", sorted(hml.NUMBER_RULES))
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "NaN"])
def test_non_finite_numbers_are_refused(loader_env, capsys, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    code, _, err = call(capsys)
    assert code == 2
    assert len(error_lines(err)) == 1 and f"{name} must be" in err


def test_a_lock_timeout_beyond_postgresql_is_refused(loader_env, capsys, monkeypatch):
    monkeypatch.setenv("LOCK_TIMEOUT", "2147484")
    code, _, err = call(capsys)
    assert code == 2
    assert error_lines(err) == [
        "health_metrics_loader: error: LOCK_TIMEOUT must be 0 (do not wait) or a number of seconds from 0.001 to 2147483"
    ]


@pytest.mark.parametrize(
    "name, value, line",
    [
        ("LOCK_TIMEOUT", "0.0004", "LOCK_TIMEOUT must be 0 (do not wait) or a number of seconds from 0.001 to 2147483"),
        ("QUERY_TIMEOUT", "0.0009", "QUERY_TIMEOUT must be a number of seconds, at least 0.001"),
    ],
)
def test_a_timeout_below_a_millisecond_is_refused_rather_than_read_as_none(loader_env, capsys, monkeypatch, name, value, line):
    """PostgreSQL would read lock_timeout='0ms' and influxdb-client timeout=0 as "wait forever"."""
    monkeypatch.setenv(name, value)
    code, _, err = call(capsys)
    assert code == 2
    assert error_lines(err) == [f"health_metrics_loader: error: {line}"]


# -- 8-9. Who holds the lock, and one lock per table --------------------------------------------------
def test_sessions_have_keepalives_and_a_name(fresh_db):
    settings = hml.settings_from_env({"CONNECTION": "http://x", "TOKEN": "t", "ORG": "o", "PG_CONNECT": fresh_db})
    connection = hml.connect_postgres(settings)
    try:
        dsn = connection.get_dsn_parameters()
        assert {k: dsn.get(k) for k in ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count")} == {
            "keepalives": "1",
            "keepalives_idle": "30",
            "keepalives_interval": "10",
            "keepalives_count": "3",
        }
        with connection.cursor() as cursor:
            cursor.execute("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            assert cursor.fetchone() == ("health_metrics_loader",)
    finally:
        connection.close()


def test_url_options_win_over_the_session_defaults(fresh_db):
    url = fresh_db + "?application_name=grafana_feed&keepalives_idle=99"
    settings = hml.settings_from_env({"CONNECTION": "http://x", "TOKEN": "t", "ORG": "o", "PG_CONNECT": url})
    connection = hml.connect_postgres(settings)
    try:
        assert connection.get_dsn_parameters()["keepalives_idle"] == "99"
        assert connection.get_dsn_parameters()["application_name"] == "grafana_feed"
    finally:
        connection.close()


def test_a_table_spelt_two_ways_shares_one_lock(loader_env, influx, capsys, monkeypatch, fresh_db):
    monkeypatch.setenv("PG_TABLE", "pox_five_second_mean")
    holder = psycopg2.connect(fresh_db)
    holder.cursor().execute("SELECT pg_advisory_lock(hashtext('health_metrics_loader:public.pox_five_second_mean'))")
    try:
        code, _, err = call(capsys)
    finally:
        holder.close()
    assert code == 0
    assert error_lines(err) == [
        "health_metrics_loader: another run is loading public.pox_five_second_mean; it will catch up, so this one stops here"
    ]
    assert influx.queries == []


def test_a_table_spelt_two_ways_shares_one_ledger(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "2")
    influx.write_lines("pulse_oximeter", line_protocol(H12, 2), precision="s")
    monkeypatch.setenv("PG_TABLE", "pox_five_second_mean")
    assert call(capsys, now=H13 + timedelta(hours=1, minutes=5))[0] == 0
    monkeypatch.setenv("PG_TABLE", "public.pox_five_second_mean")
    influx.queries.clear()
    code, _, err = call(capsys, now=H13 + timedelta(hours=1, minutes=10))
    assert code == 0 and influx.queries == [] and "nothing to load" in err


def test_a_ledger_keyed_the_old_way_is_taken_over(loader_env, influx, capsys, monkeypatch, pg):
    monkeypatch.setenv("CATCH_UP_HOURS", "2")
    influx.write_lines("pulse_oximeter", line_protocol(H12, 2), precision="s")
    assert call(capsys, now=H13 + timedelta(hours=1, minutes=5))[0] == 0
    pg.cursor().execute("UPDATE loaded_hours SET target_table = 'pox_five_second_mean'")  # as older versions wrote it
    influx.queries.clear()
    code, _, err = call(capsys, now=H13 + timedelta(hours=1, minutes=10))
    assert code == 0 and influx.queries == [], err
    with pg.cursor() as cursor:
        cursor.execute("SELECT DISTINCT target_table FROM loaded_hours")
        assert cursor.fetchall() == [("public.pox_five_second_mean",)]


# -- 10. Clear lines instead of tracebacks ------------------------------------------------------------
def test_an_env_file_that_is_not_utf8_is_named(loader_env, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LOADER_ENV_FILE", str(tmp_path / ".env"))
    (tmp_path / ".env").write_bytes(b"TOKEN=caf\xe9\n")
    (tmp_path / ".env").chmod(0o600)
    code, _, err = call(capsys)
    assert code == 2
    assert error_lines(err) == [f"health_metrics_loader: error: {tmp_path / '.env'} is not UTF-8 text: save it as UTF-8"]


def test_an_env_file_the_loader_may_not_read_is_named():
    """A .env the loader's user may not read. Root reads anything, so as root the loader runs
    without the capabilities that override file permissions."""
    folder = Path(tempfile.mkdtemp(prefix="hml-env-"))
    try:
        env_file = folder / ".env"
        env_file.write_text("TOKEN=secret-token-value\n")
        env_file.chmod(0o000)
        command = [sys.executable, str(ROOT / "health_metrics_loader.py")]
        if os.geteuid() == 0:
            drop = "-dac_override,-dac_read_search"
            command = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--", *command]
        environ = {k: v for k, v in os.environ.items() if k not in ("CONNECTION", "TOKEN", "ORG", "PG_CONNECT")}
        environ["LOADER_ENV_FILE"] = str(env_file)
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=environ, timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"health_metrics_loader: error: cannot read {env_file} (Permission denied): check its owner and mode\n"


def test_an_answer_cut_inside_its_annotations_is_retried(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    influx.write_lines("pulse_oximeter", line_protocol(H12, 1), precision="s")
    influx.inject(Fault("canned", body="#datatype,string,long,dateTime:RFC3339,double,double\r\n#group,false,fal"))
    code, _, err = call(capsys, now=H13 + timedelta(minutes=5))
    assert code == 0, err
    assert "InfluxDB's answer ended early (cut off in a table's annotations); retry 1 in " in err
    assert len(influx.queries) == 2 and count_rows(loader_env["PG_CONNECT"]) == 720


# -- 11. --status finds the newest hour wherever it is --------------------------------------------------
def test_status_names_a_newest_hour_older_than_the_days_shown(loader_env, influx, capsys):
    influx.write_lines("pulse_oximeter", line_protocol(H10, 1), precision="s")
    assert call(capsys, ["--hour", "2021-07-12T10"])[0] == 0
    code, out, _ = call(capsys, ["--status", "--days", "1"], now=utc(2021, 7, 22, 16, 5))
    assert code == 1
    assert out.splitlines()[0] == "newest loaded hour: 2021-07-12T10:00:00Z (720 rows), loaded 10 days ago"


# -- 12-13. Secrets ---------------------------------------------------------------------------------------
def test_an_unencoded_at_in_the_password_is_refused_without_printing_it(loader_env, capsys, monkeypatch):
    monkeypatch.setenv("PG_CONNECT", "postgresql://pi:Hunter@2024@localhost/health")
    code, out, err = call(capsys)
    assert code == 2
    assert error_lines(err) == [
        "health_metrics_loader: error: PG_CONNECT has more than one @ before the host: percent-encode an @ in the user or password as %40"
    ]
    assert "Hunter" not in out + err and "2024" not in out + err


@pytest.fixture
def short_password_db(pg_admin_url, fresh_db):
    """A role whose password is `pw`, owning a database whose name holds that password."""
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    name = "pw_" + fresh_db.rsplit("/", 1)[1]
    admin.cursor().execute("CREATE ROLE pi LOGIN PASSWORD 'pw'")
    try:
        yield with_database(pg_admin_url, name).replace(f"postgres:{PASSWORD}@", "pi:pw@")
    finally:
        admin.cursor().execute("DROP ROLE pi")
        admin.close()


def test_a_short_password_is_masked_where_it_stands_and_nowhere_else(loader_env, capsys, monkeypatch, short_password_db):
    monkeypatch.setenv("PG_CONNECT", short_password_db)  # the database does not exist, and its name holds the password
    monkeypatch.setenv("TOKEN", "t")
    code, out, err = call(capsys)
    assert code == 1
    database = short_password_db.rsplit("/", 1)[1]
    port = short_password_db.rsplit(":", 1)[1].split("/")[0]
    assert error_lines(err) == [
        f'health_metrics_loader: error: cannot connect to PostgreSQL (connection to server at "127.0.0.1", port {port} failed: '
        f'FATAL:  database "***{database[2:]}" does not exist): check PG_CONNECT'
    ]


def test_a_short_token_does_not_garble_messages(loader_env, capsys, monkeypatch):
    monkeypatch.setenv("TOKEN", "t")
    monkeypatch.setenv("CONNECTION", "http://127.0.0.1:9")
    monkeypatch.setenv("RETRY_BUDGET", "0")
    code, _, err = call(capsys)
    assert code == 1
    (line,) = error_lines(err)
    assert line.startswith("health_metrics_loader: error: InfluxDB at http://127.0.0.1:9 did not answer (")
    assert line.endswith("): check CONNECTION and the network; gave up after 1 try (RETRY_BUDGET 0s)")
    assert "***" not in line


@pytest.mark.parametrize(
    ("secret", "text", "masked"),
    [
        ("t", "did not answer: token t was refused", "did not answer: token *** was refused"),
        ("pw", 'database "pw_db" does not exist', 'database "***_db" does not exist'),
        ("pw", "password=pw host=x", "password=*** host=x"),
        ("a-long-secret", "xa-long-secretx", "x***x"),
        ("p@ss", "postgresql://u:p%40ss@h", "postgresql://u:***@h"),
    ],
)
def test_redaction(secret, text, masked):
    settings = hml.settings_from_env(
        {"CONNECTION": "http://x", "TOKEN": "token-0123456789", "ORG": "o", "PG_CONNECT": "postgresql://u@h/d"}
    )
    assert hml.Redactor([*settings.secrets(), secret, *([] if "@" not in secret else ["p%40ss"])]).redact(text) == masked


def test_a_password_in_a_url_is_masked_percent_encoded_too():
    url = "postgresql://u:p%40ss%2Fword@h/d"
    settings = hml.settings_from_env({"CONNECTION": "http://x", "TOKEN": "token-0123456789", "ORG": "o", "PG_CONNECT": url})
    redactor = hml.Redactor(settings.secrets())
    assert redactor.redact("u:p%40ss%2Fword@h and p@ss/word") == "u:***@h and ***"
    assert redactor.redact("token-0123456789") == "***"


def test_debug_logging_prints_no_secret(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    influx.write_lines("pulse_oximeter", line_protocol(H12, 1), precision="s")
    influx.inject(Fault("status", status=503, retry_after=0))
    code, out, err = call(capsys, ["-v"], now=H13 + timedelta(minutes=5))
    assert code == 0, err
    assert " DEBUG " in err or " INFO " in err
    assert TOKEN not in out + err and PASSWORD not in out + err


def test_a_lock_holder_that_vanished_is_named_in_pg_stat_activity(loader_env, influx, fresh_db):
    """While a run holds the lock, pg_stat_activity says which program it is."""
    settings = hml.settings_from_env(os.environ)
    connection = hml.connect_postgres(settings)
    try:
        hml.acquire_lock(connection, ("public", "pox_five_second_mean"), wait=None)
        with psycopg2.connect(fresh_db) as watcher, watcher.cursor() as cursor:
            cursor.execute(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND l.granted"
            )
            assert cursor.fetchall() == [("health_metrics_loader",)]
    finally:
        connection.close()
