"""The pure parts: settings, windows, the query text, and the transform."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

import health_metrics_loader as hml
from tests.conftest import utc

BLOG_ENV = {
    "TOKEN": "tok",
    "ORG": "home",
    "CONNECTION": "https://eu-central-1-1.aws.cloud2.influxdata.com",
    "PG_CONNECT": "postgresql://pi:raspberry@localhost:5432/health",
}


# -- Settings ---------------------------------------------------------------------------
def test_blog_env_gives_defaults_and_psycopg2_url():
    settings = hml.settings_from_env(BLOG_ENV)
    assert settings.bucket == "pulse_oximeter"
    assert settings.measurement == "spo2"
    assert settings.every == "5s"
    assert settings.table == ("pox_five_second_mean",)
    assert settings.pg_url == "postgresql+psycopg2://pi:raspberry@localhost:5432/health"
    assert settings.secrets() == ["raspberry", "tok"]


def test_every_missing_setting_is_named_at_once():
    with pytest.raises(hml.ConfigError) as caught:
        hml.settings_from_env({"ORG": "home"})
    message = str(caught.value)
    for name in ("CONNECTION", "TOKEN", "PG_CONNECT"):
        assert f"{name} is not set" in message
    assert "ORG" not in message


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("CONNECTION", "eu-central-1-1.aws.cloud2.influxdata.com", "CONNECTION"),
        ("CONNECTION", "ftp://host", "CONNECTION"),
        ("PG_CONNECT", "mysql://u:p@h/db", "PG_CONNECT"),
        ("PG_CONNECT", "not a url", "PG_CONNECT"),
        ("PG_CONNECT", "postgresql+asyncpg://u:p@h/db", "PG_CONNECT"),
        ("PG_TABLE", "pox; DROP TABLE x", "PG_TABLE"),
        ("PG_TABLE", "a.b.c", "PG_TABLE"),
        ("PG_TABLE", "1abc", "PG_TABLE"),
        ("AGGREGATE_EVERY", "5", "AGGREGATE_EVERY"),
        ("AGGREGATE_EVERY", "5s) |> drop(", "AGGREGATE_EVERY"),
        ("AGGREGATE_EVERY", "2h", "AGGREGATE_EVERY"),
        ("AGGREGATE_EVERY", "500ms", "AGGREGATE_EVERY"),
        ("INFLUX_BUCKET", "a\nb", "INFLUX_BUCKET"),
        ("QUERY_TIMEOUT", "soon", "QUERY_TIMEOUT"),
        ("QUERY_TIMEOUT", "0", "QUERY_TIMEOUT"),
        ("CATCH_UP_HOURS", "inf", "CATCH_UP_HOURS"),
        ("CATCH_UP_HOURS", "1.5", "CATCH_UP_HOURS"),
        ("SETTLE_MINUTES", "nan", "SETTLE_MINUTES"),
        ("LOCK_TIMEOUT", "-1", "LOCK_TIMEOUT"),
        ("RETRY_BUDGET", "-1", "RETRY_BUDGET"),
    ],
)
def test_bad_setting_is_named(key, value, named):
    with pytest.raises(hml.ConfigError, match=named):
        hml.settings_from_env({**BLOG_ENV, key: value})


@pytest.mark.parametrize(
    ("value", "table"),
    [("pox_five_second_mean", ("pox_five_second_mean",)), ("health.pox", ("health", "pox"))],
)
def test_table_may_name_a_schema(value, table):
    settings = hml.settings_from_env({**BLOG_ENV, "PG_TABLE": value})
    assert settings.table == table
    assert hml.qualified(settings.table) == ".".join(f'"{p}"' for p in table)


def test_settings_repr_hides_the_token():
    settings = hml.settings_from_env(BLOG_ENV)
    assert "tok" not in repr(settings).replace("table", "")
    assert "raspberry" not in repr(settings)


def test_env_files_first_path_wins(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / ".env").write_text("TOKEN=from-a\n")
    (tmp_path / "b" / ".env").write_text("TOKEN=from-b\nORG=b-org\n")
    merged = hml.read_env_files([tmp_path / "a" / ".env", tmp_path / "b" / ".env", tmp_path / "none"])
    assert merged == {"TOKEN": "from-a", "ORG": "b-org"}


# -- Windows ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("now", "start"),
    [
        (utc(2021, 7, 12, 15, 0, 0), utc(2021, 7, 12, 14)),
        (datetime(2021, 7, 12, 15, 59, 59, 999000, tzinfo=timezone.utc), utc(2021, 7, 12, 14)),
        (utc(2021, 7, 13, 0, 0, 0), utc(2021, 7, 12, 23)),
        (utc(2021, 8, 1, 0, 30), utc(2021, 7, 31, 23)),
        (utc(2022, 1, 1, 0, 0, 1), utc(2021, 12, 31, 23)),
        (utc(2024, 3, 1, 0, 10), utc(2024, 2, 29, 23)),
        (datetime(2021, 7, 12, 17, 30, tzinfo=timezone(timedelta(hours=2))), utc(2021, 7, 12, 14)),
    ],
)
def test_previous_hour(now, start):
    assert hml.previous_hour(now) == hml.Window(start, start + timedelta(hours=1))


def test_previous_hour_needs_an_aware_clock():
    with pytest.raises(ValueError):
        hml.previous_hour(datetime(2021, 7, 12, 15))


@pytest.mark.parametrize(
    ("text", "hour"),
    [
        ("2021-07-12T14", utc(2021, 7, 12, 14)),
        ("2021-07-12T14:00", utc(2021, 7, 12, 14)),
        ("2021-07-12T14:00:00Z", utc(2021, 7, 12, 14)),
        ("2021-07-12T14:00:00+00:00", utc(2021, 7, 12, 14)),
        ("2021-07-12 14", utc(2021, 7, 12, 14)),
    ],
)
def test_parse_hour(text, hour):
    assert hml.parse_hour(text) == hour


@pytest.mark.parametrize(
    "text", ["2021-07-12", "2021-07-12T14:30", "2021-07-12T25", "2021-02-30T01", "2021-07-12T14:00:00+02:00", "yesterday"]
)
def test_parse_hour_rejects(text):
    with pytest.raises(ValueError):
        hml.parse_hour(text)


def test_chunked_splits_gaps_and_days():
    start = utc(2021, 7, 1)
    hours = [start + timedelta(hours=i) for i in [*range(0, 30), *range(31, 33)]]
    windows = hml.chunked(hours)
    assert windows == [
        hml.Window(start, start + timedelta(hours=24)),
        hml.Window(start + timedelta(hours=24), start + timedelta(hours=30)),
        hml.Window(start + timedelta(hours=31), start + timedelta(hours=33)),
    ]


# -- Query --------------------------------------------------------------------------------
def test_query_is_the_blog_pipeline():
    settings = hml.settings_from_env(BLOG_ENV)
    window = hml.Window(utc(2021, 7, 12, 14), utc(2021, 7, 12, 15))
    assert hml.flux_query(settings, window) == (
        'from(bucket: "pulse_oximeter")\n'
        "  |> range(start: 2021-07-12T14:00:00Z, stop: 2021-07-12T15:00:00Z)\n"
        '  |> filter(fn: (r) => r._measurement == "spo2")\n'
        "  |> aggregateWindow(every: 5s, fn: mean, createEmpty: false)\n"
        '  |> drop(columns: ["_start", "_stop", "_measurement", "uid"])\n'
        '  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")\n'
    )


@pytest.mark.parametrize(
    ("value", "literal"),
    [('my "bucket"', r'"my \"bucket\""'), ("back\\slash", r'"back\\slash"'), ("a${x}b", r'"a\${x}b"'), ("plain", '"plain"')],
)
def test_flux_string_escapes(value, literal):
    assert hml.flux_string(value) == literal


# -- Transform ----------------------------------------------------------------------------
HEAD = "#datatype,string,long,dateTime:RFC3339,double,double\r\n#group,false,false,false,false,false\r\n#default,_result,,,,\r\n,result,table,_time,pulse,spo2\r\n"


def frame_of(body: str) -> pd.DataFrame:
    return hml.clean(hml.read_answer(body.encode()))


def rows(frame: pd.DataFrame) -> list[tuple]:
    out = []
    for record in frame.itertuples(index=False):
        time_, *values = record
        out.append((time_.to_pydatetime(), *(None if isinstance(v, float) and math.isnan(v) else v for v in values)))
    return out


def test_empty_answer_is_an_empty_frame():
    frame = frame_of("\r\n")
    assert list(frame.columns) == ["time"]
    assert len(frame) == 0


def test_one_table_with_empty_cells():
    frame = frame_of(HEAD + ",,0,2021-07-12T14:00:10Z,,98.25\r\n,,0,2021-07-12T14:00:05Z,71.5,97\r\n\r\n")
    assert list(frame.columns) == ["time", "pulse", "spo2"]
    assert str(frame["time"].dtype).endswith("UTC]")
    assert rows(frame) == [(utc(2021, 7, 12, 14, 0, 5), 71.5, 97.0), (utc(2021, 7, 12, 14, 0, 10), None, 98.25)]


def test_several_blocks_are_combined_and_a_new_field_is_kept():
    body = (
        HEAD
        + ",,0,2021-07-12T14:00:05Z,71.5,97\r\n\r\n"
        + "#datatype,string,long,dateTime:RFC3339,double\r\n#group,false,false,false,false\r\n#default,_result,,,\r\n,result,table,_time,temp\r\n"
        + ",,1,2021-07-12T14:00:10Z,36.6\r\n\r\n"
    )
    assert rows(frame_of(body)) == [(utc(2021, 7, 12, 14, 0, 5), 71.5, 97.0, None), (utc(2021, 7, 12, 14, 0, 10), None, None, 36.6)]


def test_tag_columns_are_not_fields():
    body = (
        "#datatype,string,long,dateTime:RFC3339,string,double\r\n#group,false,false,false,true,false\r\n#default,_result,,,,\r\n"
        ",result,table,_time,host,spo2\r\n,,0,2021-07-12T14:00:05Z,pi,97\r\n\r\n"
    )
    assert rows(frame_of(body)) == [(utc(2021, 7, 12, 14, 0, 5), 97.0)]


def test_error_table_is_an_error():
    body = (
        HEAD
        + ',,0,2021-07-12T14:00:05Z,71.5,97\r\n\r\n#datatype,string,string\r\n#group,true,true\r\n#default,,\r\n,error,reference\r\n,"panic: boom, badly",\r\n'
    )
    with pytest.raises(hml.SourceError, match="panic: boom, badly"):
        frame_of(body)


def test_cut_off_answer_is_an_error():
    with pytest.raises(hml.SourceError, match="ended early"):
        frame_of(HEAD + ",,0,2021-07-12T14:00:05Z,71.5,97\r\n,,0,2021-07-12T14:00:1")


def test_answer_without_time_is_an_error():
    with pytest.raises(hml.SourceError, match="_time"):
        frame_of("#datatype,string,long,double\r\n#group,false,false,false\r\n#default,_result,,\r\n,result,table,spo2\r\n,,0,97\r\n\r\n")


def test_rows_are_sorted_by_time():
    body = HEAD + ",,0,2021-07-12T14:00:15Z,1,1\r\n,,0,2021-07-12T14:00:05Z,2,2\r\n,,0,2021-07-12T14:00:10Z,3,3\r\n\r\n"
    assert [r[1] for r in rows(frame_of(body))] == [2.0, 3.0, 1.0]


def test_rows_per_hour_puts_the_hour_mark_in_the_earlier_hour():
    window = hml.Window(utc(2021, 7, 12, 14), utc(2021, 7, 12, 16))
    frame = pd.DataFrame(
        {"time": pd.to_datetime(["2021-07-12T14:00:05Z", "2021-07-12T15:00:00Z", "2021-07-12T15:00:05Z", "2021-07-12T16:00:00Z"], utc=True)}
    )
    assert hml.rows_per_hour(frame, window) == {utc(2021, 7, 12, 14): 2, utc(2021, 7, 12, 15): 2}


def test_env_example_names_every_setting_and_parses():
    from tests.conftest import ROOT

    example = hml.read_env_files([ROOT / ".env.example"])
    assert set(example) == {*hml.REQUIRED, *hml.DEFAULTS}
    assert {k: example[k] for k in hml.DEFAULTS} == hml.DEFAULTS
    hml.settings_from_env({**example, "TOKEN": "t", "ORG": "o"})


@pytest.mark.parametrize("catch_up, recheck", [("72", 6), ("5", 5), ("1", 1)])
def test_a_copied_env_example_takes_a_short_catch_up_span(catch_up, recheck):
    """A .env made from .env.example that lowers CATCH_UP_HOURS must not be refused for RECHECK_HOURS."""
    from tests.conftest import ROOT

    example = hml.read_env_files([ROOT / ".env.example"])
    assert hml.settings_from_env({**example, "TOKEN": "t", "ORG": "o", "CATCH_UP_HOURS": catch_up}).recheck_hours == recheck
