"""main([...]) end to end: the emulator, the real PostgreSQL, exit codes and messages."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from datetime import timedelta

import psycopg2
import pytest

import health_metrics_loader as hml
from tests.conftest import ROOT, TOKEN, ledger, recorded_tables, utc
from tests.pg_server import PASSWORD
from tests.synthetic import expected_rows, line_protocol

H14 = utc(2021, 7, 12, 14)
NOW = utc(2021, 7, 12, 15, 5)  # a cron call at 15:05 loads hour 14


def stored(url: str, table: str = "pox_five_second_mean", columns: str = "time, pulse, spo2") -> list[tuple]:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute(f"SELECT {columns} FROM {table} ORDER BY time")
        return cursor.fetchall()


def assert_rows(got: list[tuple], want: list[tuple]) -> None:
    assert [r[0] for r in got] == [r[0] for r in want]
    for g, w in zip(got, want):
        assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(g[1:], w[1:])), (g, w)


def run(argv, capsys, now=NOW):
    code = hml.main(argv, now=now)
    out, err = capsys.readouterr()
    return code, out, err


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text
        assert PASSWORD not in text


def test_cron_call_loads_the_previous_hour(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    influx.write_lines("pulse_oximeter", line_protocol(H14 - timedelta(minutes=1), 1 + 2 / 60), precision="s")
    code, out, err = run([], capsys)
    assert code == 0, err
    assert_rows(stored(loader_env["PG_CONNECT"]), expected_rows(H14, 1))
    assert "loaded 2021-07-12T14:00:00Z..2021-07-12T15:00:00Z: 720 rows" in err
    assert len(influx.queries) == 1
    assert_no_secrets(out, err)


def test_hour_replaces_and_is_idempotent(loader_env, influx, capsys):
    influx.write_lines("pulse_oximeter", line_protocol(H14, 2), precision="s")
    for _ in range(2):
        code, _, err = run(["--hour", "2021-07-12T15:00:00Z"], capsys, now=utc(2021, 7, 12, 16, 10))
        assert code == 0, err
    assert_rows(stored(loader_env["PG_CONNECT"]), expected_rows(H14 + timedelta(hours=1), 1))


def test_from_to_fetches_a_day_per_query(loader_env, influx, capsys):
    influx.write_lines("pulse_oximeter", line_protocol(H14, 30), precision="s")
    code, _, err = run(["--from", "2021-07-12T14", "--to", "2021-07-13T20"], capsys, now=utc(2021, 7, 14))
    assert code == 0, err
    assert_rows(stored(loader_env["PG_CONNECT"]), expected_rows(H14, 30))
    assert len(influx.queries) == 2
    assert err.count(" loaded ") == 2


def test_dry_run_reports_and_writes_nothing(loader_env, influx, capsys):
    influx.write_lines("pulse_oximeter", line_protocol(H14 + timedelta(minutes=30), 0.5), precision="s")
    code, out, err = run(["--dry-run", "--from", "2021-07-12T14", "--to", "2021-07-12T16"], capsys, now=utc(2021, 7, 12, 16, 5))
    assert code == 0, err
    assert out.splitlines() == ["2021-07-12T14:00:00Z  360 rows", "2021-07-12T15:00:00Z  0 rows"]
    with psycopg2.connect(loader_env["PG_CONNECT"]) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('pox_five_second_mean')")
        assert cursor.fetchone() == (None,)


def test_empty_hour_is_a_success(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    influx.write_lines("pulse_oximeter", line_protocol(H14 - timedelta(hours=1), 1), precision="s")
    assert run([], capsys, now=NOW - timedelta(hours=1))[0] == 0
    code, _, err = run([], capsys)
    assert code == 0, err
    assert re.fullmatch(r"\S+ INFO loaded 2021-07-12T14:00:00Z\.\.2021-07-12T15:00:00Z: 0 rows in \d+\.\d\ds\n", err), err
    assert len(stored(loader_env["PG_CONNECT"], columns="*")) == 720
    assert ledger(loader_env["PG_CONNECT"]) == {H14 - timedelta(hours=1): 720, H14: 0}


def test_a_first_run_that_finds_nothing_records_nothing_and_says_where_it_looked(loader_env, influx, capsys, monkeypatch):
    """A misspelt INFLUX_MEASUREMENT on the first install must not mark the catch-up as loaded."""
    monkeypatch.setenv("INFLUX_MEASUREMENT", "SpO2")
    influx.write_lines("pulse_oximeter", line_protocol(H14 - timedelta(hours=2), 3), precision="s")
    code, _, err = run([], capsys)
    assert code == 0, err
    warnings = [line.split(" WARNING ", 1)[1] for line in err.splitlines() if " WARNING " in line]
    assert warnings == [
        "InfluxDB has no readings of measurement 'SpO2' in bucket 'pulse_oximeter' for 2021-07-09T15:00:00Z..2021-07-12T15:00:00Z, "
        "and public.pox_five_second_mean holds none yet: check INFLUX_MEASUREMENT and INFLUX_BUCKET; "
        "these hours are not recorded, so the next run asks again"
    ]
    assert ledger(loader_env["PG_CONNECT"]) == {}
    monkeypatch.setenv("INFLUX_MEASUREMENT", "spo2")  # the typo fixed: the whole catch-up span is asked again
    influx.queries.clear()
    code, _, err = run([], capsys)
    assert code == 0, err
    assert len(influx.queries) == 3
    rows = ledger(loader_env["PG_CONNECT"])
    assert len(rows) == 72 and sum(rows.values()) == 3 * 720
    assert {hour: n for hour, n in rows.items() if n} == {H14 - timedelta(hours=h): 720 for h in (0, 1, 2)}


def test_a_new_field_gets_a_column_end_to_end(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "2")
    influx.write_lines("pulse_oximeter", line_protocol(H14 - timedelta(hours=1), 1), precision="s")
    assert run([], capsys, now=NOW - timedelta(hours=1))[0] == 0
    influx.write_lines("pulse_oximeter", line_protocol(H14, 1) + f"spo2,uid=A temp=36.6 {int(H14.timestamp()) + 1}\n", precision="s")
    code, _, err = run([], capsys)
    assert code == 0, err
    assert "INFO new field temp: adding a column to public.pox_five_second_mean\n" in err
    rows = stored(loader_env["PG_CONNECT"], columns="time, temp")
    assert [r for r in rows if r[1] is not None] == [(H14 + timedelta(seconds=5), 36.6)] and len(rows) == 2 * 720


def test_env_file_beside_the_script(loader_env, influx, capsys, tmp_path, monkeypatch):
    """Cron may start the script from another folder: a .env beside the script is read too."""
    home = tmp_path / "app"
    home.mkdir()
    (home / "health_metrics_loader.py").write_text((ROOT / "health_metrics_loader.py").read_text())
    (home / ".env").write_text(f"TOKEN={TOKEN}\nPG_TABLE=from_env_beside_the_script\n")
    (home / ".env").chmod(0o600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The script runs on the real clock: one reading 2 to 5 hours back is in a complete hour at any minute.
    now = int(time.time())
    influx.write_lines("pulse_oximeter", "".join(f"spo2,uid=A spo2=97 {now - h * 3600}\n" for h in (2, 3, 4, 5)), precision="s")
    env = {k: v for k, v in os.environ.items() if k not in ("TOKEN", "PG_TABLE", "LOADER_ENV_FILE")}
    result = subprocess.run(
        [sys.executable, str(home / "health_metrics_loader.py")], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert len(stored(loader_env["PG_CONNECT"], "from_env_beside_the_script", columns="*")) == 4


def test_an_organisation_id_is_taken_like_its_name(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    monkeypatch.setenv("ORG", influx.org_id)
    influx.write_lines("pulse_oximeter", line_protocol(H14, 1), precision="s")
    assert run([], capsys)[0] == 0
    assert_rows(stored(loader_env["PG_CONNECT"]), expected_rows(H14, 1))


def test_blog_table_is_appended_to(loader_env, influx, capsys):
    from tests.test_load import make_blog_table

    make_blog_table(loader_env["PG_CONNECT"])
    influx.write_lines("pulse_oximeter", line_protocol(H14, 1), precision="s")
    code, _, err = run([], capsys)
    assert code == 0, err
    with psycopg2.connect(loader_env["PG_CONNECT"]) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*), min(time)::text, max(time)::text FROM pox_five_second_mean")
        assert cursor.fetchone() == (2 + 720, "2021-07-12 13:00:05", "2021-07-12 15:00:00")


# -- Exit codes and messages ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hour", "2021-07-12T14:30"], "is not an hour like"),
        (["--hour", "2021-07-12T15"], "is not complete yet"),
        (["--from", "2021-07-12T10", "--to", "2021-07-12T09"], "--to must be after --from"),
    ],
)
def test_bad_arguments_exit_2(loader_env, capsys, argv, message):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--from", "2021-07-12T10"], "--from and --to go together"),
        (["--status", "--hour", "2021-07-12T10"], "--status takes no hours, --replace or --dry-run"),
        (["--status", "--days", "0"], "--days must be from 1 to 366"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_argument_errors_are_one_line_and_exit_2(capsys, argv, line):
    assert hml.main(argv) == 2
    assert capsys.readouterr().err == f"health_metrics_loader: error: {line} (see --help)\n"


def test_missing_settings_exit_2_and_are_all_named(monkeypatch, tmp_path, capsys):
    for key in ("CONNECTION", "TOKEN", "ORG", "PG_CONNECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ORG", "home")
    monkeypatch.chdir(tmp_path)
    code, _, err = run([], capsys)
    assert code == 2
    assert "CONNECTION is not set" in err and "TOKEN is not set" in err and "PG_CONNECT is not set" in err
    assert ".env.example" in err


def test_env_file_in_the_working_directory(monkeypatch, tmp_path, loader_env, influx, capsys):
    (tmp_path / ".env").write_text("TOKEN=wrong\nPG_TABLE=from_dotenv\n")
    monkeypatch.delenv("PG_TABLE")
    monkeypatch.delenv("LOADER_ENV_FILE")  # the default lookup, with the script "beside" nothing
    monkeypatch.setattr(hml, "__file__", str(tmp_path / "elsewhere" / "health_metrics_loader.py"))
    code, _, err = run([], capsys)
    assert code == 0, err  # TOKEN from the environment wins over .env
    assert recorded_tables(loader_env["PG_CONNECT"]) == {"public.from_dotenv": "5s"}


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("TOKEN", "not-the-token", "InfluxDB refused the token (401: unauthorized access): check TOKEN in .env"),
        (
            "INFLUX_BUCKET",
            "nope",
            'InfluxDB found no such bucket or organization (404: failed to initialize execute state: could not find bucket "nope")',
        ),
        ("ORG", "other-org", 'InfluxDB rejected the query (400: failed to decode request body: organization name "other-org" not found)'),
        ("CONNECTION", "http://127.0.0.1:9", "InfluxDB at http://127.0.0.1:9 did not answer ("),
        ("PG_CONNECT", None, "cannot connect to PostgreSQL"),
    ],
)
def test_failures_exit_1_with_one_line(loader_env, influx, monkeypatch, capsys, setting, value, message):
    if setting == "PG_CONNECT":
        value = loader_env["PG_CONNECT"].replace(PASSWORD, PASSWORD + "x")
    monkeypatch.setenv(setting, value)
    monkeypatch.setenv("RETRY_BUDGET", "0")
    code, out, err = run([], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert lines[0].startswith("health_metrics_loader: error: ")
    assert_no_secrets(out, err)
    assert (PASSWORD + "x") not in err


def test_help_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(ROOT / "health_metrics_loader.py"), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0
    assert "--from" in result.stdout and "Exit codes" in result.stdout
