"""Loading into a real PostgreSQL: fresh tables, the blog's table, time zones, re-runs, the boundary."""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import pytest
from sqlalchemy import create_engine

import health_metrics_loader as hml
from tests.conftest import utc

H14 = hml.Window(utc(2021, 7, 12, 14), utc(2021, 7, 12, 15))
H15 = hml.Window(utc(2021, 7, 12, 15), utc(2021, 7, 12, 16))
TABLE = ("pox_five_second_mean",)


def frame(*rows: tuple) -> pd.DataFrame:
    """A cleaned frame: (ISO time, pulse, spo2) rows."""
    return pd.DataFrame(
        {
            "time": pd.to_datetime([r[0] for r in rows], utc=True, format="ISO8601").astype("datetime64[us, UTC]"),
            "pulse": pd.Series([r[1] for r in rows], dtype="float64"),
            "spo2": pd.Series([r[2] for r in rows], dtype="float64"),
        }
    )


@pytest.fixture
def connect(fresh_db):
    connections = []

    def open_connection():
        settings = hml.settings_from_env({"CONNECTION": "http://x", "TOKEN": "t", "ORG": "o", "PG_CONNECT": fresh_db})
        connections.append(hml.connect_postgres(settings))
        return connections[-1]

    yield open_connection
    for c in connections:
        c.close()


def select(pg, sql: str = "SELECT time, pulse, spo2 FROM pox_five_second_mean ORDER BY time") -> list[tuple]:
    with pg.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute(sql)
        return cursor.fetchall()


def columns(pg, table: str = "pox_five_second_mean") -> dict[str, str]:
    with pg.cursor() as cursor:
        cursor.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s", (table,))
        return dict(cursor.fetchall())


def test_fresh_table_is_created_with_a_primary_key(connect, pg):
    written = hml.load_frame(connect(), TABLE, frame(("2021-07-12T14:00:05Z", 71.5, 97.0), ("2021-07-12T14:00:10Z", None, 98.25)), H14)
    assert written == 2
    assert columns(pg) == {"time": "timestamp with time zone", "pulse": "double precision", "spo2": "double precision"}
    assert select(pg) == [(utc(2021, 7, 12, 14, 0, 5), 71.5, 97.0), (utc(2021, 7, 12, 14, 0, 10), None, 98.25)]
    with pg.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'pox_five_second_mean'")
        assert "UNIQUE INDEX pox_five_second_mean_pkey" in cursor.fetchone()[0]


def test_reload_replaces_the_window_and_keeps_the_boundary_row(connect, pg):
    connection = connect()
    hml.load_frame(connection, TABLE, frame(("2021-07-12T14:00:05Z", 1, 1), ("2021-07-12T15:00:00Z", 2, 2)), H14)
    hml.load_frame(connection, TABLE, frame(("2021-07-12T15:00:05Z", 3, 3), ("2021-07-12T16:00:00Z", 4, 4)), H15)
    hml.load_frame(connection, TABLE, frame(("2021-07-12T15:00:05Z", 5, 5), ("2021-07-12T16:00:00Z", 6, 6)), H15)
    hml.load_frame(connection, TABLE, frame(("2021-07-12T15:00:05Z", 5, 5), ("2021-07-12T16:00:00Z", 6, 6)), H15)
    assert select(pg) == [
        (utc(2021, 7, 12, 14, 0, 5), 1.0, 1.0),
        (utc(2021, 7, 12, 15, 0, 0), 2.0, 2.0),  # stamped 15:00, belongs to hour 14: survives reloads of 15
        (utc(2021, 7, 12, 15, 0, 5), 5.0, 5.0),
        (utc(2021, 7, 12, 16, 0, 0), 6.0, 6.0),
    ]


def test_an_empty_answer_keeps_the_stored_rows_unless_replacing(connect, pg):
    connection = connect()
    hml.load_frame(connection, TABLE, frame(("2021-07-12T14:30:00Z", 1, 1)), H14)
    assert hml.load_frame(connection, TABLE, hml.clean(hml.read_answer(b"\r\n")), H14) == 0
    assert select(pg) == [(utc(2021, 7, 12, 14, 30), 1.0, 1.0)]
    assert hml.load_frame(connection, TABLE, hml.clean(hml.read_answer(b"\r\n")), H14, replace=True) == 0
    assert select(pg) == []


def test_an_answer_with_fewer_rows_replaces_only_its_own_times(connect, pg):
    connection = connect()
    hml.load_frame(
        connection, TABLE, frame(("2021-07-12T14:30:00Z", 1, 1), ("2021-07-12T14:30:05Z", 2, 2), ("2021-07-12T15:00:00Z", 3, 3)), H14
    )
    # InfluxDB has forgotten 14:30:00, and now says something else for 14:30:05
    assert hml.load_frame(connection, TABLE, frame(("2021-07-12T14:30:05Z", 5, 5)), H14) == 1
    assert select(pg) == [
        (utc(2021, 7, 12, 14, 30), 1.0, 1.0),
        (utc(2021, 7, 12, 14, 30, 5), 5.0, 5.0),
        (utc(2021, 7, 12, 15), 3.0, 3.0),
    ]


def test_an_unchanged_hour_is_not_rewritten(connect, pg):
    connection = connect()
    rows = frame(("2021-07-12T14:30:00Z", 1, 1), ("2021-07-12T15:30:00Z", 2, None))
    two_hours = hml.Window(H14.start, H15.stop)
    assert hml.load_frame(connection, TABLE, rows, two_hours) == 2
    with pg.cursor() as cursor:
        cursor.execute("SELECT xmin::text FROM pox_five_second_mean ORDER BY time")
        versions = cursor.fetchall()
    later = frame(("2021-07-12T14:30:00Z", 1, 1), ("2021-07-12T15:30:00Z", 2, 7))  # a late spo2 point in hour 15
    assert hml.load_frame(connection, TABLE, later, two_hours) == 1
    with pg.cursor() as cursor:
        cursor.execute("SELECT xmin::text FROM pox_five_second_mean ORDER BY time")
        after = cursor.fetchall()
    assert after[0] == versions[0] and after[1] != versions[1]
    assert select(pg) == [(utc(2021, 7, 12, 14, 30), 1.0, 1.0), (utc(2021, 7, 12, 15, 30), 2.0, 7.0)]


def test_a_new_field_adds_a_column(connect, pg):
    connection = connect()
    hml.load_frame(connection, TABLE, frame(("2021-07-12T14:00:05Z", 70, 97)), H14)
    with_temp = frame(("2021-07-12T15:00:05Z", 71, 98)).assign(temp=[36.6])
    hml.load_frame(connection, TABLE, with_temp, H15)
    assert columns(pg)["temp"] == "double precision"
    assert select(pg, "SELECT time, pulse, spo2, temp FROM pox_five_second_mean ORDER BY time") == [
        (utc(2021, 7, 12, 14, 0, 5), 70.0, 97.0, None),
        (utc(2021, 7, 12, 15, 0, 5), 71.0, 98.0, 36.6),
    ]


def test_schema_qualified_table(connect, pg):
    pg.cursor().execute("CREATE SCHEMA health")
    hml.load_frame(connect(), ("health", "pox"), frame(("2021-07-12T14:00:05Z", 70, 97)), H14)
    assert select(pg, "SELECT time, pulse, spo2 FROM health.pox") == [(utc(2021, 7, 12, 14, 0, 5), 70.0, 97.0)]


def make_blog_table(fresh_db: str) -> None:
    """What the blog's script leaves behind: pandas' to_sql with a naive-UTC time index."""
    old = pd.DataFrame(
        {"time": pd.to_datetime(["2021-07-12 13:00:05", "2021-07-12 14:00:00"]), "pulse": [70.0, 71.0], "spo2": [97.0, 96.5]}
    ).set_index("time")
    engine = create_engine(fresh_db.replace("postgresql://", "postgresql+psycopg2://"))
    old.to_sql("pox_five_second_mean", engine, if_exists="append")
    engine.dispose()


@pytest.mark.parametrize("server_zone", ["UTC", "America/New_York", "Asia/Kolkata"])
def test_blog_table_keeps_working_in_any_server_time_zone(fresh_db, connect, pg, server_zone):
    make_blog_table(fresh_db)
    pg.cursor().execute(f"ALTER DATABASE {fresh_db.rsplit('/', 1)[1]} SET timezone = '{server_zone}'")
    assert columns(pg)["time"] == "timestamp without time zone"
    hml.load_frame(connect(), TABLE, frame(("2021-07-12T14:00:05Z", 72, 98), ("2021-07-12T15:00:00Z", 73, 99)), H14)
    hml.load_frame(connect(), TABLE, frame(("2021-07-12T14:00:05Z", 72, 98), ("2021-07-12T15:00:00Z", 73, 99)), H14)
    naive = [(datetime(2021, 7, 12, 13, 0, 5), 70.0, 97.0), (datetime(2021, 7, 12, 14), 71.0, 96.5)]
    naive += [(datetime(2021, 7, 12, 14, 0, 5), 72.0, 98.0), (datetime(2021, 7, 12, 15), 73.0, 99.0)]
    assert select(pg) == naive
    with pg.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'pox_five_second_mean'")
        assert cursor.fetchall() == [("ix_pox_five_second_mean_time",)]


def test_session_is_pinned_to_utc(fresh_db, connect, pg):
    pg.cursor().execute(f"ALTER DATABASE {fresh_db.rsplit('/', 1)[1]} SET timezone = 'Pacific/Auckland'")
    connection = connect()
    with connection.cursor() as cursor:
        cursor.execute("SHOW TimeZone")
        assert cursor.fetchone() == ("UTC",)
    hml.load_frame(connection, TABLE, frame(("2021-07-12T14:00:05Z", 72, 98)), H14)
    with pg.cursor() as cursor:
        cursor.execute("SELECT to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') FROM pox_five_second_mean")
        assert cursor.fetchall() == [("2021-07-12 14:00:05",)]


def test_a_failed_load_writes_nothing(connect, pg):
    connection = connect()
    hml.load_frame(connection, TABLE, frame(("2021-07-12T14:00:05Z", 1, 1)), H14)
    pg.cursor().execute("ALTER TABLE pox_five_second_mean ADD CONSTRAINT spo2_small CHECK (spo2 < 2)")
    with pytest.raises(hml.DatabaseError, match="spo2_small"):
        hml.load_frame(connection, TABLE, frame(("2021-07-12T14:00:10Z", 2, 2)), H14)
    assert select(pg) == [(utc(2021, 7, 12, 14, 0, 5), 1.0, 1.0)]  # the DELETE was rolled back too


def test_fractional_seconds_survive(connect, pg):
    hml.load_frame(connect(), TABLE, frame(("2021-07-12T14:00:01.5Z", 1, 1), ("2021-07-12T14:00:03Z", 2, 2)), H14)
    assert [row[0] for row in select(pg)] == [utc(2021, 7, 12, 14, 0, 1, 500000), utc(2021, 7, 12, 14, 0, 3)]


@pytest.mark.parametrize("value", [97.0, 0.1 + 0.2, 1e-7, 123456789.123456789, -0.0])
def test_floats_are_stored_exactly(connect, pg, value):
    hml.load_frame(connect(), TABLE, frame(("2021-07-12T14:00:05Z", value, None)), H14)
    assert select(pg) == [(utc(2021, 7, 12, 14, 0, 5), value, None)]


@pytest.mark.parametrize("value", [97.0, 0.1 + 0.2, 1e-7, 123456789.123456789, -0.0, 5e-324])
def test_binary_copy_stores_floats_and_times_exactly(connect, pg, value):
    chunk = hml.prepare_chunk(frame(("2021-07-12T14:00:01.5Z", value, 1.0), ("2021-07-12T15:00:00Z", 2.0, value)), H14)
    assert chunk.binary is not None  # no empty cell: the binary format is used
    connection = connect()
    with connection.cursor() as cursor:
        hml.ensure_ledger(cursor, TABLE)
    hml.load_chunk(connection, TABLE, chunk)
    assert select(pg) == [(utc(2021, 7, 12, 14, 0, 1, 500000), value, 1.0), (utc(2021, 7, 12, 15), 2.0, value)]


def test_columns_of_other_types_get_csv(connect, pg):
    pg.cursor().execute("CREATE TABLE pox_five_second_mean (time timestamptz PRIMARY KEY, pulse real, spo2 numeric)")
    hml.load_frame(connect(), TABLE, frame(("2021-07-12T14:00:05Z", 71.5, 97.25)), H14)
    with pg.cursor() as cursor:
        cursor.execute("SELECT pulse, spo2::text FROM pox_five_second_mean")
        assert cursor.fetchall() == [(71.5, "97.25")]


def test_url_options_reach_libpq(fresh_db):
    settings = hml.settings_from_env(
        {"CONNECTION": "http://x", "TOKEN": "t", "ORG": "o", "PG_CONNECT": fresh_db + "?application_name=hml-test&connect_timeout=5"}
    )
    connection = hml.connect_postgres(settings)
    with connection.cursor() as cursor:
        cursor.execute("SHOW application_name")
        assert cursor.fetchone() == ("hml-test",)
    connection.close()
