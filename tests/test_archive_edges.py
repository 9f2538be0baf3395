"""The archive at its edges: InfluxDB's retention cut, a changed averaging window, the blog's
duplicated hours, locked tables, racing first runs, and settings that would hang or leak."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import psycopg2
import pytest

import health_metrics_loader as hml
from tests.conftest import TOKEN, error_lines, recorded_tables, run_loader, utc
from tests.influxdb_emulator import Fault
from tests.synthetic import expected_rows, line_protocol
from tests.test_catch_up import ledger, start_loader

H10 = utc(2021, 7, 12, 10)
CUT = H10 + timedelta(minutes=30, seconds=2)  # inside the window 10:30:00..10:30:05, stamped 10:30:05
STRADDLING = H10 + timedelta(minutes=30, seconds=5)


def call(capsys, argv=(), now=H10 + timedelta(hours=1, minutes=5)):
    return run_loader(capsys, argv, now)


def rows(url: str, where: str = "true", table: str = "pox_five_second_mean") -> list[tuple]:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute(f"SELECT time, pulse, spo2 FROM {table} WHERE {where} ORDER BY time, pulse, spo2")
        return cursor.fetchall()


# -- 1. The retention edge -----------------------------------------------------------------------
@pytest.fixture(params=["flux", "influxql"])
def cut_hour(request, loader_env, influx, capsys, monkeypatch):
    """Hour 10 loaded whole; then InfluxDB forgets, point by point, everything before 10:30:02."""
    monkeypatch.setenv("INFLUX_QUERY_LANGUAGE", request.param)
    influx.write_lines("pulse_oximeter", line_protocol(H10, 1), precision="s")
    assert call(capsys, ["--hour", "2021-07-12T10"])[0] == 0
    influx.storage.forget_before("pulse_oximeter", int(CUT.timestamp()) * 10**9)
    influx.queries.clear()
    return loader_env


AT_THE_CUT = CUT + timedelta(hours=720)  # the moment InfluxDB's 720 hours end at 10:30:02


def test_the_window_that_straddles_the_retention_cut_keeps_its_stored_mean(cut_hour, capsys):
    whole = rows(cut_hour["PG_CONNECT"])
    assert whole == expected_rows(H10, 1) and whole[360][0] == STRADDLING
    code, out, err = call(capsys, ["--verify", "--hour", "2021-07-12T10"], now=AT_THE_CUT)
    assert code == 0, err
    assert out.splitlines() == [
        "2021-07-12T10:00:00Z  missing 0, changed 0, kept 361",
        "1 hour checked: 1 equal, 0 with missing or changed rows (0 missing, 0 changed), 1 with rows InfluxDB no longer has (361 kept)",
    ]
    for argv in (["--repair", "--hour", "2021-07-12T10"], ["--hour", "2021-07-12T10"]):
        code, out, err = call(capsys, argv, now=AT_THE_CUT)
        assert code == 0, err
        assert rows(cut_hour["PG_CONNECT"]) == whole  # the full 5-reading mean at 10:30:05 stays
    assert out == "" and "1 hour already up to date" in err
    assert ledger(cut_hour["PG_CONNECT"]) == {H10: 720}


def test_without_a_retention_the_straddling_window_counts_as_changed(cut_hour, capsys, monkeypatch):
    """The same answer with INFLUX_RETENTION_HOURS=0 (InfluxDB keeps everything): then the
    difference is real, and --verify says so. This is what the guard above protects from."""
    monkeypatch.setenv("INFLUX_RETENTION_HOURS", "0")
    code, out, _ = call(capsys, ["--verify", "--hour", "2021-07-12T10"], now=AT_THE_CUT)
    assert code == 1
    assert out.splitlines()[0] == "2021-07-12T10:00:00Z  missing 0, changed 1, kept 360"


def test_the_daily_repair_across_the_edge_rewrites_no_stored_row(cut_hour, influx, capsys, monkeypatch):
    """The 03:47 call: CATCH_UP_HOURS=720 --repair, when the cut passes through hour 10."""
    monkeypatch.setenv("CATCH_UP_HOURS", "720")
    whole = rows(cut_hour["PG_CONNECT"])
    code, out, err = call(capsys, ["--repair"], now=AT_THE_CUT)
    assert code == 0, err
    assert out.splitlines()[0] == "2021-07-12T10:00:00Z  missing 0, changed 0, kept 361"
    assert rows(cut_hour["PG_CONNECT"]) == whole


# -- 2. One averaging window per table ------------------------------------------------------------
def test_another_aggregate_every_on_a_filled_table_is_refused_before_any_query(loader_env, influx, capsys, monkeypatch):
    influx.write_lines("pulse_oximeter", line_protocol(H10, 2), precision="s")
    assert call(capsys, ["--hour", "2021-07-12T10"])[0] == 0
    influx.queries.clear()
    monkeypatch.setenv("AGGREGATE_EVERY", "1m")
    code, _, err = call(capsys, now=H10 + timedelta(hours=2, minutes=5))
    assert code == 2
    assert error_lines(err) == [
        "health_metrics_loader: error: AGGREGATE_EVERY is 1m, but public.pox_five_second_mean holds 5s means: "
        "set AGGREGATE_EVERY=5s again, or set PG_TABLE to another table for 1m means"
    ]
    assert influx.queries == []
    assert ledger(loader_env["PG_CONNECT"]) == {H10: 720} and len(rows(loader_env["PG_CONNECT"])) == 720
    monkeypatch.setenv("AGGREGATE_EVERY", "5000ms")  # the same window, spelt otherwise
    assert call(capsys, ["--hour", "2021-07-12T11"], now=H10 + timedelta(hours=2, minutes=5))[0] == 0


def test_a_table_without_a_record_gets_one_and_a_certain_mismatch_is_refused(loader_env, influx, capsys, monkeypatch, pg):
    """The blog's table has no record: 5-second stamps prove it is not a 1-minute table."""
    from tests.test_load import make_blog_table

    make_blog_table(loader_env["PG_CONNECT"])  # rows at 13:00:05 and 14:00:00
    monkeypatch.setenv("AGGREGATE_EVERY", "1m")
    code, _, err = call(capsys, now=utc(2021, 7, 12, 16, 5))
    assert code == 2
    assert error_lines(err) == [
        "health_metrics_loader: error: AGGREGATE_EVERY is 1m, but the rows of public.pox_five_second_mean are stamped for 5s means: "
        "set AGGREGATE_EVERY to what made them, or set PG_TABLE to another table for 1m means"
    ]
    assert influx.queries == [] and recorded_tables(loader_env["PG_CONNECT"]) == {}
    monkeypatch.setenv("AGGREGATE_EVERY", "5s")
    assert call(capsys, now=utc(2021, 7, 12, 16, 5))[0] == 0
    assert recorded_tables(loader_env["PG_CONNECT"]) == {"public.pox_five_second_mean": "5s"}


def test_an_empty_table_may_change_its_window(loader_env, influx, capsys, monkeypatch):
    influx.write_lines("pulse_oximeter", line_protocol(H10, 1), precision="s")
    assert call(capsys, ["--hour", "2021-07-12T09"])[0] == 0  # nothing there: no rows stored
    monkeypatch.setenv("AGGREGATE_EVERY", "1m")
    assert call(capsys, ["--hour", "2021-07-12T10"])[0] == 0
    assert recorded_tables(loader_env["PG_CONNECT"]) == {"public.pox_five_second_mean": "1m"}
    assert len(rows(loader_env["PG_CONNECT"])) == 60


@pytest.mark.parametrize(
    "stamps_us, every_ns, found",
    [
        ([5_000_000, 10_000_000, 20_000_000], 5 * 10**9, None),  # on the grid: no proof of another window
        ([60_000_000, 120_000_000], 5 * 10**9, None),  # wider spacing proves nothing
        ([5_000_000, 10_000_000, 15_000_000], 60 * 10**9, 5 * 10**9),
        ([5_000_000, 7_000_000], 60 * 10**9, 10**9),
        ([5_000_001], 5 * 10**9, 0),  # off every grid, and too few to tell: "another"
    ],
)
def test_stamped_every(stamps_us, every_ns, found):
    assert hml.stamped_every_ns(stamps_us, every_ns) == found


# -- 3. The blog's duplicated hours ------------------------------------------------------------------
def make_doubled_blog_table(url: str) -> None:
    """The blog's table (no key) after its script ran twice for hour 10, plus one time of hour 11
    that holds two different values."""
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE pox_five_second_mean (time timestamp, pulse double precision, spo2 double precision)")
        hour10 = [(t.replace(tzinfo=None), p, s) for t, p, s in expected_rows(H10, 1)]
        hour11 = [(t.replace(tzinfo=None), p, s) for t, p, s in expected_rows(H10 + timedelta(hours=1), 1)]
        cursor.executemany("INSERT INTO pox_five_second_mean VALUES (%s, %s, %s)", hour10 + hour10 + hour11)
        cursor.execute("INSERT INTO pox_five_second_mean VALUES ('2021-07-12 11:20:00', 1, 2)")


def test_the_first_run_drops_identical_copies_and_names_conflicting_ones(loader_env, influx, capsys, pg):
    make_doubled_blog_table(loader_env["PG_CONNECT"])
    influx.write_lines("pulse_oximeter", line_protocol(H10 + timedelta(hours=2), 1), precision="s")  # InfluxDB forgot 10 and 11
    code, out, err = call(capsys, ["--repair", "--from", "2021-07-12T10", "--to", "2021-07-12T13"], now=utc(2021, 7, 12, 13, 5))
    assert code == 0, err
    assert "INFO dropped 720 rows of public.pox_five_second_mean that repeated another row exactly" in err
    assert (
        "WARNING 2021-07-12T11:00:00Z: public.pox_five_second_mean stores different values for the same time "
        "(2021-07-12T11:20:00Z); left as they are: delete the wrong rows by hand"
    ) in err
    assert len(rows(loader_env["PG_CONNECT"], "time <= '2021-07-12 11:00'")) == 720
    assert len(rows(loader_env["PG_CONNECT"], "time > '2021-07-12 11:00' AND time <= '2021-07-12 12:00'")) == 721
    assert ledger(loader_env["PG_CONNECT"]) == {H10: 720, H10 + timedelta(hours=1): 721, H10 + timedelta(hours=2): 720}
    assert out.splitlines()[-1].endswith("; reloaded 1 hour")  # hour 12, which was missing
    code, out, _ = call(capsys, ["--verify", "--from", "2021-07-12T10", "--to", "2021-07-12T13"], now=utc(2021, 7, 12, 13, 5))
    assert code == 1  # two values for one time: the archive contradicts itself until someone decides
    assert out.splitlines() == [
        "2021-07-12T10:00:00Z  missing 0, changed 0, kept 720",
        "2021-07-12T11:00:00Z  missing 0, changed 0, kept 721, conflicting 1",
        "3 hours checked: 2 equal, 1 with missing or changed rows (0 missing, 0 changed), 2 with rows InfluxDB no longer has (1441 kept)"
        ", 0 stored twice, 1 conflicting",
    ]
    code, out, _ = call(capsys, ["--repair", "--from", "2021-07-12T10", "--to", "2021-07-12T13"], now=utc(2021, 7, 12, 13, 5))
    assert code == 0 and out.splitlines()[-1].endswith("; reloaded 0 hours")  # nothing it could change is reported as done
    assert len(rows(loader_env["PG_CONNECT"])) == 720 + 721 + 720


def test_a_first_run_without_conflicts_indexes_time_uniquely(loader_env, influx, capsys, pg):
    with pg.cursor() as cursor:
        cursor.execute("CREATE TABLE pox_five_second_mean (time timestamptz, pulse double precision, spo2 double precision)")
        cursor.execute("INSERT INTO pox_five_second_mean VALUES ('2021-07-12 10:00:05+00', 70, 97), ('2021-07-12 10:00:05+00', 70, 97)")
    assert call(capsys, ["--hour", "2021-07-12T11"], now=utc(2021, 7, 12, 13, 5))[0] == 0
    assert rows(loader_env["PG_CONNECT"]) == [(H10 + timedelta(seconds=5), 70.0, 97.0)]
    with pg.cursor() as cursor, pytest.raises(psycopg2.errors.UniqueViolation):
        cursor.execute("INSERT INTO pox_five_second_mean VALUES ('2021-07-12 10:00:05+00', 70, 97)")


def test_copies_made_later_are_dropped_by_the_next_load_of_their_hour(loader_env, influx, capsys, pg):
    """A time stored twice is reported, and a load leaves one row (no unique index here: a
    conflict once kept the first run from adding it)."""
    make_doubled_blog_table(loader_env["PG_CONNECT"])
    influx.write_lines("pulse_oximeter", line_protocol(H10, 2), precision="s")
    assert call(capsys, ["--hour", "2021-07-12T10"], now=utc(2021, 7, 12, 13, 5))[0] == 0
    with pg.cursor() as cursor:
        cursor.execute("INSERT INTO pox_five_second_mean SELECT * FROM pox_five_second_mean WHERE time = '2021-07-12 10:00:05'")
    code, out, _ = call(capsys, ["--verify", "--hour", "2021-07-12T10"], now=utc(2021, 7, 12, 13, 5))
    assert out.splitlines()[0] == "2021-07-12T10:00:00Z  missing 0, changed 0, kept 0, stored twice 1"
    code, out, err = call(capsys, ["--repair", "--hour", "2021-07-12T10"], now=utc(2021, 7, 12, 13, 5))
    assert code == 0, err
    assert out.splitlines()[0] == "2021-07-12T10:00:00Z  missing 0, changed 0, kept 0, stored twice 1 (reloaded)"
    assert rows(loader_env["PG_CONNECT"], "time <= '2021-07-12 11:00'") == [
        (t.replace(tzinfo=None), p, s) for t, p, s in expected_rows(H10, 1)
    ]


# -- 4. A locked table fails the run instead of hanging it ----------------------------------------
def test_a_table_locked_by_another_session_fails_the_run_and_names_the_lock(loader_env, influx, capsys, monkeypatch):
    influx.write_lines("pulse_oximeter", line_protocol(H10, 2), precision="s")
    assert call(capsys, ["--hour", "2021-07-12T10"])[0] == 0
    monkeypatch.setenv("LOCK_TIMEOUT", "1")
    holder = psycopg2.connect(loader_env["PG_CONNECT"], application_name="migration")
    holder.cursor().execute("LOCK TABLE pox_five_second_mean IN ACCESS EXCLUSIVE MODE")
    try:
        started = time.monotonic()
        code, _, err = call(capsys, now=H10 + timedelta(hours=2, minutes=5))
        assert time.monotonic() - started < 10
        pid = holder.get_backend_pid()
    finally:
        holder.close()
    assert code == 1
    assert error_lines(err) == [
        f"health_metrics_loader: error: another session kept public.pox_five_second_mean locked past LOCK_TIMEOUT "
        f"(session {pid}, migration, holds AccessExclusiveLock); nothing was written, and the next run tries again"
    ]
    assert call(capsys, now=H10 + timedelta(hours=2, minutes=5))[0] == 0  # the next cron call catches up
    assert {hour: n for hour, n in ledger(loader_env["PG_CONNECT"]).items() if n} == {H10: 720, H10 + timedelta(hours=1): 720}


def test_sessions_carry_a_lock_and_a_statement_timeout_unless_the_url_sets_them(fresh_db):
    base = {"CONNECTION": "http://x", "TOKEN": "t", "ORG": "o", "LOCK_TIMEOUT": "2.5"}
    no_default = fresh_db + "?options=-c%20statement_timeout%3D0"  # as a server with PostgreSQL's own default
    for url, want in [(no_default, ("2500ms", "1h")), (fresh_db + "?options=-c%20statement_timeout%3D7s", ("2500ms", "7s"))]:
        connection = hml.connect_postgres(hml.settings_from_env({**base, "PG_CONNECT": url}))
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('lock_timeout'), current_setting('statement_timeout')")
            assert cursor.fetchone() == want
        connection.close()


# -- 6-8. Secrets and settings --------------------------------------------------------------------------
def test_a_password_in_connection_is_never_printed(loader_env, capsys, monkeypatch):
    from tests.pg_server import free_port

    monkeypatch.setenv("CONNECTION", f"http://reader:pw-in-url-5150@127.0.0.1:{free_port()}")
    monkeypatch.setenv("RETRY_BUDGET", "1")
    code, out, err = call(capsys, ["-v"])
    assert code == 1
    assert "pw-in-url-5150" not in out + err
    assert error_lines(err)[0].startswith("health_metrics_loader: error: InfluxDB at http://127.0.0.1:")
    assert "retry 1 in" in err  # the retry warnings were printed, masked


def test_a_scheduler_s_own_log_handler_sees_secrets_masked(loader_env, monkeypatch):
    """Airflow calls load_window and collects the loader's log with its own handlers."""
    from tests.pg_server import free_port

    monkeypatch.setenv("CONNECTION", f"http://reader:pw-in-url-5150@127.0.0.1:{free_port()}")
    monkeypatch.setenv("RETRY_BUDGET", "1")
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect()
    logging.getLogger("health_metrics_loader").addHandler(handler)
    try:
        settings = hml.settings_from_env(dict(__import__("os").environ))
        with pytest.raises(hml.SourceError) as failure:
            hml.load_window(settings, H10, H10 + timedelta(hours=1), now=H10 + timedelta(hours=2))
    finally:
        logging.getLogger("health_metrics_loader").removeHandler(handler)
    assert records and all("pw-in-url-5150" not in r for r in records)
    assert "pw-in-url-5150" not in str(failure.value) and "did not answer" in str(failure.value)


@pytest.mark.parametrize(
    "name, value, line",
    [
        (
            "TOKEN",
            "\u201c" + TOKEN + "\u201d",
            "TOKEN has a character that HTTP cannot send (a typographic quote or dash pasted with it?): copy the token again",
        ),
        ("CONNECTION", "http://127.0.0.1:8o86", "CONNECTION has a port that is not a number from 1 to 65535"),
        ("CONNECTION", "http://127.0.0.1:80866", "CONNECTION has a port that is not a number from 1 to 65535"),
        ("CONNECTION", "https://127.0.0.1:99999/", "CONNECTION has a port that is not a number from 1 to 65535"),
        ("INFLUX_RETENTION_HOURS", "-1", "INFLUX_RETENTION_HOURS must be a whole number of hours (0: InfluxDB keeps everything)"),
    ],
)
def test_settings_that_no_retry_can_fix_are_refused_at_once(loader_env, influx, capsys, monkeypatch, name, value, line):
    monkeypatch.setenv(name, value)
    started = time.monotonic()
    code, out, err = call(capsys)
    assert time.monotonic() - started < 5
    assert (code, error_lines(err)) == (2, [f"health_metrics_loader: error: {line}"])
    assert TOKEN not in out + err and influx.queries == []


def test_a_non_latin1_password_for_influxdb_1x_is_fine(loader_env, influx, capsys, monkeypatch):
    """user:password goes base64-encoded (Basic auth), so any character may stand in it."""
    monkeypatch.setenv("INFLUX_QUERY_LANGUAGE", "influxql")
    monkeypatch.setenv("TOKEN", "reader:p\u00e4ss\u2019word")
    assert hml.settings_from_env(dict(__import__("os").environ)).token == "reader:p\u00e4ss\u2019word"


# -- 9. Loaders starting together on a new database ---------------------------------------------------
def test_loaders_starting_together_on_a_new_database_take_turns_at_the_ddl(loader_env, influx, pg):
    """Six loaders of six tables (one per measurement) start while the DDL lock is held, so
    that they all meet at it; once it is released they all create their ledger entries."""
    holder = psycopg2.connect(loader_env["PG_CONNECT"])
    holder.autocommit = False
    holder.cursor().execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (hml.DDL_LOCK,))
    env = dict(__import__("os").environ)
    processes = []
    try:
        for n in range(6):
            __import__("os").environ["PG_TABLE"] = f"pox_{n}"
            processes.append(start_loader(H10 + timedelta(hours=1, minutes=5), "--hour", "2021-07-12T10"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with pg.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                if cursor.fetchone()[0] == 6:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the six loaders never all waited at the DDL lock")
    finally:
        __import__("os").environ.clear()
        __import__("os").environ.update(env)
        holder.rollback()
        holder.close()
    results = [(p.wait(timeout=60), p.stderr.read()) for p in processes]
    assert [code for code, _ in results] == [0] * 6, [err for _, err in results]
    assert set(recorded_tables(loader_env["PG_CONNECT"])) == {f"public.pox_{n}" for n in range(6)}


# -- 10-11. InfluxQL's SHOW FIELD KEYS -------------------------------------------------------------------
def test_show_field_keys_is_retried_like_every_query(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("INFLUX_QUERY_LANGUAGE", "influxql")
    influx.write_lines("pulse_oximeter", line_protocol(H10, 1) + f'spo2,uid=A note="ok" {int(H10.timestamp()) + 1}\n', precision="s")
    influx.inject(Fault("slow", delay=0), Fault("status", status=503, retry_after=0.01, fractional=True))
    code, _, err = call(capsys, ["--hour", "2021-07-12T10"])
    assert code == 0, err
    assert [q.split(" FROM")[0] for q in influx.queries] == ["SELECT mean(*)", "SHOW FIELD KEYS", "SHOW FIELD KEYS"]
    assert "field 'note' of measurement 'spo2' is not a number, so mean(*) skips it and it is not archived" in err


def test_an_empty_hourly_call_sends_one_query(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("INFLUX_QUERY_LANGUAGE", "influxql")
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    influx.write_lines("pulse_oximeter", line_protocol(H10, 1), precision="s")
    assert call(capsys)[0] == 0
    influx.queries.clear()
    assert call(capsys, now=H10 + timedelta(hours=2, minutes=5))[0] == 0
    assert [q.split(" FROM")[0] for q in influx.queries] == ["SELECT mean(*)"]


def test_a_string_field_that_appears_later_is_named_once(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("INFLUX_QUERY_LANGUAGE", "influxql")
    influx.write_lines("pulse_oximeter", line_protocol(H10, 30), precision="s")
    assert call(capsys, ["--hour", "2021-07-12T10"])[0] == 0
    influx.write_lines("pulse_oximeter", f'spo2,uid=A note="battery low" {int(H10.timestamp()) + 26 * 3600 + 9}\n', precision="s")
    warnings = []
    for hour in range(11, 13 + 26):  # hourly calls over the next day and more
        code, _, err = call(
            capsys, ["--hour", hml.iso(H10 + timedelta(hours=hour - 10))[:13]], now=H10 + timedelta(hours=hour - 10 + 1, minutes=5)
        )
        assert code == 0, err
        warnings += [line.split(" WARNING ", 1)[1] for line in err.splitlines() if " WARNING " in line]
    assert warnings == ["field 'note' of measurement 'spo2' is not a number, so mean(*) skips it and it is not archived"]


# -- Worth checking: field names and column types ---------------------------------------------------------
@pytest.mark.parametrize("language", ["flux", "influxql"])
def test_fields_named_like_the_loader_s_own_columns_load(loader_env, influx, capsys, monkeypatch, language):
    monkeypatch.setenv("INFLUX_QUERY_LANGUAGE", language)
    influx.write_lines("pulse_oximeter", f"spo2,uid=A _merge=1,table=2,result=3 {int(H10.timestamp()) + 1}\n", precision="s")
    for _ in range(2):
        code, _, err = call(capsys, ["--hour", "2021-07-12T10"])
        assert code == 0, err
    with psycopg2.connect(loader_env["PG_CONNECT"]) as connection, connection.cursor() as cursor:
        cursor.execute('SELECT "_merge", "table", "result" FROM pox_five_second_mean')
        assert cursor.fetchall() == [(1.0, 2.0, 3.0)]


def test_a_real_column_reads_back_as_equal(loader_env, influx, capsys, pg):
    with pg.cursor() as cursor:
        cursor.execute("CREATE TABLE pox_five_second_mean (time timestamptz PRIMARY KEY, pulse real, spo2 numeric(6,2))")
    influx.write_lines("pulse_oximeter", line_protocol(H10, 1), precision="s")
    assert call(capsys, ["--hour", "2021-07-12T10"])[0] == 0
    code, out, err = call(capsys, ["--verify", "--hour", "2021-07-12T10"])
    assert code == 0, out
    code, _, err = call(capsys, ["--hour", "2021-07-12T10"])
    assert "loaded 2021-07-12T10:00:00Z..2021-07-12T11:00:00Z: 0 rows in" in err and "(1 hour already up to date)" in err


def test_an_influxql_answer_with_rfc3339_times_reads_as_epoch_nanoseconds_would():
    """A server that ignores epoch=ns sends RFC3339 strings: the same rows, not a traceback."""
    import json

    window = hml.Window(H10, H10 + timedelta(hours=1))
    as_text = [["2021-07-12T10:00:00Z", 97, 70], ["2021-07-12T10:59:55.5Z", 98, None]]
    as_epoch = [[1626084000000000000, 97, 70], [1626087595500000000, 98, None]]
    frames = [
        hml.clean(
            hml.read_influxql_answer(
                json.dumps(
                    {
                        "results": [
                            {"statement_id": 0, "series": [{"name": "spo2", "columns": ["time", "mean_spo2", "mean_pulse"], "values": v}]}
                        ]
                    }
                ).encode(),
                5 * 10**9,
                window,
            )
        )
        for v in (as_text, as_epoch)
    ]
    assert frames[0].equals(frames[1])
    assert [t.isoformat() for t in frames[0]["time"]] == ["2021-07-12T10:00:05+00:00", "2021-07-12T11:00:00+00:00"]
