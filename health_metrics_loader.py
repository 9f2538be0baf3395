#!/usr/bin/env python3
"""Copy pulse-oximeter readings from InfluxDB into PostgreSQL, one UTC hour at a time.

Each run asks InfluxDB for 5-second means of the previous complete UTC hour and writes
them to a PostgreSQL table that Grafana can read for years. `--hour` and `--from/--to`
load chosen hours again, `--verify` compares hours with InfluxDB and `--repair` reloads
those that differ. A load rewrites only hours whose rows differ, and never removes a
stored row that InfluxDB's answer does not replace (unless `--replace`), so nothing is
duplicated and nothing InfluxDB has forgotten is lost.

Settings come from the environment, then from a `.env` file in the working directory
or beside this script (the environment wins; LOADER_ENV_FILE names another file, or
none when empty):
    CONNECTION          InfluxDB URL, e.g. https://eu-central-1-1.aws.cloud2.influxdata.com
    TOKEN               InfluxDB API token with read access (InfluxDB 1.x: user:password)
    ORG                 InfluxDB organization name or ID (not used with influxql)
    PG_CONNECT          SQLAlchemy URL, e.g. postgresql://pi:secret@localhost:5432/health
    INFLUX_QUERY_LANGUAGE  flux (default; InfluxDB 2, Cloud before 2023) or influxql
                        (InfluxDB 1.x, 3, Cloud Serverless and Dedicated)
    INFLUX_BUCKET       default pulse_oximeter (with influxql: the database)
    INFLUX_RETENTION_POLICY  with influxql: the retention policy, default the database's
    INFLUX_MEASUREMENT  default spo2
    AGGREGATE_EVERY     default 5s; must divide an hour
    PG_TABLE            default pox_five_second_mean (may be schema.table)
    QUERY_TIMEOUT       seconds to wait for InfluxDB's answer and each part of it, default 60
    CATCH_UP_HOURS      how far back the cron call fills missing hours, default 72 (max 720)
    RECHECK_HOURS       loaded hours the cron call compares again for late points, default 6
                        (or CATCH_UP_HOURS, when that is less)
    SETTLE_MINUTES      minutes after an hour ends before it counts as complete, default 2
    LOCK_TIMEOUT        seconds explicit runs wait for another run, default 300 (0: no wait)
    RETRY_BUDGET        seconds a run may spend waiting to retry InfluxDB, default 180
    INFLUX_RETENTION_HOURS  how long InfluxDB keeps readings, default 720 (0: forever); stored
                        rows InfluxDB may have begun to forget are never rewritten
    PING_URL            a dead-man's switch (healthchecks.io's protocol), pinged after each load or check
    METRICS_FILE        a Prometheus textfile for node_exporter, replaced after each run

Every loaded hour is recorded in the table `loaded_hours` (same schema as PG_TABLE),
in the same transaction as its rows, and so are the rollups `<table>_1m`, `_5m` and `_1h`
behind the panel functions `<table>_series` and `<table>_stats` that Grafana reads. The cron call loads every complete hour of the
last CATCH_UP_HOURS that is not recorded there, oldest first.

Exit codes: 0 success (an hour without data included), 1 the run failed (or --verify
found rows missing or changed), 2 bad arguments or settings. `--status` exits 1 when
the newest loaded hour is more than two hours old, or when InfluxDB will forget an hour
that is not loaded within 7 days.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

if TYPE_CHECKING:  # pandas is imported where it is used: `--help` should not pay for it
    from concurrent.futures import Future

    import pandas as pd

log = logging.getLogger("health_metrics_loader")
T = TypeVar("T")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
HOUR = timedelta(hours=1)
MAX_CHUNK_HOURS = 24


# -- Errors ----------------------------------------------------------------------------
class LoaderError(Exception):
    """An expected failure: printed as one line, never as a traceback."""

    exit_code = EXIT_FAILED


class ConfigError(LoaderError, ValueError):
    """Bad settings or arguments: exit 2, and a ValueError for callers such as schedulers."""

    exit_code = EXIT_USAGE


class SourceError(LoaderError):
    """InfluxDB could not be reached, refused the request, or sent a bad answer."""


class TransientSourceError(SourceError):
    """A source failure that a later try may not meet: worth a retry."""

    def __init__(self, message: str, retry_after: float | None = None, tries: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.tries = tries  # at most this many tries, where more would only make the run look hung


class IncompleteAnswer(TransientSourceError):
    """The answer was cut off: nothing of it may be written."""


class DataError(LoaderError):
    """InfluxDB answered, but the data cannot be stored as it is."""


class DatabaseError(LoaderError):
    """PostgreSQL could not be reached or refused a statement."""


# -- Settings --------------------------------------------------------------------------
REQUIRED = {
    "CONNECTION": "the InfluxDB URL",
    "TOKEN": "an InfluxDB API token; not needed with INFLUX_QUERY_LANGUAGE=influxql",
    "ORG": "the InfluxDB organization; not needed with INFLUX_QUERY_LANGUAGE=influxql",
    "PG_CONNECT": "the PostgreSQL URL",
}
NOT_FOR_INFLUXQL = ("TOKEN", "ORG")  # a 1.x server may run without authentication; /query takes no org
QUERY_LANGUAGES = ("flux", "influxql")
DEFAULTS = {
    "INFLUX_BUCKET": "pulse_oximeter",
    "INFLUX_MEASUREMENT": "spo2",
    "AGGREGATE_EVERY": "5s",
    "PG_TABLE": "pox_five_second_mean",
    "QUERY_TIMEOUT": "60",
    "CATCH_UP_HOURS": "72",
    "SETTLE_MINUTES": "2",
    "LOCK_TIMEOUT": "300",
    "RETRY_BUDGET": "180",
    "RECHECK_HOURS": "",  # empty: RECHECK_DEFAULT, or the whole catch-up span when that is shorter
    "INFLUX_QUERY_LANGUAGE": "flux",
    "INFLUX_RETENTION_POLICY": "",
    "INFLUX_RETENTION_HOURS": "720",
    "PING_URL": "",
    "METRICS_FILE": "",
}
MAX_CATCH_UP_HOURS = 720  # InfluxDB Cloud's free plan keeps 30 days
RECHECK_DEFAULT = 6
RETENTION_MARGIN = timedelta(hours=1)
MAX_LOCK_TIMEOUT = 2147483  # PostgreSQL's lock_timeout is an int of milliseconds
MIN_TIMEOUT = 0.001  # below a millisecond, PostgreSQL and influxdb-client would read "no timeout"
NUMBER_RULES = {  # setting: (the test its value must pass, what it must be)
    "QUERY_TIMEOUT": (lambda n: n >= MIN_TIMEOUT, "a number of seconds, at least 0.001"),
    "CATCH_UP_HOURS": (lambda n: 1 <= n <= MAX_CATCH_UP_HOURS and n == int(n), f"a whole number from 1 to {MAX_CATCH_UP_HOURS}"),
    "SETTLE_MINUTES": (lambda n: 0 <= n <= 59, "a number of minutes from 0 to 59"),
    "LOCK_TIMEOUT": (
        lambda n: n == 0 or MIN_TIMEOUT <= n <= MAX_LOCK_TIMEOUT,
        f"0 (do not wait) or a number of seconds from 0.001 to {MAX_LOCK_TIMEOUT}",
    ),
    "RETRY_BUDGET": (lambda n: n >= 0, "a number of seconds, 0 or more"),
    "RECHECK_HOURS": (lambda n: 0 <= n <= MAX_CATCH_UP_HOURS and n == int(n), "a whole number from 0 to CATCH_UP_HOURS"),
    "INFLUX_RETENTION_HOURS": (lambda n: 0 <= n <= 10**6 and n == int(n), "a whole number of hours (0: InfluxDB keeps everything)"),
}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
DURATION_PART = re.compile(r"(\d+)(ns|us|µs|ms|s|m|h)")
DURATION_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9}
DURATION_NS["h"] = 3600 * 10**9


@dataclass(frozen=True)
class Settings:
    influx_url: str
    token: str
    org: str
    pg_url: str
    bucket: str = DEFAULTS["INFLUX_BUCKET"]
    measurement: str = DEFAULTS["INFLUX_MEASUREMENT"]
    every: str = DEFAULTS["AGGREGATE_EVERY"]
    table: tuple[str, ...] = (DEFAULTS["PG_TABLE"],)
    query_timeout: float = 60.0
    catch_up_hours: int = 72
    settle: timedelta = timedelta(minutes=2)
    lock_timeout: float = 300.0
    retry_budget: float = 180.0
    recheck_hours: int = 6
    query_language: str = "flux"
    retention_policy: str = ""
    retention_hours: int = 720
    ping_url: str = ""
    metrics_file: str = ""

    @property
    def every_ns(self) -> int:
        return duration_ns(self.every) or 0

    def forgets_before(self, now: datetime) -> datetime | None:
        """Readings before this time may be gone from InfluxDB by `now`; None if it keeps everything.

        A margin keeps a stored row safe from a clock that runs a little ahead, and from a
        retention cut that passes while a long run is under way.
        """
        if not self.retention_hours:
            return None
        return now - timedelta(hours=self.retention_hours) + RETENTION_MARGIN

    def frozen_before(self, now: datetime) -> datetime | None:
        """Stored rows stamped before this time keep their values: their window (which ends at
        the stamp) began where InfluxDB may already have forgotten some of its readings."""
        edge = self.forgets_before(now)
        return None if edge is None else edge + timedelta(microseconds=self.every_ns // 1000)

    def secrets(self) -> list[str]:
        """Values that must never be printed, also as they look inside a URL."""
        from urllib.parse import quote

        from sqlalchemy.engine import make_url

        password = make_url(self.pg_url).password or ""
        influx_password = self.token.partition(":")[2]  # TOKEN=user:password for InfluxDB 1.x
        found = [self.token, password, influx_password, *userinfo_secrets(self.influx_url), *ping_secrets(self.ping_url)]
        found += [quote(s, safe="") for s in found]
        return sorted({s for s in found if s}, key=len, reverse=True)

    def __repr__(self) -> str:  # a stray repr() in a log must not leak the token
        return f"Settings(influx_url={self.influx_url!r}, org={self.org!r}, table={self.table!r})"


def settings_from_env(environ: Mapping[str, str]) -> Settings:
    """Read and check every setting; name all problems at once."""
    get = {k: environ.get(k, "").strip() for k in [*REQUIRED, *DEFAULTS]}
    values = {k: get[k] or default for k, default in DEFAULTS.items()}
    language = values["INFLUX_QUERY_LANGUAGE"].lower()
    # TOKEN and ORG depend on the language: with influxql (or an unknown one) they are not asked for
    required = {k: what for k, what in REQUIRED.items() if not (language != "flux" and k in NOT_FOR_INFLUXQL)}
    problems = [f"{k} is not set ({what})" for k, what in required.items() if not get[k]]
    if language not in QUERY_LANGUAGES:
        problems.append(
            "INFLUX_QUERY_LANGUAGE must be flux (InfluxDB 2, Cloud before 2023) or influxql (InfluxDB 1.x, 3, Cloud Serverless)"
        )

    url = get["CONNECTION"]
    if url:
        problems += url_problems(url)
    if values["PING_URL"] and not re.fullmatch(r"https?://[^\s/?#]+(/\S*)?", values["PING_URL"]):
        problems.append("PING_URL must be an http:// or https:// URL, such as https://hc-ping.com/<uuid>")
    if values["METRICS_FILE"] and not Path(values["METRICS_FILE"]).parent.is_dir():
        problems.append("METRICS_FILE must be a file in a folder that exists (node_exporter's textfile folder)")
    basic_auth = language == "influxql" and ":" in get["TOKEN"]  # sent base64-encoded, any character goes
    if not latin1(get["TOKEN"]) and not basic_auth:
        problems.append("TOKEN has a character that HTTP cannot send (a typographic quote or dash pasted with it?): copy the token again")
    pg_url = ""
    if get["PG_CONNECT"]:
        try:
            pg_url = postgres_url(get["PG_CONNECT"])
        except ValueError as exc:
            problems.append(f"PG_CONNECT {exc}")
    for name in ("INFLUX_BUCKET", "INFLUX_MEASUREMENT", "INFLUX_RETENTION_POLICY"):
        if any(ord(c) < 32 for c in values[name]):
            problems.append(f"{name} must not contain control characters")
    if duration_ns(values["AGGREGATE_EVERY"]) is None:
        problems.append(
            "AGGREGATE_EVERY must be a duration from 1s to 1h that divides an hour evenly, e.g. 5s, 10s, 15s, 1m, 1m30s, 5m or 1h"
        )
    table = tuple(values["PG_TABLE"].split("."))
    if len(table) > 2 or not all(IDENTIFIER.fullmatch(part) for part in table):
        problems.append("PG_TABLE must be a table name or schema.table (letters, digits, _)")
    if not values["RECHECK_HOURS"]:  # derived, so that a short CATCH_UP_HOURS needs no RECHECK_HOURS beside it
        catch_up = number(values["CATCH_UP_HOURS"]) or RECHECK_DEFAULT
        values["RECHECK_HOURS"] = str(int(min(RECHECK_DEFAULT, max(catch_up, 0))))
    numbers = {name: number(values[name]) for name in NUMBER_RULES}
    wrong = {name for name, (fits, _) in NUMBER_RULES.items() if numbers[name] is None or not fits(numbers[name])}
    problems += [f"{name} must be {what}" for name, (_, what) in NUMBER_RULES.items() if name in wrong]
    if not wrong & {"CATCH_UP_HOURS", "RECHECK_HOURS"}:  # the one against the other, once each is right on its own
        if numbers["RECHECK_HOURS"] > numbers["CATCH_UP_HOURS"]:
            problems.append("RECHECK_HOURS must be a whole number from 0 to CATCH_UP_HOURS")
    if problems:
        raise ConfigError("; ".join(problems))
    return Settings(
        influx_url=url.rstrip("/"),
        token=get["TOKEN"],
        org=get["ORG"],
        pg_url=pg_url,
        bucket=values["INFLUX_BUCKET"],
        measurement=values["INFLUX_MEASUREMENT"],
        every=values["AGGREGATE_EVERY"],
        table=table,
        query_timeout=numbers["QUERY_TIMEOUT"],
        catch_up_hours=int(numbers["CATCH_UP_HOURS"]),
        settle=timedelta(minutes=numbers["SETTLE_MINUTES"]),
        lock_timeout=numbers["LOCK_TIMEOUT"],
        retry_budget=numbers["RETRY_BUDGET"],
        recheck_hours=int(numbers["RECHECK_HOURS"]),
        query_language=language,
        retention_policy=values["INFLUX_RETENTION_POLICY"],
        retention_hours=int(numbers["INFLUX_RETENTION_HOURS"]),
        ping_url=values["PING_URL"],
        metrics_file=values["METRICS_FILE"],
    )


def url_problems(url: str) -> list[str]:
    """What is wrong with CONNECTION, if anything: a bad port is a setting, not a network fault."""
    from urllib.parse import urlsplit

    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s]*)?", url):
        return ["CONNECTION must be an http:// or https:// URL"]
    try:
        port = urlsplit(url).port
    except ValueError:
        port = -1
    if port == -1 or port == 0:
        return ["CONNECTION has a port that is not a number from 1 to 65535"]
    return []


def latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def userinfo_secrets(url: str) -> list[str]:
    """The password (and the whole user:password) in a URL such as http://user:pw@host:8086."""
    from urllib.parse import unquote, urlsplit

    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    password = userinfo.partition(":")[2]
    return [s for s in (userinfo if password else "", password, unquote(password)) if s]


def ping_secrets(url: str) -> list[str]:
    """A ping URL's path is a credential: anyone who holds it can ping."""
    from urllib.parse import urlsplit

    path = urlsplit(url).path.strip("/") if url else ""
    return [s for s in (url.rstrip("/"), path) if s]


def without_userinfo(url: str) -> str:
    """The URL as lines may show it: no user or password."""
    return re.sub(r"^(https?://)[^/@]*@", r"\1", url)


def number(text: str) -> float | None:
    """A finite number, or None: `inf` and `nan` are not settings anyone means."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def duration_ns(text: str) -> int | None:
    """Nanoseconds in a duration like `5s` or `1m30s` that divides an hour, or None.

    Windows are aligned to the epoch and clipped at the query's range, so a width that does
    not divide the hour would cut a reading's window differently in an hour's query and in
    a day's, and a table loaded both ways would count it twice.
    """
    parts = DURATION_PART.findall(text)
    if not parts or "".join(n + unit for n, unit in parts) != text:
        return None
    total = sum(int(n) * DURATION_NS[unit] for n, unit in parts)
    hour = 3600 * 10**9
    return total if 10**9 <= total <= hour and hour % total == 0 else None


def postgres_url(text: str) -> str:
    """The URL with psycopg2 named as its driver.

    SQLAlchemy 2.1 made psycopg (3) the default for `postgresql://`, so the blog's URL
    would look for a driver that requirements.txt does not install.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(text)
    except ArgumentError:
        raise ValueError("is not a URL like postgresql://user:password@host:5432/database") from None
    if "@" in (url.host or "") or "@" in (url.username or ""):
        raise ValueError("has more than one @ before the host: percent-encode an @ in the user or password as %40")
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql:// URL")
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        url = url.set(drivername="postgresql+psycopg2")
    else:
        raise ValueError(f"names the driver {url.drivername!r}; use postgresql://")
    return url.render_as_string(hide_password=False)


def read_env_files(paths: Iterable[Path]) -> dict[str, str]:
    """Settings from the .env files that exist; earlier paths win."""
    from dotenv import dotenv_values

    merged: dict[str, str] = {}
    for path in reversed(list(paths)):
        if path.is_file():
            try:
                values = dotenv_values(path, encoding="utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{path} is not UTF-8 text: save it as UTF-8") from None
            except OSError as exc:
                raise ConfigError(f"cannot read {path} ({exc.strerror}): check its owner and mode") from None
            merged.update({k: v for k, v in values.items() if v is not None})
    return merged


# -- Pure: windows, query, transform ----------------------------------------------------
@dataclass(frozen=True)
class Window:
    """The hours [start, stop); their 5-second means are stamped in (start, stop]."""

    start: datetime
    stop: datetime

    def hours(self) -> list[datetime]:
        count = int((self.stop - self.start) / HOUR)
        return [self.start + i * HOUR for i in range(count)]

    def __str__(self) -> str:
        return f"{iso(self.start)}..{iso(self.stop)}"


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def hour_floor(moment: datetime) -> datetime:
    """The hour `moment` falls in, as a plain UTC datetime (whatever datetime class came in)."""
    utc = moment.astimezone(timezone.utc)
    return datetime(utc.year, utc.month, utc.day, utc.hour, tzinfo=timezone.utc)


def latest_complete_hour(now: datetime, settle: timedelta = timedelta(0)) -> datetime:
    """The newest hour whose end is at least `settle` before `now` (a timezone-aware clock)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return hour_floor(now - settle) - HOUR


def previous_hour(now: datetime) -> Window:
    """The last complete UTC hour before `now`, [H, H+1h)."""
    start = latest_complete_hour(now)
    return Window(start, start + HOUR)


def complete_hours(now: datetime, settle: timedelta, count: int) -> list[datetime]:
    """The `count` newest complete hours, oldest first."""
    latest = latest_complete_hour(now, settle)
    return [latest - i * HOUR for i in reversed(range(count))]


def missing_hours(candidates: Iterable[datetime], loaded: Iterable[datetime]) -> list[datetime]:
    done = set(loaded)
    return [hour for hour in candidates if hour not in done]


def parse_hour(text: str) -> datetime:
    """`2021-07-12T14`, `2021-07-12T14:00`, `2021-07-12T14:00:00Z`: always UTC, on the hour."""
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2})[T ](\d{2})(?::00(?::00)?)?(?:Z|\+00:?00)?", text.strip())
    if not match:
        raise ConfigError(f"{text!r} is not an hour like 2021-07-12T14 or 2021-07-12T14:00:00Z")
    try:
        return datetime.strptime(f"{match[1]}T{match[2]}", "%Y-%m-%dT%H").replace(tzinfo=timezone.utc)
    except ValueError:
        raise ConfigError(f"{text!r} is not a valid date and hour") from None


def chunked(hours: Sequence[datetime], max_hours: int = MAX_CHUNK_HOURS) -> list[Window]:
    """Windows covering `hours`: contiguous runs, each at most `max_hours` long."""
    windows: list[Window] = []
    for hour in sorted(set(hours)):
        last = windows[-1] if windows else None
        if last and last.stop == hour and len(last.hours()) < max_hours:
            windows[-1] = Window(last.start, hour + HOUR)
        else:
            windows.append(Window(hour, hour + HOUR))
    return windows


def flux_string(value: str) -> str:
    """`value` as a Flux string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return f'"{escaped}"'


def flux_query(settings: Settings, window: Window) -> str:
    """The blog's pipeline: 5-second means of every field, one column per field."""
    return (
        f"from(bucket: {flux_string(settings.bucket)})\n"
        f"  |> range(start: {iso(window.start)}, stop: {iso(window.stop)})\n"
        f"  |> filter(fn: (r) => r._measurement == {flux_string(settings.measurement)})\n"
        f"  |> aggregateWindow(every: {settings.every}, fn: mean, createEmpty: false)\n"
        '  |> drop(columns: ["_start", "_stop", "_measurement", "uid"])\n'
        '  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")\n'
    )


def influxql_identifier(name: str) -> str:
    """`name` as a double-quoted InfluxQL identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def influxql_duration(nanoseconds: int) -> str:
    """An InfluxQL duration literal: one number and one unit (InfluxQL has no `1m30s`)."""
    for unit, size in (("h", 3600 * 10**9), ("m", 60 * 10**9), ("s", 10**9), ("ms", 10**6), ("u", 10**3)):
        if nanoseconds % size == 0:
            return f"{nanoseconds // size}{unit}"
    return f"{nanoseconds}ns"


def influxql_query(settings: Settings, window: Window) -> str:
    """The same means as the Flux pipeline; the database and retention policy go as parameters."""
    return (
        f"SELECT mean(*) FROM {influxql_identifier(settings.measurement)}"
        f" WHERE time >= '{iso(window.start)}' AND time < '{iso(window.stop)}'"
        f" GROUP BY time({influxql_duration(duration_ns(settings.every) or 0)}) fill(none)"
    )


# InfluxDB answers in annotated CSV, one block per table schema, CRLF line ends:
#
#   #datatype,string,long,dateTime:RFC3339,double,double
#   #group,false,false,false,false,false
#   #default,_result,,,,
#   ,result,table,_time,pulse,spo2
#   ,,0,2021-07-12T14:00:05Z,71.5,97
#   ,,0,2021-07-12T14:00:10Z,,98.25
#   <empty line>
#
# A failure after the first byte arrives as one more block, `,error,reference`.
NUMERIC_TYPES = {"double", "long", "unsignedLong"}
META_COLUMNS = ("result", "table")


@dataclass(frozen=True)
class Block:
    datatypes: dict[str, str]
    group: dict[str, bool]
    header: list[str]
    data: bytes


def split_blocks(body: bytes) -> list[Block]:
    """The annotated-CSV blocks of an answer; raises on an error block or a cut-off answer."""
    text = body.replace(b"\r\n", b"\n")
    if not text.strip():
        return []
    blocks = []
    for chunk in re.split(rb"\n\n+", text.strip(b"\n")):
        lines = chunk.split(b"\n")
        annotations = {}
        while lines and lines[0].startswith(b"#"):
            row = next(csv.reader([lines.pop(0).decode()]))
            annotations[row[0]] = row[1:]
        if not lines:
            if not text.endswith(b"\n\n"):
                raise IncompleteAnswer("InfluxDB's answer ended early (cut off in a table's annotations)")
            raise SourceError("InfluxDB sent an annotation block without a header")
        header = next(csv.reader([lines[0].decode()]))[1:]
        if header[:2] == ["error", "reference"]:
            rows = list(csv.reader(line.decode() for line in lines[1:]))
            message = rows[0][1] if rows and len(rows[0]) > 1 else "unknown error"
            raise SourceError(f"InfluxDB query failed: {message}")
        datatypes = annotations.get("#datatype", [])
        groups = annotations.get("#group", [])
        blocks.append(
            Block(
                datatypes=dict(zip(header, datatypes[1:] if len(datatypes) > len(header) else datatypes)),
                group=dict(zip(header, (g == "true" for g in groups))),
                header=header,
                data=b"\n".join(lines[1:]),
            )
        )
    if not text.endswith(b"\n\n"):
        raise IncompleteAnswer("InfluxDB's answer ended early (cut off mid-table)")
    return blocks


def frame_from_block(block: Block) -> pd.DataFrame:
    """One block as a DataFrame: `_time` as UTC datetimes, numeric fields as floats."""
    import pandas as pd

    if "_time" not in block.header:
        raise SourceError("InfluxDB's answer has no _time column; check the query")
    # The meta columns come first; a field may be called `result` or `table` too (flux#3161).
    meta = [f"\0{c}" for c in block.header[:2]] if tuple(block.header[:2]) == META_COLUMNS else []
    columns = block.header[len(meta) :]
    fields = [c for c in columns if c != "_time" and not block.group.get(c)]
    wrong = [f for f in fields if block.datatypes.get(f) not in NUMERIC_TYPES]
    if wrong:
        raise DataError(f"field {wrong[0]!r} is {block.datatypes.get(wrong[0])}, not a number; only numeric fields can be averaged")
    names = ["", *meta, *columns]
    frame = pd.read_csv(
        io.BytesIO(block.data),
        header=None,
        names=names,
        usecols=["_time", *fields],
        dtype={"_time": str, **{f: "float64" for f in fields}},
        keep_default_na=False,
        na_values={f: ["", "NaN"] for f in fields},
        **exact_floats(),
    )
    try:
        frame["_time"] = pd.to_datetime(frame["_time"], format="ISO8601", utc=True)
    except (ValueError, TypeError):
        raise SourceError("InfluxDB sent a _time value that is not an RFC3339 time") from None
    return frame


def exact_floats() -> dict[str, str]:
    """read_csv's option for exactly rounded floats: pandas before 3 reads some 17-digit values
    one ulp off by default (and Flux's CSV would then differ from InfluxQL's JSON); pandas 3
    reads them exactly and deprecates the option."""
    import pandas as pd

    return {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}


def read_answer(body: bytes) -> pd.DataFrame:
    """All blocks of an answer, combined into one frame of `_time` and field columns."""
    import pandas as pd

    frames = [frame_from_block(block) for block in split_blocks(body)]
    if not frames:
        return pd.DataFrame({"_time": pd.Series([], dtype="datetime64[ns, UTC]")})
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


# InfluxQL answers in JSON. With chunked=true it sends one document per line, and all but
# the last say "partial"; each mean is stamped with its window's start:
#
#   {"results":[{"statement_id":0,"series":[{"name":"spo2","columns":["time","mean_pulse","mean_spo2"],
#     "values":[[1626098400000000000,61.5,91.5],[1626098405000000000,63,null]],"partial":true}],"partial":true}]}
#   {"results":[{"statement_id":0,"series":[{"name":"spo2","columns":["time","mean_pulse","mean_spo2"],
#     "values":[[1626101995000000000,64,94]]}]}]}
#
# A statement error (an unknown database, say) comes inside a 200 answer:
#   {"results":[{"statement_id":0,"error":"database not found: nosuchdb"}]}
# and no data is a result without "series": {"results":[{"statement_id":0}]}
def influxql_documents(body: bytes) -> list[dict]:
    """The answer's JSON documents; raises on an error, a cut-off answer, or a partial one."""
    documents = []
    for line in body.splitlines():
        if line.strip():
            try:
                documents.append(json.loads(line))
            except ValueError:
                raise IncompleteAnswer("InfluxDB's answer ended early (cut off mid-line)") from None
    if not documents:
        raise IncompleteAnswer("InfluxDB's answer was empty")
    for document in documents:
        if document.get("error"):
            raise SourceError(f"InfluxDB query failed: {document['error']}")
        for result in document.get("results") or []:
            if result.get("error"):
                hint = ": check INFLUX_BUCKET (the database)" if "database not found" in result["error"] else ""
                raise SourceError(f"InfluxDB query failed: {result['error']}{hint}")
    last = documents[-1].get("results") or [{"partial": True}]
    if any(result.get("partial") or any(series.get("partial") for series in result.get("series") or []) for result in last):
        # Also what a server with max-row-limit sends: never store part of an answer.
        raise IncompleteAnswer("InfluxDB's answer ended early (its last part says more was to come)")
    return documents


def read_influxql_answer(body: bytes, every_ns: int, window: Window) -> pd.DataFrame:
    """The answer as a frame of `_time` and field columns, stamped as Flux stamps them.

    InfluxQL stamps a window's mean with the window's start, Flux's aggregateWindow with its
    (clipped) stop: shifting by `every` makes hour H hold the times in (H, H+1h] either way.
    """
    import numpy as np
    import pandas as pd

    frames = []
    for document in influxql_documents(body):
        for result in document.get("results") or []:
            for series in result.get("series") or []:
                columns = series.get("columns") or []
                if columns[:1] != ["time"] or not all(c.startswith("mean_") for c in columns[1:]):
                    raise SourceError(f"InfluxDB's answer has the columns {columns}, not time and mean_<field>: check the query")
                if series.get("values"):
                    frames.append(pd.DataFrame(series["values"], columns=["_time", *(c[len("mean_") :] for c in columns[1:])]))
    if not frames:
        return pd.DataFrame({"_time": pd.Series([], dtype="datetime64[ns, UTC]")})
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    stop = int(window.stop.timestamp()) * 10**9
    stamps = np.minimum(epoch_ns(frame["_time"]) + every_ns, stop)
    fields = frame.columns.drop("_time")
    frame = frame.astype(dict.fromkeys(fields, "float64"))
    frame["_time"] = pd.to_datetime(stamps, unit="ns", utc=True)
    return frame


def epoch_ns(times: pd.Series):
    """Nanoseconds since the epoch, from integers (epoch=ns) or RFC3339 strings (a server that ignores epoch)."""
    import pandas as pd

    if pd.api.types.is_integer_dtype(times):
        return times.to_numpy("int64")
    try:
        return pd.to_datetime(times, format="ISO8601", utc=True).astype("datetime64[ns, UTC]").to_numpy("datetime64[ns]").view("int64")
    except (ValueError, TypeError):
        raise SourceError("InfluxDB sent a time that is neither epoch nanoseconds nor an RFC3339 time") from None


def clean(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows ready to store: `time` in UTC, sorted and unique, fields as floats."""
    frame = frame.rename(columns={"_time": "time", **column_names(list(frame.columns.drop("_time")))})
    frame = frame.sort_values("time", kind="stable", ignore_index=True)
    reject_repeated_times(frame)
    return blank_non_finite(frame)


MAX_COLUMN_BYTES = 63  # PostgreSQL cuts longer names (NAMEDATALEN - 1)


def column_name(field_key: str) -> str:
    """The column PostgreSQL will make of a field's name: at most 63 bytes, whole characters."""
    encoded = field_key.encode()
    if len(encoded) <= MAX_COLUMN_BYTES:
        return field_key
    return encoded[:MAX_COLUMN_BYTES].decode(errors="ignore")


def column_names(fields: Sequence[str]) -> dict[str, str]:
    """Field -> column; two fields that would share a column (or take `time`) are a DataError."""
    owners: dict[str, str] = {"time": "the time column"}
    for field_key in fields:
        column = column_name(field_key)
        if column in owners:
            raise DataError(
                f"field {field_key!r} would be stored in column {column!r}, which {owners[column]} already takes: "
                "rename the field in InfluxDB (PostgreSQL keeps 63 bytes of a name)"
            )
        owners[column] = f"field {field_key!r}"
    return {f: column_name(f) for f in fields if column_name(f) != f}


def reject_repeated_times(frame: pd.DataFrame) -> None:
    repeated = frame["time"][frame["time"].duplicated()]
    if len(repeated):
        raise DataError(
            f"time {iso(repeated.iloc[0].to_pydatetime())} appears more than once in InfluxDB's answer: "
            "the measurement has a tag besides uid (keep one device per measurement)"
        )


def blank_non_finite(frame: pd.DataFrame) -> pd.DataFrame:
    """NaN and ±Inf become empty cells, which PostgreSQL stores as NULL."""
    return frame.replace([math.inf, -math.inf], math.nan)


def hour_of(times: pd.Series) -> pd.Series:
    """The hour each time belongs to: hour H holds the times in (H, H+1h]."""
    import pandas as pd

    return (times - pd.Timedelta(1, "us")).dt.floor("h")


def per_hour(times: pd.Series, window: Window) -> dict[datetime, int]:
    """How many of `times` fall in each hour of the window (hour H: (H, H+1h])."""
    import numpy as np

    hours = window.hours()
    micros = times.to_numpy(dtype="datetime64[us]").view("int64")
    index = (micros - 1 - int(window.start.timestamp()) * 10**6) // (3600 * 10**6)
    counts = np.bincount(index[(index >= 0) & (index < len(hours))], minlength=len(hours))
    return dict(zip(hours, counts.tolist()))


def rows_per_hour(frame: pd.DataFrame, window: Window) -> dict[datetime, int]:
    """How many rows belong to each hour of the window."""
    return per_hour(frame["time"], window)


@dataclass(frozen=True)
class HourCheck:
    """One hour of InfluxDB's answer compared with the rows the table holds."""

    answered: int  # rows in InfluxDB's answer
    stored: int  # rows in the table
    missing: int = 0  # answered times the table lacks
    changed: int = 0  # times whose values differ
    kept: int = 0  # stored times the answer lacks: InfluxDB forgot or deleted them
    frozen: int = 0  # times that differ where InfluxDB is forgetting: its answer holds fewer readings
    copies: int = 0  # extra rows that repeat a stored row exactly: one reading, stored twice
    conflicting: int = 0  # times stored more than once with different values: left for the user

    @property
    def differs(self) -> bool:
        """Whether reloading the hour would change it."""
        return bool(self.missing or self.changed or self.copies)

    @property
    def wrong(self) -> bool:
        """Whether the table lacks or contradicts what InfluxDB still holds."""
        return bool(self.missing or self.changed or self.conflicting)

    @property
    def left(self) -> int:
        """Stored rows that stay although the answer lacks or contradicts them."""
        return self.kept + self.frozen


@dataclass(frozen=True)
class Comparison:
    """A window's answer against its stored rows: per hour, and the times a load must not rewrite."""

    checks: dict[datetime, HourCheck]
    held: pd.Series  # answered times whose stored rows stay as they are (frozen or conflicting)


def compare_hours(
    answer: pd.DataFrame,
    stored: pd.DataFrame,
    window: Window,
    frozen_before: datetime | None = None,
    kinds: Mapping[str, str] | None = None,
    rel_tol: float = 1e-9,
    abs_tol: float = 1e-12,
) -> Comparison:
    """Each hour of the window: how the stored rows differ from the answer's.

    A field that one side lacks counts as NULL there; NULL equals NULL. The answer is
    compared as the column stores it (a `real` column keeps a float's first 24 bits). A
    stored row stamped before `frozen_before` is never called changed: InfluxDB has begun to
    forget its window, so its answer there is the mean of fewer readings than the row's.
    """
    import numpy as np
    import pandas as pd

    if stored.empty:  # the common case of a first load: every answered row is missing
        answered = per_hour(answer["time"], window)
        return Comparison({hour: HourCheck(answered=n, stored=0, missing=n) for hour, n in answered.items()}, answer["time"].iloc[:0])
    fields = sorted((set(answer.columns) | set(stored.columns)) - {"time"})
    ours, theirs = (f.reindex(columns=["time", *fields]).astype({"time": "datetime64[us, UTC]"}) for f in (answer, stored))
    repeated = theirs["time"].duplicated(keep=False)
    # Hashing whole rows costs a load that re-reads a day; only a repeated time can have copies.
    copies = theirs.duplicated(keep="first") & repeated if repeated.any() else repeated
    distinct = theirs[~copies]
    conflicting = distinct["time"][distinct["time"].duplicated(keep=False)].drop_duplicates()
    side = "\0side"  # a name no column can take
    both = ours.merge(distinct.drop_duplicates("time"), on="time", how="outer", suffixes=("", "\0stored"), indicator=side)
    differs = np.zeros(len(both), dtype=bool)
    for name in fields:
        a = as_column_stores(both[name].to_numpy("float64"), (kinds or {}).get(name, "double precision"))
        b = both[name + "\0stored"].to_numpy("float64")
        differs |= ~((np.isnan(a) & np.isnan(b)) | np.isclose(a, b, rtol=rel_tol, atol=abs_tol))
    in_both = (both[side] == "both").to_numpy()
    is_conflicting = both["time"].isin(conflicting).to_numpy()
    frozen = in_both & differs & ~is_conflicting
    if frozen_before is not None:
        frozen &= (both["time"] < pd.Timestamp(frozen_before)).to_numpy()
    else:
        frozen[:] = False
    counts = {
        "answered": per_hour(ours["time"], window),
        "stored": per_hour(theirs["time"], window),
        "missing": per_hour(both["time"][(both[side] == "left_only").to_numpy()], window),
        "changed": per_hour(both["time"][in_both & differs & ~frozen & ~is_conflicting], window),
        "kept": per_hour(distinct["time"][~distinct["time"].isin(ours["time"])], window),
        "frozen": per_hour(both["time"][frozen], window),
        "copies": per_hour(theirs["time"][copies], window),
        "conflicting": per_hour(conflicting, window),
    }
    checks = {hour: HourCheck(**{name: per[hour] for name, per in counts.items()}) for hour in window.hours()}
    held = both["time"][frozen | (in_both & is_conflicting)]
    return Comparison(checks, held)


def as_column_stores(values, kind: str):
    """Float values as a column of `kind` would give them back."""
    import numpy as np

    if kind == "real":
        return values.astype("float32").astype("float64")
    if kind in ("integer", "bigint", "smallint"):
        return np.rint(values)
    scale = re.fullmatch(r"numeric\(\d+,(\d+)\)", kind)
    return np.round(values, int(scale[1])) if scale else values


# -- I/O edges: InfluxDB --------------------------------------------------------------
TRANSIENT_STATUS = {429, 500, 502, 503, 504}


class FluxSource:
    """InfluxDB 2 and InfluxDB Cloud (TSM): Flux over /api/v2/query, through influxdb-client."""

    dialect = "flux"
    clock_skew: float | None = None

    def __init__(self, settings: Settings) -> None:
        from influxdb_client import InfluxDBClient

        self.settings = settings
        self.client = InfluxDBClient(
            url=settings.influx_url, token=settings.token, org=settings.org, timeout=int(settings.query_timeout * 1000), verify_ssl=True
        )
        self.api = self.client.query_api()

    def query(self, window: Window) -> str:
        return flux_query(self.settings, window)

    def fetch(self, query: str) -> bytes:
        """One try at the raw annotated CSV; failures say whether a retry may help."""
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            response = self.api.query_raw(query, org=self.settings.org)
            self.clock_skew = clock_skew(response.headers.get("Date"))
            return response.data
        except ApiException as exc:
            if exc.status == 0:  # influxdb-client's word for a TLS failure; urllib3's reason is its last line
                last = [line.strip() for line in str(exc.reason or "").splitlines() if line.strip()][-1:]
                raise SourceError(
                    f"InfluxDB could not be reached securely ({' '.join(last)}): check CONNECTION and the server's certificate"
                ) from None
            raise status_error(exc.status, exc.body or exc.message or exc.reason, exc.retry_after, self.dialect) from None
        except HTTPError as exc:
            raise unreachable(self.settings, exc) from None

    def read(self, body: bytes, window: Window) -> pd.DataFrame:
        return read_answer(body)

    def non_numeric_fields(self, window: Window) -> list[str]:
        """Fields whose values are strings or booleans: one table per series, typed by #datatype."""
        fields = set()
        for block in split_blocks(self.fetch(field_types_query(self.settings, window))):
            if block.datatypes.get("_value") in ("string", "boolean") and "_field" in block.header:
                column = block.header.index("_field") + 1
                fields.update(row[column] for row in csv.reader(block.data.decode().splitlines()) if len(row) > column)
        return sorted(fields)

    def close(self) -> None:
        self.client.close()


class InfluxQLSource:
    """InfluxDB 1.x, InfluxDB 3 and Cloud Serverless or Dedicated (and 2.x through a DBRP
    mapping): InfluxQL over the v1 /query API, through urllib3 (installed with influxdb-client)."""

    dialect = "influxql"
    clock_skew: float | None = None

    def __init__(self, settings: Settings) -> None:
        import urllib3

        self.settings = settings
        timeout = urllib3.Timeout(connect=settings.query_timeout, read=settings.query_timeout)
        self.pool = urllib3.PoolManager(retries=False, timeout=timeout)
        self.headers = {"Accept": "application/json", "Accept-Encoding": "gzip", **influxql_auth(settings.token)}

    def query(self, window: Window) -> str:
        return influxql_query(self.settings, window)

    def fetch(self, query: str) -> bytes:
        """One try at the JSON answer (chunked: one document per line); JSON, because with
        CSV InfluxDB 1.x answers a statement error with an empty 200."""
        from urllib3.exceptions import HTTPError

        params = {"db": self.settings.bucket, "q": query, "epoch": "ns", "chunked": "true"}
        if self.settings.retention_policy:
            params["rp"] = self.settings.retention_policy
        try:
            response = self.pool.request("GET", self.settings.influx_url + "/query", fields=params, headers=self.headers)
        except HTTPError as exc:
            raise unreachable(self.settings, exc) from None
        if response.status != 200:
            raise status_error(response.status, response.data or response.reason, response.headers.get("Retry-After"), self.dialect)
        self.clock_skew = clock_skew(response.headers.get("Date"))
        return response.data

    def read(self, body: bytes, window: Window) -> pd.DataFrame:
        return read_influxql_answer(body, duration_ns(self.settings.every) or 0, window)

    def non_numeric_fields(self, window: Window) -> list[str]:
        """Fields that SHOW FIELD KEYS types as string or boolean."""
        answer = influxql_documents(self.fetch(f"SHOW FIELD KEYS FROM {influxql_identifier(self.settings.measurement)}"))
        rows = [
            row for doc in answer for result in doc["results"] for series in result.get("series", []) for row in series.get("values", [])
        ]
        return sorted(name for name, kind in rows if kind in ("string", "boolean"))

    def close(self) -> None:
        self.pool.clear()


def clock_skew(date: str | None) -> float | None:
    """How far InfluxDB's clock (its answer's Date header) runs ahead of ours, in seconds."""
    from email.utils import parsedate_to_datetime

    try:  # the header counts whole seconds, so it reads up to a second early: round up
        return math.ceil(parsedate_to_datetime(date).timestamp() - time.time()) if date else None
    except (TypeError, ValueError):
        return None


def open_source(settings: Settings) -> FluxSource | InfluxQLSource:
    return InfluxQLSource(settings) if settings.query_language == "influxql" else FluxSource(settings)


def influxql_auth(token: str) -> dict[str, str]:
    """`user:password` (InfluxDB 1.x) goes as Basic auth, which every version takes; before 1.8,
    InfluxDB refuses `Token user:password`. An API token goes as `Token`; none, as nothing."""
    from base64 import b64encode

    if not token:
        return {}
    if ":" in token:
        return {"Authorization": "Basic " + b64encode(token.encode()).decode()}
    return {"Authorization": f"Token {token}"}


REFUSED_TRIES = 3


def unreachable(settings: Settings, exc: BaseException) -> SourceError:
    """A refused, reset, timed-out or cut-off connection (worth a retry), or a TLS failure (not)."""
    from urllib3.exceptions import NewConnectionError, SSLError

    cause = exc
    while getattr(cause, "reason", None) is not None and isinstance(cause.reason, BaseException):
        cause = cause.reason
    if isinstance(cause, SSLError) or isinstance(exc, SSLError):
        return SourceError(f"InfluxDB could not be reached securely ({reason(exc)}): check CONNECTION and the server's certificate")
    # A refused connection or an unknown host answers at once, and the same way for minutes:
    # three tries tell a blip from a wrong port, and the next cron call tries again.
    refused = isinstance(cause, NewConnectionError) or isinstance(exc, NewConnectionError)
    return TransientSourceError(
        f"InfluxDB at {without_userinfo(settings.influx_url)} did not answer ({reason(exc)}): check CONNECTION and the network",
        tries=REFUSED_TRIES if refused else None,
    )


@dataclass
class Retrier:
    """Bounded, jittered exponential backoff; one budget of waiting for a whole run.

    Both the waiting and the tries are bounded: a server that answers `Retry-After: 0`
    forever must not keep a run (and its lock) spinning. `stop()` ends a pending wait.
    """

    budget: float
    sleep: Callable[[float], None] | None = None
    jitter: Callable[[], float] = random.random
    base: float = 1.0
    cap: float = 60.0
    floor: float = 0.5
    max_tries: int = 10
    spent: float = 0.0
    stopped: threading.Event = field(default_factory=threading.Event)
    speaking: threading.Lock = field(default_factory=threading.Lock)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return max(self.floor, retry_after)
        return max(self.floor, min(self.cap, self.base * 2**attempt) * (0.5 + self.jitter() / 2))

    def stop(self) -> None:
        """End a pending wait. Once this returns, no retry of this run logs another word: a
        scheduler (or a test) that goes on must not hear from a run that has ended."""
        with self.speaking:
            self.stopped.set()

    def call(self, action: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return action()
            except TransientSourceError as exc:
                tries = f"{attempt + 1} tries" if attempt else "1 try"
                delay = self.delay(attempt, exc.retry_after)
                if exc.retry_after is not None and exc.retry_after > self.budget - self.spent:
                    raise SourceError(
                        f"{exc}; gave up after {tries}: InfluxDB asked to wait {exc.retry_after:g}s, "
                        f"more than is left of RETRY_BUDGET {self.budget:g}s"
                    ) from None
                if self.spent + delay > self.budget:
                    raise SourceError(f"{exc}; gave up after {tries} (RETRY_BUDGET {self.budget:g}s)") from None
                if attempt + 1 >= min(self.max_tries, exc.tries or self.max_tries):
                    raise SourceError(f"{exc}; gave up after {tries}") from None
                attempt += 1
                with self.speaking:
                    if self.stopped.is_set():
                        raise SourceError(f"{exc}; the run ended before a retry") from None
                    log.warning("%s; retry %d in %.1fs", exc, attempt, delay)
                (self.sleep or self.stopped.wait)(delay)
                self.spent += delay
                if self.stopped.is_set():
                    raise SourceError(f"{exc}; the run ended before a retry") from None


def seconds_or_none(text: str | None) -> float | None:
    value = number(text) if text else None
    return value if value is not None and value >= 0 else None


SOURCE_ERRORS = {  # status: (what happened, what to check with Flux, with InfluxQL)
    400: (
        "InfluxDB rejected the query",
        ": check ORG, INFLUX_BUCKET, INFLUX_MEASUREMENT and AGGREGATE_EVERY",
        ": check INFLUX_MEASUREMENT and AGGREGATE_EVERY",
    ),
    401: ("InfluxDB refused the token", ": check TOKEN in .env", ": check TOKEN in .env (an API token, or user:password for InfluxDB 1.x)"),
    403: (
        "InfluxDB denied access",
        ": check that TOKEN may read INFLUX_BUCKET",
        # InfluxDB 1.x answers an unknown database with 403 to a user who is not an admin
        ": check that the database INFLUX_BUCKET exists and that TOKEN may read it",
    ),
    404: ("InfluxDB found no such bucket or organization", ": check INFLUX_BUCKET and ORG", ": check CONNECTION (no /query there)"),
    429: ("InfluxDB is rate-limiting this organization", "", ""),
}
NO_FLUX = re.compile(r"flux.*(not supported|unsupported|disabled|not enabled)|path not found|page not found", re.I)


def status_error(status: int, body: bytes | str | None, retry_after: str | None, dialect: str) -> SourceError:
    """InfluxDB's refusal as one line, typed by whether a retry may help."""
    message = short_reason(body)
    what, flux_hint, influxql_hint = SOURCE_ERRORS.get(
        status, ("InfluxDB had a server error" if status >= 500 else "InfluxDB refused the query", "", "")
    )
    hint = influxql_hint if dialect == "influxql" else flux_hint
    if dialect == "flux" and status in (400, 403, 404, 405, 501) and NO_FLUX.search(message) and "bucket" not in message:
        what, hint = (
            "InfluxDB does not take Flux queries here",
            ": try INFLUX_QUERY_LANGUAGE=influxql (InfluxDB 1.x, 3 and Cloud Serverless)",
        )
    text = f"{what} ({status}: {message}){hint}"
    if status in TRANSIENT_STATUS:
        return TransientSourceError(text, retry_after=seconds_or_none(retry_after))
    return SourceError(text)


def short_reason(body: bytes | str | None) -> str:
    """InfluxDB's own message in an error body: JSON's `message` or `error`; from a gateway's
    HTML page, its title; else the first line. Never a page dump."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and (payload.get("message") or payload.get("error")):
        text = str(payload.get("message") or payload.get("error"))
    elif re.search(r"<(html|head|body|title|h1)\b", text, re.I):
        title = re.search(r"<(title|h1)[^>]*>(.*?)</\1>", text, re.I | re.S)
        text = title[2] if title else re.sub(r"<[^>]+>", " ", text)
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first if len(first) <= 160 else first[:157] + "..."


def reason(exc: BaseException) -> str:
    """A short cause for a urllib3 error, without its nested repr noise."""
    while getattr(exc, "reason", None) is not None and isinstance(exc.reason, BaseException):
        exc = exc.reason
    text = str(exc)
    return text.split(": ", 1)[-1] if "object at 0x" in text else text


def extract_frame(source: FluxSource | InfluxQLSource, window: Window, retrier: Retrier) -> pd.DataFrame:
    """The window's 5-second means, cleaned and ready to store."""
    query = source.query(window)
    try:
        return retrier.call(lambda: clean(source.read(source.fetch(query), window)))
    except SourceError as exc:
        # InfluxDB's own message does not say which field (influxdb#23321): ask for the types.
        if "unsupported input type for mean aggregate" in str(exc):
            fields = retrier.call(lambda: source.non_numeric_fields(window))
            if fields:
                raise DataError(
                    f"field {', '.join(map(repr, fields))} of measurement {source.settings.measurement!r} is not numeric, "
                    "so InfluxDB cannot average it: write it to another measurement"
                ) from None
        raise


def field_types_query(settings: Settings, window: Window) -> str:
    return (
        f"from(bucket: {flux_string(settings.bucket)})\n"
        f"  |> range(start: {iso(window.start)}, stop: {iso(window.stop)})\n"
        f"  |> filter(fn: (r) => r._measurement == {flux_string(settings.measurement)})\n"
        "  |> last()\n"
    )


# -- I/O edges: PostgreSQL ---------------------------------------------------------------
def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def qualified(table: tuple[str, ...]) -> str:
    return ".".join(quote_ident(part) for part in table)


STATEMENT_TIMEOUT = 3600  # seconds: far above any statement's need (a year's rollups on a Pi), short of forever
SESSION_DEFAULTS = {  # PG_CONNECT's own options win over these
    "application_name": "health_metrics_loader",  # pg_stat_activity then says who holds the lock
    # A client whose network vanished would otherwise keep its session, and the lock, until
    # the kernel gives up on the connection: hours, during which every cron call steps aside.
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


def connect_postgres(settings: Settings):
    """A psycopg2 connection with its session pinned to UTC."""
    import psycopg2
    from sqlalchemy.engine import make_url

    # SQLAlchemy reads the URL, query options such as sslmode included; psycopg2 connects.
    # (Loading SQLAlchemy's PostgreSQL dialect just for this would cost the hourly call 50 ms.)
    url = make_url(settings.pg_url)
    params = {**SESSION_DEFAULTS, **url.translate_connect_args(username="user", database="dbname"), **url.query}
    try:
        connection = psycopg2.connect(**params)
    except psycopg2.Error as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL ({pg_reason(exc)}): check PG_CONNECT") from None
    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
        # A table lock held by another session (an ALTER, a LOCK TABLE left open) must fail
        # the run, not hang it while it holds the loader's lock. PG_CONNECT's options win.
        cursor.execute("SELECT current_setting('lock_timeout'), current_setting('statement_timeout')")
        lock_timeout, statement_timeout = cursor.fetchone()
        if lock_timeout == "0":
            cursor.execute("SET lock_timeout = %s", (f"{max(1, round(settings.lock_timeout * 1000))}ms",))
        if statement_timeout == "0":
            cursor.execute("SET statement_timeout = %s", (f"{STATEMENT_TIMEOUT}s",))
    connection.commit()
    return connection


@contextmanager
def database_errors() -> Iterator[None]:
    """PostgreSQL's errors outside a load become one DatabaseError line."""
    import psycopg2

    try:
        yield
    except psycopg2.Error as exc:
        raise DatabaseError(f"PostgreSQL failed ({pg_reason(exc)}): check PG_CONNECT and the server") from None


def pg_reason(exc: BaseException) -> str:
    """The first line of PostgreSQL's (or libpq's) own message."""
    text = (getattr(exc, "pgerror", None) or str(exc)).strip()
    for line in text.splitlines():
        if line.strip():
            return re.sub(r"^(FATAL|ERROR):\s+", "", line.strip())
    return type(exc).__name__


def table_columns(cursor, table: tuple[str, ...]) -> dict[str, str]:
    """The table's columns and their types, empty if it does not exist."""
    cursor.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod)"
        " FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0"
        " AND NOT a.attisdropped ORDER BY a.attnum",
        (qualified(table),),
    )
    return dict(cursor.fetchall())


def ensure_table(cursor, table: tuple[str, ...], fields: Sequence[str], columns: Mapping[str, str] | None = None) -> dict[str, str]:
    """Create the table, or add a column for each new field; returns its columns' types.

    `columns` are the table's columns when the caller has just read them."""
    columns = dict(table_columns(cursor, table) if columns is None else columns)
    if not columns:
        definitions = ", ".join(["time timestamptz PRIMARY KEY", *(f"{quote_ident(f)} double precision" for f in fields)])
        cursor.execute(f"CREATE TABLE {qualified(table)} ({definitions})")
        return {"time": "timestamp with time zone", **dict.fromkeys(fields, "double precision")}
    if "time" not in columns:
        raise DataError(f"table {'.'.join(table)} has no time column; set PG_TABLE to another table")
    for name in fields:
        if name not in columns:
            log.info("new field %s: adding a column to %s", name, ".".join(table))
            cursor.execute(f"ALTER TABLE {qualified(table)} ADD COLUMN {quote_ident(name)} double precision")
            columns[name] = "double precision"
    return columns


BINARY_TYPES = {"timestamp with time zone", "timestamp without time zone", "double precision"}
PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
PGCOPY_TRAILER = b"\xff\xff"


def copy_binary(frame: pd.DataFrame) -> bytes | None:
    """The rows in COPY's binary format, or None if a cell is empty (CSV handles those).

    Building it is a few numpy operations, and PostgreSQL parses it faster than text.
    Each row: field count, then per field its byte length and big-endian value; times
    are microseconds since 2000-01-01 (UTC wall time, right for both timestamp types).
    """
    import numpy as np  # installed with pandas

    fields = list(frame.columns.drop("time"))
    values = frame[fields].to_numpy(dtype="float64")
    if np.isnan(values).any():
        return None
    layout = [("count", ">i2"), ("time_size", ">i4"), ("time", ">i8")]
    for i in range(len(fields)):
        layout += [(f"size{i}", ">i4"), (f"value{i}", ">f8")]
    rows = np.empty(len(frame), dtype=layout)
    rows["count"], rows["time_size"] = 1 + len(fields), 8
    rows["time"] = (frame["time"].to_numpy(dtype="datetime64[us]") - np.datetime64("2000-01-01T00:00:00", "us")).view("int64")
    for i in range(len(fields)):
        rows[f"size{i}"], rows[f"value{i}"] = 8, values[:, i]
    return PGCOPY_HEADER + rows.tobytes() + PGCOPY_TRAILER


def copy_text(frame: pd.DataFrame) -> bytes:
    """The rows as CSV for COPY: an empty cell is NULL, times are UTC.

    Several times faster than DataFrame.to_csv for this shape, which matters on a Pi.
    """
    import numpy as np  # installed with pandas

    stamps = frame["time"].to_numpy(dtype="datetime64[us]")
    whole_seconds = not (stamps.view("int64") % 1_000_000).any()  # shorter text, quicker COPY
    times = np.datetime_as_string(stamps, unit="s" if whole_seconds else "us", timezone="UTC").tolist()
    fields = [["" if v != v else repr(v) for v in frame[c].tolist()] for c in frame.columns.drop("time")]
    return "".join(line + "\n" for line in map(",".join, zip(times, *fields))).encode()


def copy_rows(cursor, table: tuple[str, ...], columns: Sequence[str], data: bytes, binary: bool) -> None:
    """Stream rows into the table with COPY, as CSV or in the binary format."""
    names = ", ".join(quote_ident(c) for c in columns)
    stray = io.StringIO()
    try:
        # When the server ends the connection mid-COPY, psycopg2 2.9 prints the error's chain
        # straight to sys.stderr before raising it; keep that out of the one-line report.
        with redirect_stderr(stray):
            cursor.copy_expert(
                f"COPY {qualified(table)} ({names}) FROM STDIN WITH (FORMAT {'binary' if binary else 'csv'})", io.BytesIO(data)
            )
    finally:
        if stray.getvalue():
            log.debug("psycopg2 printed during COPY: %s", stray.getvalue().strip())


LEDGER = "loaded_hours"


class LedgerEntry(NamedTuple):
    rows: int
    loaded_at: datetime  # when the hour's rows were last written
    checked_at: datetime | None = None  # when they were last compared with InfluxDB
    repaired_at: datetime | None = None  # when a load last changed an hour already recorded


def ledger_of(table: tuple[str, ...]) -> tuple[str, ...]:
    """The ledger lives in the target table's schema."""
    return (*table[:-1], LEDGER)


def ledger_key(table: tuple[str, ...]) -> str:
    return ".".join(table)


def ledger_keys(table: tuple[str, ...]) -> list[str]:
    """The table's key in the ledger, and as older versions spelt it, until a run takes it over."""
    return list(dict.fromkeys([ledger_key(table), table[-1]]))


def resolve_table(connection, table: tuple[str, ...]) -> tuple[str, str]:
    """(schema, table) as PostgreSQL resolves PG_TABLE: `x` and `public.x` get one lock and one ledger."""
    if len(table) == 2:
        return table  # type: ignore[return-value]
    with database_errors(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce((SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = to_regclass(%s)), current_schema())",
            (qualified(table),),
        )
        schema = cursor.fetchone()[0]
    connection.rollback()
    if schema is None:
        raise ConfigError("PostgreSQL's search_path names no schema for PG_TABLE: set PG_TABLE to schema.table")
    return (schema, table[-1])


def ensure_ledger(cursor, table: tuple[str, ...]) -> None:
    """Create the ledger and the tables' record, or bring older ones up to date."""
    # Two loaders starting together on a new database would race in CREATE TABLE IF NOT
    # EXISTS (one fails on pg_type's unique index): one at a time, until this transaction ends.
    cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (DDL_LOCK,))
    ensure_tables_record(cursor, table)
    ledger = qualified(ledger_of(table))
    cursor.execute(
        f"CREATE TABLE IF NOT EXISTS {ledger} ("
        " target_table text NOT NULL, hour timestamptz NOT NULL, rows integer NOT NULL,"
        " loaded_at timestamptz NOT NULL DEFAULT now(), checked_at timestamptz, repaired_at timestamptz,"
        " PRIMARY KEY (target_table, hour))"
    )
    columns = table_columns(cursor, ledger_of(table))
    for column in ("checked_at", "repaired_at"):
        if column not in columns:
            cursor.execute(f"ALTER TABLE {ledger} ADD COLUMN {column} timestamptz")
    if len(table) == 2:  # earlier versions keyed the ledger by PG_TABLE as it was spelt
        cursor.execute(
            f"UPDATE {ledger} old SET target_table = %s WHERE target_table = %s"
            f" AND NOT EXISTS (SELECT 1 FROM {ledger} new WHERE new.target_table = %s AND new.hour = old.hour)",
            (ledger_key(table), table[-1], ledger_key(table)),
        )


def extract_ledger(connection, table: tuple[str, ...], since: datetime | None) -> dict[datetime, LedgerEntry]:
    """Hours from `since` on (or only the newest, for None) that the ledger records."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", (qualified(ledger_of(table)),))
        if cursor.fetchone()[0] is None:
            connection.rollback()
            return {}
        ledger = qualified(ledger_of(table))
        keys = ledger_keys(table)
        columns = table_columns(cursor, ledger_of(table))
        extra = ", ".join(c if c in columns else "NULL::timestamptz" for c in ("checked_at", "repaired_at"))
        if since is None:
            where, params = f"hour = (SELECT max(hour) FROM {ledger} WHERE target_table = ANY(%s))", (keys, keys)
        else:
            where, params = "hour >= %s", (keys, since)
        cursor.execute(
            f"SELECT hour, rows, loaded_at, {extra} FROM {ledger} WHERE target_table = ANY(%s) AND {where} ORDER BY hour", params
        )
        found = {row[0]: LedgerEntry(*row[1:]) for row in cursor.fetchall()}
    connection.rollback()
    return found


def record_hours(
    cursor,
    table: tuple[str, ...],
    counts: Mapping[datetime, int],
    rewritten: Iterable[datetime],
    when: datetime,
    checking: bool = False,
) -> None:
    """Note each hour's rows. `loaded_at` moves only for hours whose rows were written, and
    `repaired_at` for those among them that were recorded before; `checked_at` with `checking`."""
    from psycopg2.extras import execute_values

    rewritten = set(rewritten)
    checked = when if checking else None
    for written in (True, False):
        update = ", loaded_at = EXCLUDED.loaded_at, repaired_at = EXCLUDED.loaded_at" if written else ""
        hours = [(ledger_key(table), hour, rows, when, checked) for hour, rows in counts.items() if (hour in rewritten) == written]
        if hours:
            execute_values(
                cursor,
                f"INSERT INTO {qualified(ledger_of(table))} AS ledger (target_table, hour, rows, loaded_at, checked_at) VALUES %s"
                " ON CONFLICT (target_table, hour) DO UPDATE SET rows = EXCLUDED.rows,"
                f" checked_at = coalesce(EXCLUDED.checked_at, ledger.checked_at){update}",
                hours,
            )


def record_checked(cursor, table: tuple[str, ...], hours: Sequence[datetime], when: datetime) -> None:
    """Note when recorded hours were last compared with InfluxDB; their rows stay untouched.
    (Only --verify calls this, after `run` has made sure the ledger exists.)"""
    cursor.execute(
        f"UPDATE {qualified(ledger_of(table))} SET checked_at = %s WHERE target_table = %s AND hour = ANY(%s::timestamptz[])",
        (when, ledger_key(table), list(hours)),
    )


TABLES = "loader_tables"  # beside the ledger: what the loader knows of each table it fills
DDL_LOCK = "health_metrics_loader:ddl"


def tables_of(table: tuple[str, ...]) -> tuple[str, ...]:
    return (*table[:-1], TABLES)


def ensure_tables_record(cursor, table: tuple[str, ...]) -> None:
    cursor.execute(
        f"CREATE TABLE IF NOT EXISTS {qualified(tables_of(table))} ("
        " target_table text PRIMARY KEY, aggregate_every text NOT NULL, adopted_at timestamptz NOT NULL DEFAULT now(),"
        " fields_checked_at timestamptz, skipped_fields text[] NOT NULL DEFAULT '{}')"
    )


def recorded_every(cursor, table: tuple[str, ...]) -> str | None:
    """The AGGREGATE_EVERY the table's rows were made with, as recorded; None before the first run."""
    cursor.execute("SELECT to_regclass(%s)", (qualified(tables_of(table)),))
    if cursor.fetchone()[0] is None:
        return None
    cursor.execute(f"SELECT aggregate_every FROM {qualified(tables_of(table))} WHERE target_table = %s", (ledger_key(table),))
    found = cursor.fetchone()
    return found[0] if found else None


def has_rows(cursor, table: tuple[str, ...]) -> bool:
    cursor.execute("SELECT to_regclass(%s)", (qualified(table),))
    if cursor.fetchone()[0] is None:
        return False
    cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {qualified(table)})")
    return cursor.fetchone()[0]


def stamped_every_ns(stamps_us: Sequence[int], every_ns: int) -> int | None:
    """The averaging window that stamps (microseconds) certainly come from, when it is not
    `every_ns`: a stamp off its grid proves another window; rows spaced wider than it do not."""
    every_us = every_ns // 1000
    if all(stamp % every_us == 0 for stamp in stamps_us):
        return None
    coarsest = math.gcd(*stamps_us) * 1000  # the widest window whose grid holds every stamp
    return coarsest if duration_ns(influxql_duration(coarsest)) == coarsest else 0


def check_resolution(cursor, table: tuple[str, ...], settings: Settings) -> tuple[str | None, bool]:
    """Refuse an AGGREGATE_EVERY other than the one the table's rows were made with (a table
    of mixed windows would average wrongly ever after); returns the record and whether the
    table holds rows."""
    recorded, filled = recorded_every(cursor, table), has_rows(cursor, table)
    name = ".".join(table)
    if filled and recorded is not None and duration_ns(recorded) != settings.every_ns:
        raise ConfigError(
            f"AGGREGATE_EVERY is {settings.every}, but {name} holds {recorded} means: set AGGREGATE_EVERY={recorded} again, "
            f"or set PG_TABLE to another table for {settings.every} means"
        )
    if filled and recorded is None:
        cursor.execute(
            f"SELECT (extract(epoch FROM time::timestamptz) * 1000000)::bigint FROM {qualified(table)} ORDER BY time DESC LIMIT 1000"
        )
        other = stamped_every_ns([row[0] for row in cursor.fetchall() if row[0] is not None], settings.every_ns)
        if other is not None:
            held = influxql_duration(other).replace("u", "us") if other else "other"
            raise ConfigError(
                f"AGGREGATE_EVERY is {settings.every}, but the rows of {name} are stamped for {held} means: "
                f"set AGGREGATE_EVERY to what made them, or set PG_TABLE to another table for {settings.every} means"
            )
    return recorded, filled


def adopt_table(cursor, table: tuple[str, ...], settings: Settings) -> bool:
    """Check the table's averaging window, and on the first run of this version on a filled
    table, tidy what older versions (or the blog's script) left; returns whether it holds rows."""
    recorded, filled = check_resolution(cursor, table, settings)
    if filled and recorded is None:
        tidy_copies(cursor, table)
    if recorded is None or duration_ns(recorded) != settings.every_ns:
        cursor.execute(
            f"INSERT INTO {qualified(tables_of(table))} (target_table, aggregate_every) VALUES (%s, %s)"
            " ON CONFLICT (target_table) DO UPDATE SET aggregate_every = EXCLUDED.aggregate_every",
            (ledger_key(table), settings.every),
        )
    ensure_rollups_built(cursor, table)
    return filled


def ensure_rollups_built(cursor, table: tuple[str, ...]) -> None:
    """A table that exists without rollups (older versions made it, or the blog's script) gets them."""
    columns = table_columns(cursor, table)
    if columns and not has_rollups(cursor, table):
        build_rollups(cursor, table, columns)


def build_rollups(cursor, table: tuple[str, ...], columns: Mapping[str, str]) -> None:
    """Build the rollups from every raw row, with one line saying how long it took."""
    started = time.monotonic()
    rebuild_rollups(cursor, table, columns)
    cursor.execute(f"SELECT count(*) FROM {qualified(table)}")
    log.info("built the rollups of %s from %s in %.2fs", ".".join(table), plural(cursor.fetchone()[0], "row"), time.monotonic() - started)


def has_unique_time(cursor, table: tuple[str, ...]) -> bool:
    cursor.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
        " WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indnkeyatts = 1 AND a.attname = 'time')",
        (qualified(table),),
    )
    return cursor.fetchone()[0]


def tidy_copies(cursor, table: tuple[str, ...]) -> None:
    """A table without a unique time (the blog's) may hold an hour twice: keep one of each
    identical row, name the times whose copies differ, and once none do, index time uniquely."""
    if has_unique_time(cursor, table):
        return
    name = ".".join(table)
    dropped = drop_identical_copies(cursor, table)
    if dropped:
        log.info("dropped %s of %s that repeated another row exactly", plural(dropped, "row"), name)
    cursor.execute(f"SELECT time::timestamptz FROM {qualified(table)} GROUP BY time HAVING count(*) > 1 ORDER BY time")
    conflicts = [row[0] for row in cursor.fetchall()]
    for hour, times in itertools.groupby(conflicts, key=lambda t: hour_floor(t - timedelta(microseconds=1))):
        times = list(times)
        shown = ", ".join(iso(t) for t in times[:5]) + (f" and {len(times) - 5} more" if len(times) > 5 else "")
        log.warning(
            "%s: %s stores different values for the same time (%s); left as they are: delete the wrong rows by hand", iso(hour), name, shown
        )
    if not conflicts:
        cursor.execute(f"CREATE UNIQUE INDEX ON {qualified(table)} (time)")


class LockBusy(LoaderError):
    exit_code = EXIT_OK


def acquire_lock(connection, table: tuple[str, ...], wait: float | None) -> None:
    """Hold the table's advisory lock for the session; `wait=None` steps aside, `wait=0` fails at once."""
    import psycopg2.errors

    key = f"health_metrics_loader:{ledger_key(table)}"
    name = ledger_key(table)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,))
        if not cursor.fetchone()[0]:
            if not wait:
                connection.rollback()
                if wait is None:
                    raise LockBusy(f"another run is loading {name}; it will catch up, so this one stops here")
                raise DatabaseError(f"another run is loading {name}, and LOCK_TIMEOUT is 0; try again later")
            log.info("another run is loading %s; waiting up to %gs for it (LOCK_TIMEOUT)", name, wait)  # not a silent hang
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(wait * 1000)}ms",))
            try:
                cursor.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
            except psycopg2.errors.LockNotAvailable:
                connection.rollback()
                raise DatabaseError(f"another run kept {name} locked for over {wait:g}s (LOCK_TIMEOUT); try again later") from None
    connection.commit()


def release_lock(connection) -> None:
    """Let go of the table's lock before closing: the server frees a closed session's locks a
    moment later, and a run that starts in that moment would step aside for nobody."""
    import psycopg2

    if connection.closed:
        return
    with suppress(psycopg2.Error):
        connection.rollback()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock_all()")
        connection.commit()


def is_numeric_column(kind: str) -> bool:
    return kind in ("double precision", "real", "integer", "bigint", "smallint") or kind.startswith("numeric")


def extract_stored(cursor, table: tuple[str, ...], columns: Mapping[str, str], window: Window) -> pd.DataFrame:
    """The table's rows in the window: `time`, then each numeric column as floats."""
    import pandas as pd

    fields = [c for c, kind in columns.items() if c != "time" and is_numeric_column(kind)]
    # Microseconds since the epoch as an integer: the quickest exact form to read back.
    select = ", ".join(["(extract(epoch FROM time::timestamptz) * 1000000)::bigint", *(f"{quote_ident(f)}::float8" for f in fields)])
    query = cursor.mogrify(
        f"COPY (SELECT {select} FROM {qualified(table)} WHERE time > %s AND time <= %s) TO STDOUT WITH (FORMAT csv)",
        (window.start, window.stop),
    )
    out = io.BytesIO()
    cursor.copy_expert(query.decode(), out)
    types = {"time": "int64", **dict.fromkeys(fields, "float64")}
    if out.tell():
        frame = pd.read_csv(
            io.BytesIO(out.getvalue()),
            header=None,
            names=list(types),
            dtype=types,
            keep_default_na=False,
            na_values=[""],
            **exact_floats(),
        )
    else:
        frame = pd.DataFrame({name: pd.Series([], dtype=kind) for name, kind in types.items()})
    frame["time"] = pd.to_datetime(frame["time"], unit="us", utc=True)
    return frame


@dataclass(frozen=True)
class Chunk:
    """A window's rows ready to store: the frame and (if it has no empty cell) its binary COPY data."""

    window: Window
    frame: pd.DataFrame
    binary: bytes | None


def prepare_chunk(frame: pd.DataFrame, window: Window) -> Chunk:
    return Chunk(window, frame, copy_binary(frame))


@dataclass(frozen=True)
class Loaded:
    """What a load found and did: each hour compared, the hours rewritten, the rows written."""

    checks: dict[datetime, HourCheck]
    rewritten: list[datetime]
    rows: int
    lacking: list[str] = field(default_factory=list)  # numeric columns of the table that the answer lacks
    created: bool = False  # this load created the table


def load_frame(connection, table: tuple[str, ...], frame: pd.DataFrame, window: Window, **options) -> int:
    """Bring the window's rows in line with `frame` and record its hours; returns rows written."""
    with database_errors(), connection.cursor() as cursor:
        ensure_ledger(cursor, table)
        ensure_rollups_built(cursor, table)
    connection.commit()
    return load_chunk(connection, table, prepare_chunk(frame, window), **options).rows


def load_chunk(
    connection,
    table: tuple[str, ...],
    chunk: Chunk,
    replace: bool = False,
    when: datetime | None = None,
    write: bool = True,
    checking: bool = False,
    frozen_before: datetime | None = None,
) -> Loaded:
    """Compare the chunk's hours with the table and rewrite those that differ, in one transaction.

    A stored row whose time InfluxDB's answer lacks stays, unless `replace`: InfluxDB may
    have forgotten it (retention), and then this table is the only copy left. So does a row
    stamped before `frozen_before`, where InfluxDB's answer is the mean of fewer readings,
    and a time stored twice with different values. With `write=False` nothing but the
    ledger's `checked_at` changes; `checking` (a verify or a repair) notes that time there.
    """
    window, frame = chunk.window, chunk.frame
    when = when or datetime.now(timezone.utc)
    try:
        with connection.cursor() as cursor:
            fields = list(frame.columns.drop("time"))
            existing = table_columns(cursor, table)
            types = ensure_table(cursor, table, fields, existing) if write else existing
            if write and types.keys() != existing.keys():  # a new table or a new field
                ensure_rollups(cursor, table, types)
            stored = extract_stored(cursor, table, types, window) if types else frame.iloc[:0]
            comparison = compare_hours(frame, stored, window, frozen_before, types)
            checks = comparison.checks
            rewritten = [hour for hour, check in checks.items() if check.differs or (replace and check.kept)]
            rows = 0
            if write:
                if any(check.copies for check in checks.values()):
                    drop_identical_copies(cursor, table, window)
                rows = rewrite_hours(cursor, table, chunk, types, {hour: checks[hour] for hour in rewritten}, replace, comparison.held)
                refresh_rollups(cursor, table, types, rewritten)
                counts = {hour: check.answered + (0 if replace else check.kept) for hour, check in checks.items()}
                if any(check.conflicting for check in checks.values()):
                    counts = stored_per_hour(cursor, table, window)
                record_hours(cursor, table, counts, rewritten, when, checking)
            elif checking:
                record_checked(cursor, table, list(checks), when)
        connection.commit()
    except LoaderError:
        connection.rollback()
        raise
    except Exception as exc:
        import psycopg2

        if not isinstance(exc, psycopg2.Error):
            raise
        if not connection.closed:
            with suppress(psycopg2.Error):
                connection.rollback()
        raise load_refused(connection, table, window, exc) from None
    lacking = [c for c, kind in types.items() if c != "time" and is_numeric_column(kind) and c not in frame.columns]
    return Loaded(checks, rewritten, rows, lacking, created=write and not existing)


def load_refused(connection, table: tuple[str, ...], window: Window, exc: BaseException) -> DatabaseError:
    """PostgreSQL's refusal of a load as one line."""
    import psycopg2.errors

    if isinstance(exc, psycopg2.errors.LockNotAvailable):
        return lock_refused(connection, table, f"nothing of {window} was written")
    if isinstance(exc, psycopg2.errors.QueryCanceled):
        return DatabaseError(f"PostgreSQL took too long over the load of {window} ({pg_reason(exc)}); nothing of it was written")
    return DatabaseError(f"PostgreSQL refused the load of {window} ({pg_reason(exc)}); nothing of it was written")


def lock_refused(connection, table: tuple[str, ...], outcome: str) -> DatabaseError:
    """A table lock that outlasted lock_timeout, naming the session that holds it."""
    import psycopg2

    holder = ""
    if not connection.closed:
        with suppress(psycopg2.Error):
            connection.rollback()
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT l.mode, l.pid, a.application_name FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.relation = to_regclass(%s) AND l.granted AND l.pid <> pg_backend_pid() ORDER BY l.mode LIMIT 1",
                    (qualified(table),),
                )
                found = cursor.fetchone()
            connection.rollback()
            if found:
                holder = f" (session {found[1]}, {found[2] or 'no application_name'}, holds {found[0]})"
    return DatabaseError(
        f"another session kept {'.'.join(table)} locked past LOCK_TIMEOUT{holder}; {outcome}, and the next run tries again"
    )


def drop_identical_copies(cursor, table: tuple[str, ...], window: Window | None = None) -> int:
    """Delete rows that repeat another row exactly (the blog's script appended an hour twice
    when it ran twice); returns how many went. Copies that differ in a value stay."""
    within = "" if window is None else cursor.mogrify(" AND a.time > %s AND a.time <= %s", (window.start, window.stop)).decode()
    cursor.execute(
        f"DELETE FROM {qualified(table)} a USING {qualified(table)} b"
        f" WHERE a.time = b.time AND a.ctid > b.ctid AND ROW(a.*) IS NOT DISTINCT FROM ROW(b.*){within}"
    )
    return cursor.rowcount


def stored_per_hour(cursor, table: tuple[str, ...], window: Window) -> dict[datetime, int]:
    """The rows the table holds in each hour of the window (hour H: (H, H+1h])."""
    cursor.execute(
        f"SELECT date_trunc('hour', time::timestamptz - interval '1 microsecond'), count(*) FROM {qualified(table)}"
        " WHERE time > %s AND time <= %s GROUP BY 1",
        (window.start, window.stop),
    )
    found = dict(cursor.fetchall())
    return {hour: found.get(hour, 0) for hour in window.hours()}


def python_times(times: pd.Series) -> list[datetime]:
    """Times as datetimes for psycopg2 (Series.dt.to_pydatetime is deprecated from pandas 2.1 on)."""
    return [moment.to_pydatetime() for moment in times]


def rewrite_hours(
    cursor,
    table: tuple[str, ...],
    chunk: Chunk,
    types: Mapping[str, str],
    hours: Mapping[datetime, HourCheck],
    replace: bool,
    held: pd.Series,
) -> int:
    """Delete the hours' rows and COPY InfluxDB's; returns rows written.

    An hour with rows the answer lacks loses only the rows at the answer's times, and the
    `held` times keep their stored rows whatever the answer says.
    """
    frame = chunk.frame
    if len(held):
        frame = frame[~frame["time"].isin(held)]
    held_hours = set(hour_of(held)) if len(held) else set()
    hour_of_row = hour_of(frame["time"])
    careful = [hour for hour, check in hours.items() if (check.kept and not replace) or hour in held_hours]
    for part in chunked([hour for hour in hours if hour not in careful]):
        cursor.execute(f"DELETE FROM {qualified(table)} WHERE time > %s AND time <= %s", (part.start, part.stop))
    for hour in careful:
        if replace:  # everything but the held rows goes
            times, keep = python_times(held[hour_of(held) == hour]), "NOT "
        else:
            times, keep = python_times(frame["time"][hour_of_row == hour]), ""
        cursor.execute(
            f"DELETE FROM {qualified(table)} WHERE time > %s AND time <= %s AND {keep}time = ANY(%s::timestamptz[])",
            (hour, hour + HOUR, times),
        )
    rows = frame[hour_of_row.isin(list(hours))]
    if len(rows):
        binary = chunk.binary if len(rows) == len(chunk.frame) else copy_binary(rows)
        as_binary = binary is not None and all(types[c] in BINARY_TYPES for c in rows.columns)
        copy_rows(cursor, table, list(rows.columns), binary if as_binary else copy_text(rows), as_binary)
    return len(rows)


# -- PostgreSQL: rollups and the panel functions -------------------------------------------
# Grafana's long ranges would aggregate millions of raw rows per panel. Per UTC minute and
# hour, the loader keeps each field's count, sum, minimum and maximum beside the table, in
# the transaction that writes the rows, so that any coarser bucket's mean, minimum and
# maximum come exact from a few thousand rollup rows.
ROLLUPS = {"_1m": 60, "_5m": 300, "_1h": 3600}  # suffix: seconds; each grain is built from the one before it
AGGREGATES = ("n", "sum", "min", "max")


def suffixed(name: str, suffix: str) -> str:
    """`name` + `suffix` within PostgreSQL's 63 bytes: a long name is cut and told apart by a hash."""
    import hashlib

    if len((name + suffix).encode()) <= MAX_COLUMN_BYTES:
        return name + suffix
    tag = "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
    room = MAX_COLUMN_BYTES - len(tag) - len(suffix.encode())
    return name.encode()[:room].decode(errors="ignore") + tag + suffix


def rollup_of(table: tuple[str, ...], grain: str) -> tuple[str, ...]:
    return (*table[:-1], suffixed(table[-1], grain))


def function_of(table: tuple[str, ...], kind: str) -> tuple[str, ...]:
    return (*table[:-1], suffixed(table[-1], f"_{kind}"))


def rollup_column(field_key: str, aggregate: str) -> str:
    return quote_ident(suffixed(field_key, f"_{aggregate}"))


def rollup_table_sql(table: tuple[str, ...], grain: str, fields: Sequence[str]) -> list[str]:
    """Create the rollup table, and give it columns for fields it lacks (both idempotent).

    The counts are smallint (an hour holds at most 3600 rows) and come after the doubles, so
    that no row pads."""
    rollup = qualified(rollup_of(table, grain))
    kinds = {"n": "smallint NOT NULL DEFAULT 0", "sum": "double precision", "min": "double precision", "max": "double precision"}
    columns = [f"{rollup_column(f, a)} {kinds[a]}" for a in ("sum", "min", "max") for f in fields]
    columns += ["rows smallint NOT NULL", *(f"{rollup_column(f, 'n')} {kinds['n']}" for f in fields)]
    statements = [f"CREATE TABLE IF NOT EXISTS {rollup} (bucket timestamptz PRIMARY KEY, {', '.join(columns)})"]
    for name in fields:
        statements.append(
            f"ALTER TABLE {rollup} " + ", ".join(f"ADD COLUMN IF NOT EXISTS {rollup_column(name, a)} {kinds[a]}" for a in AGGREGATES)
        )
    return statements


def rollup_columns(fields: Sequence[str]) -> str:
    return ", ".join(["bucket", "rows", *(rollup_column(f, a) for f in fields for a in AGGREGATES)])


def refresh_sql(table: tuple[str, ...], fields: Sequence[str], grain: str) -> str:
    """Recompute the grain's buckets from %(start)s to %(stop)s, both included: the minutes from
    the raw rows, each coarser grain from the grain before it. A row stamped on the minute opens
    its bucket, as Grafana groups by floor(epoch / step)."""
    rollup, seconds = qualified(rollup_of(table, grain)), ROLLUPS[grain]
    finer = list(ROLLUPS)[list(ROLLUPS).index(grain) - 1] if grain != "_1m" else None
    sep = ", " if fields else ""
    if finer is None:
        bucket, source, moment = "date_trunc('minute', r.time::timestamptz)", qualified(table), "r.time"
        values = f"count(*){sep}" + ", ".join(raw_aggregates(f) for f in fields)
    else:
        bucket, source, moment = (
            f"to_timestamp(date_part('epoch', r.bucket)::bigint / {seconds} * {seconds})",
            qualified(rollup_of(table, finer)),
            "r.bucket",
        )
        values = f"sum(r.rows){sep}" + ", ".join(combine(f, a) for f in fields for a in AGGREGATES)
    return (
        f"DELETE FROM {rollup} WHERE bucket >= %(start)s AND bucket <= %(stop)s;"
        f" INSERT INTO {rollup} ({rollup_columns(fields)}) SELECT {bucket}, {values} FROM {source} r"
        f" WHERE {moment} >= %(start)s AND {moment} < %(stop)s::timestamptz + interval '{seconds} seconds' GROUP BY 1"
    )


def combine(field_key: str, aggregate: str, source: str = "r") -> str:
    """How buckets of a finer grain make up a coarser one's aggregate."""
    column = f"{source}.{rollup_column(field_key, aggregate)}"
    return {"n": f"sum({column})", "sum": f"sum({column})", "min": f"min({column})", "max": f"max({column})"}[aggregate]


def raw_aggregates(field_key: str, source: str = "r") -> str:
    column = f"{source}.{quote_ident(field_key)}"
    return f"count({column}), sum({column}), min({column}), max({column})"


def panel_columns(fields: Sequence[str]) -> str:
    """What a panel function returns per field: the mean, the minimum and the maximum."""
    return ", ".join(
        f"{quote_ident(f)} double precision, {rollup_column(f, 'min')} double precision, {rollup_column(f, 'max')} double precision"
        for f in fields
    )


def panel_values(fields: Sequence[str]) -> str:
    """Means, minima and maxima from parts that carry each field's n, sum, min and max."""
    values = []
    for i, _ in enumerate(fields):
        n, total, low, high = (f"p.a{i}_{a}" for a in AGGREGATES)
        values.append(f"sum({total}) / nullif(sum({n}), 0), min({low}), max({high})")
    return ", ".join(values)


def part_columns(fields: Sequence[str]) -> str:
    return ", ".join(["g", "rows", *(f"a{i}_{a}" for i, _ in enumerate(fields) for a in AGGREGATES)])


def series_function_sql(table: tuple[str, ...], fields: Sequence[str]) -> str:
    """`<table>_series(t_from, t_to, interval_ms)`: bucket for bucket what Grafana's
    `$__timeGroupAlias(time, $__interval)` with `$__timeFilter(time)` gives over the raw rows.
    The whole buckets come from the coarsest rollup whose grain divides the step; other steps,
    and the partial buckets at each end, from the raw rows."""
    name, raw = qualified(function_of(table, "series")), qualified(table)
    group = "floor(extract(epoch FROM r.time) / step) * step"  # Grafana's $__timeGroup, to the digit
    whole = "date_part('epoch', r.bucket)::bigint / seconds * seconds"  # the same in integers for whole seconds: quicker
    sep = ", " if fields else ""
    rolled = ", ".join(combine(f, a) for f in fields for a in AGGREGATES)
    from_raw = ", ".join(raw_aggregates(f) for f in fields)
    parts = [
        f"SELECT {whole}, sum(r.rows){sep}{rolled} FROM {qualified(rollup_of(table, grain))} r"
        f" WHERE grain = '{grain}' AND r.bucket >= lo AND r.bucket < hi GROUP BY 1"
        for grain in ROLLUPS
    ]
    minutes = qualified(rollup_of(table, "_1m"))
    parts += [  # the partial buckets at each end: whole minutes from the minute rollup, the rest raw
        f"SELECT {whole}, sum(r.rows){sep}{rolled} FROM {minutes} r WHERE r.bucket >= lo_m AND r.bucket < lo GROUP BY 1",
        f"SELECT {whole}, sum(r.rows){sep}{rolled} FROM {minutes} r WHERE r.bucket >= hi AND r.bucket < hi_m GROUP BY 1",
        f"SELECT {group}, count(*){sep}{from_raw} FROM {raw} r WHERE r.time >= t_from AND r.time < lo_m GROUP BY 1",
        f"SELECT {group}, count(*){sep}{from_raw} FROM {raw} r WHERE r.time >= hi_m AND r.time <= t_to GROUP BY 1",
    ]
    grains = " ".join(f"WHEN interval_ms % {seconds * 1000} = 0 THEN '{grain}'" for grain, seconds in reversed(ROLLUPS.items()))
    return (
        f"CREATE OR REPLACE FUNCTION {name}(t_from timestamptz, t_to timestamptz, interval_ms bigint)"
        f' RETURNS TABLE ("time" timestamptz{sep}{panel_columns(fields)})'
        " LANGUAGE plpgsql STABLE SET \"TimeZone\" TO 'UTC' SET work_mem TO '16MB' AS $fn$\n"
        "#variable_conflict use_column\n"
        "DECLARE\n"
        "  step numeric := greatest(interval_ms, 1) / 1000.0;\n"
        "  seconds bigint := greatest(interval_ms / 1000, 1);\n"
        "  lo timestamptz := to_timestamp(ceil(extract(epoch FROM t_from) / step) * step);\n"
        "  hi timestamptz := to_timestamp(floor(extract(epoch FROM t_to) / step) * step);\n"
        "  lo_m timestamptz := to_timestamp(ceil(extract(epoch FROM t_from) / 60) * 60);\n"
        "  hi_m timestamptz := to_timestamp(floor(extract(epoch FROM t_to) / 60) * 60);\n"
        f"  grain text := CASE {grains} END;\n"
        "BEGIN\n"
        "  IF grain IS NULL OR lo_m >= hi_m THEN  -- a step of seconds, or not one whole minute: raw rows only\n"
        "    lo := t_to; hi := t_to; lo_m := t_to; hi_m := t_to;\n"
        "  ELSIF lo >= hi THEN  -- no whole bucket: minutes and raw rows\n"
        "    lo := lo_m; hi := lo_m;\n"
        "  END IF;\n"
        f"  RETURN QUERY WITH parts ({part_columns(fields)}) AS (\n    "
        + "\n    UNION ALL ".join(parts)
        + f"\n  ) SELECT to_timestamp(p.g){sep}{panel_values(fields)} FROM parts p GROUP BY p.g ORDER BY p.g;\n"
        "END $fn$"
    )


def stats_function_sql(table: tuple[str, ...], fields: Sequence[str]) -> str:
    """`<table>_stats(t_from, t_to)`: one row of each field's mean, minimum and maximum over
    the rows BETWEEN t_from AND t_to, from the hour rollup and the raw rows at each end."""
    name, raw = qualified(function_of(table, "stats")), qualified(table)
    sep = ", " if fields else ""
    rolled = ", ".join(combine(f, a) for f in fields for a in AGGREGATES)
    from_raw = ", ".join(raw_aggregates(f) for f in fields)
    hours, minutes = qualified(rollup_of(table, "_1h")), qualified(rollup_of(table, "_1m"))
    parts = [
        f"SELECT 0, sum(r.rows){sep}{rolled} FROM {hours} r WHERE r.bucket >= lo AND r.bucket < hi",
        f"SELECT 0, sum(r.rows){sep}{rolled} FROM {minutes} r WHERE r.bucket >= lo_m AND r.bucket < lo",
        f"SELECT 0, sum(r.rows){sep}{rolled} FROM {minutes} r WHERE r.bucket >= hi AND r.bucket < hi_m",
        f"SELECT 0, count(*){sep}{from_raw} FROM {raw} r WHERE r.time >= t_from AND r.time < lo_m",
        f"SELECT 0, count(*){sep}{from_raw} FROM {raw} r WHERE r.time >= hi_m AND r.time <= t_to",
    ]
    return (
        f"CREATE OR REPLACE FUNCTION {name}(t_from timestamptz, t_to timestamptz)"
        f" RETURNS TABLE ({panel_columns(fields) or 'rows bigint'})"
        " LANGUAGE plpgsql STABLE SET \"TimeZone\" TO 'UTC' AS $fn$\n"
        "#variable_conflict use_column\n"
        "DECLARE\n"
        "  lo timestamptz := to_timestamp(ceil(extract(epoch FROM t_from) / 3600) * 3600);\n"
        "  hi timestamptz := to_timestamp(floor(extract(epoch FROM t_to) / 3600) * 3600);\n"
        "  lo_m timestamptz := to_timestamp(ceil(extract(epoch FROM t_from) / 60) * 60);\n"
        "  hi_m timestamptz := to_timestamp(floor(extract(epoch FROM t_to) / 60) * 60);\n"
        "BEGIN\n"
        "  IF lo_m >= hi_m THEN lo := t_to; hi := t_to; lo_m := t_to; hi_m := t_to;\n"
        "  ELSIF lo >= hi THEN lo := lo_m; hi := lo_m;\n"
        "  END IF;\n"
        f"  RETURN QUERY WITH parts ({part_columns(fields)}) AS (\n    "
        + "\n    UNION ALL ".join(parts)
        + f"\n  ) SELECT {panel_values(fields) or 'sum(p.rows)'} FROM parts p;\n"
        "END $fn$"
    )


def rollup_fields(columns: Mapping[str, str]) -> list[str]:
    return [c for c, kind in columns.items() if c != "time" and is_numeric_column(kind)]


def ensure_rollups(cursor, table: tuple[str, ...], columns: Mapping[str, str]) -> None:
    """Create or extend the rollup tables, and (re)create the panel functions for the table's fields."""
    fields = rollup_fields(columns)
    for grain in ROLLUPS:
        for statement in rollup_table_sql(table, grain, fields):
            cursor.execute(statement)
    # A new field changes what the functions return, which CREATE OR REPLACE cannot do.
    cursor.execute(f"DROP FUNCTION IF EXISTS {qualified(function_of(table, 'series'))}(timestamptz, timestamptz, bigint)")
    cursor.execute(f"DROP FUNCTION IF EXISTS {qualified(function_of(table, 'stats'))}(timestamptz, timestamptz)")
    cursor.execute(series_function_sql(table, fields))
    cursor.execute(stats_function_sql(table, fields))


def refresh_rollups(cursor, table: tuple[str, ...], columns: Mapping[str, str], hours: Iterable[datetime]) -> None:
    """Recompute, from the raw rows, every rollup bucket that the rewritten hours touch."""
    fields = rollup_fields(columns)
    statement = "; ".join(refresh_sql(table, fields, grain) for grain in ROLLUPS)  # one round trip
    for start, last in runs(sorted(hours)):
        cursor.execute(statement, {"start": start, "stop": last + HOUR})


def rebuild_rollups(cursor, table: tuple[str, ...], columns: Mapping[str, str]) -> None:
    """Build the rollups anew from every raw row, whoever wrote it."""
    fields = rollup_fields(columns)
    ensure_rollups(cursor, table, columns)
    for grain in ROLLUPS:
        cursor.execute(f"TRUNCATE {qualified(rollup_of(table, grain))}")
    cursor.execute(f"SELECT min(time::timestamptz), max(time::timestamptz) FROM {qualified(table)}")
    first, last = cursor.fetchone()
    if first is None:
        return
    for grain in ROLLUPS:
        cursor.execute(refresh_sql(table, fields, grain), {"start": hour_floor(first), "stop": hour_floor(last) + HOUR})


def has_rollups(cursor, table: tuple[str, ...]) -> bool:
    cursor.execute(
        "SELECT bool_and(to_regclass(name) IS NOT NULL) FROM unnest(%s::text[]) name", ([qualified(rollup_of(table, g)) for g in ROLLUPS],)
    )
    return cursor.fetchone()[0]


# -- Status ------------------------------------------------------------------------------
MARK_LOADED, MARK_EMPTY, MARK_MISSING, MARK_PENDING = "#", "o", ".", " "


def runs(hours: Sequence[datetime]) -> list[tuple[datetime, datetime]]:
    """Contiguous hours as (first, last) pairs."""
    return [(w.start, w.stop - HOUR) for w in chunked(hours, max_hours=max(1, len(hours)))]


@dataclass(frozen=True)
class Gap:
    """Hours after the first loaded hour that are not loaded, and that InfluxDB still holds."""

    first: datetime
    last: datetime
    forgotten_at: datetime | None  # when InfluxDB forgets the first of them; None: never

    @property
    def hours(self) -> int:
        return int((self.last - self.first) / HOUR) + 1

    def command(self) -> str:
        return f"--from {iso(self.first)[:13]} --to {iso(self.last + HOUR)[:13]}"


AT_RISK = timedelta(days=7)  # --status fails when a gap will be forgotten sooner than this


def gaps_at_risk(loaded: Iterable[datetime], first: datetime | None, now: datetime, settings: Settings) -> list[Gap]:
    """The runs of unloaded hours from the first loaded hour to the latest complete one that
    InfluxDB has not forgotten yet. Hours before the first loaded hour are not gaps."""
    if first is None:
        return []
    latest = latest_complete_hour(now, settings.settle)
    edge = settings.forgets_before(now)
    start = max(first, hour_floor(edge) + HOUR) if edge else first  # an hour InfluxDB has begun to forget is gone
    if start > latest:
        return []
    keep = settings.retention_hours and timedelta(hours=settings.retention_hours)
    hours = missing_hours(Window(start, latest + HOUR).hours(), loaded)
    return [Gap(a, b, a + keep if keep else None) for a, b in runs(hours)]


def status_report(
    ledger: Mapping[datetime, LedgerEntry],
    now: datetime,
    settings: Settings,
    days: int,
    newest: Mapping[datetime, LedgerEntry] | None = None,
    first: datetime | None = None,
    reading: datetime | None = None,
) -> tuple[str, int]:
    """The text of `--status` and its exit code: 1 when the newest loaded hour is over 2 hours
    old, or when InfluxDB will forget an hour that is not loaded within 7 days.

    `ledger` holds at least the hours InfluxDB still keeps and the days shown; `newest` is the
    ledger's newest hour, `first` its oldest, `reading` the table's newest row.
    """
    latest = latest_complete_hour(now, settings.settle)
    newest = dict(newest or {}) or ({max(ledger): ledger[max(ledger)]} if ledger else {})
    first = first or (min(ledger) if ledger else None)
    lines = []
    if newest:
        (hour, entry), *_ = newest.items()
        lines.append(f"newest loaded hour: {iso(hour)} ({plural(entry.rows, 'row')}), loaded {ago(now - entry.loaded_at)} ago")
    else:
        lines.append("newest loaded hour: none yet")
    lines.append(f"newest reading: {iso(reading)}, {ago(now - reading)} ago" if reading else "newest reading: none yet")
    lines.append(
        f"last {plural(days, 'day')} (UTC), one mark per hour: {MARK_LOADED} loaded, {MARK_EMPTY} loaded but empty, {MARK_MISSING} missing"
    )
    today = hour_floor(now).replace(hour=0)
    for day in (today - timedelta(days=d) for d in reversed(range(days))):
        lines.append(day_line(ledger, day, latest, first))
    gaps = gaps_at_risk(ledger, first, now, settings)
    if gaps:
        held = "InfluxDB keeps them" if not settings.retention_hours else "InfluxDB still holds them"
        lines.append(f"not loaded, and {held} ({plural(sum(g.hours for g in gaps), 'hour')}):")
        for gap in gaps:
            span = f"{iso(gap.first)}..{iso(gap.last + HOUR)}" if gap.last > gap.first else iso(gap.first)
            when = f"forgotten in {duration(gap.forgotten_at - now)}" if gap.forgotten_at else "never forgotten"
            lines.append(f"  {span}  {when}; load it with {gap.command()}")
    else:
        lines.append("not loaded, and InfluxDB still holds them: none" if first else "not loaded: nothing has been loaded yet")
    stale = not newest or now - (max(newest) + HOUR) > timedelta(hours=2)
    urgent = any(gap.forgotten_at and gap.forgotten_at - now < AT_RISK for gap in gaps)
    return "\n".join(lines), EXIT_FAILED if (stale and latest not in ledger) or urgent else EXIT_OK


def day_line(ledger: Mapping[datetime, LedgerEntry], day: datetime, latest: datetime, first: datetime | None = None) -> str:
    """One day of `--status`: a mark per hour, totals, gaps, and the last check and repairs.
    Hours before the first loaded hour are not missing: nothing was ever asked of them."""
    hours = [day + h * HOUR for h in range(24)]

    def asked(hour: datetime) -> bool:
        return hour <= latest and (first is None or hour >= first)

    marks = "".join(
        MARK_PENDING if not asked(hour) else MARK_MISSING if hour not in ledger else MARK_LOADED if ledger[hour].rows else MARK_EMPTY
        for hour in hours
    )
    loaded = [ledger[h] for h in hours if h in ledger]
    missing = [
        f"{first.hour:02d}-{last.hour:02d}" if last > first else f"{first.hour:02d}"
        for first, last in runs([h for h in hours if h not in ledger and asked(h)])
    ]
    checked = [e.checked_at for e in loaded if e.checked_at]
    repaired = sum(1 for e in loaded if e.repaired_at)
    notes = [
        *([f"missing {','.join(missing)}"] if missing else []),
        *([f"checked {iso(max(checked))}"] if checked else []),
        *([f"{repaired} repaired"] if repaired else []),
    ]
    return f"  {day:%Y-%m-%d}  {marks}  {len(loaded):2d}/24 {sum(e.rows for e in loaded):7d} rows" + "".join(f"  {n}" for n in notes)


def duration(delta: timedelta) -> str:
    """A span as people say it: minutes, hours, or days to a tenth."""
    minutes = max(0, int(delta.total_seconds() // 60))
    if minutes < 120:
        return plural(minutes, "minute")
    if minutes < 48 * 60:
        return plural(minutes // 60, "hour")
    return f"{minutes / 1440:.1f} days"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def ago(delta: timedelta) -> str:
    minutes = max(0, int(delta.total_seconds() // 60))
    count, unit = (minutes, "minute") if minutes < 120 else (minutes // 60, "hour") if minutes < 48 * 60 else (minutes // 1440, "day")
    return plural(count, unit)


# -- Reporting: a dead-man's switch and a metrics file ---------------------------------------
PING_TIMEOUT = 4.0  # seconds a try; two tries at most, so a ping never holds a run long


def report_outcome(settings: Settings, args: argparse.Namespace, outcome: Outcome, now: datetime, seconds: float) -> None:
    """Tell the watchers how the run went. A failure to report is one warning, never another outcome."""
    pinged = not (args.status or args.rebuild_rollups or args.dry_run)
    if settings.ping_url and pinged:
        ping(settings.ping_url, outcome)
    if settings.metrics_file:
        write_metrics(settings, outcome, now, seconds)


def ping(url: str, outcome: Outcome) -> None:
    """healthchecks.io's protocol: the URL on success, URL/<exit code> on failure, the line as the body."""
    import urllib3

    target = url.rstrip("/") + ("" if outcome.code == EXIT_OK else f"/{outcome.code}")
    pool = urllib3.PoolManager(
        timeout=urllib3.Timeout(total=PING_TIMEOUT),
        retries=urllib3.Retry(total=1, backoff_factor=0.2, status_forcelist=(502, 503, 504), allowed_methods=None),
    )
    try:
        response = pool.request("POST", target, body=outcome.line.encode()[:10000], headers={"Content-Type": "text/plain; charset=utf-8"})
        if response.status >= 300:
            log.warning("the ping to %s was refused (%d)", host_of(url), response.status)
    except urllib3.exceptions.HTTPError as exc:
        log.warning("could not ping %s (%s); the run's outcome stands", host_of(url), reason(exc))
    finally:
        pool.clear()


def host_of(url: str) -> str:
    """What a line may say of a ping URL: its host. The path is a credential."""
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or "the ping URL"


GAUGES = {  # name: help
    "last_run_timestamp_seconds": "When the loader's last run ended.",
    "last_run_exit_code": "The last run's exit code: 0 success, 1 failed, 2 bad settings or arguments.",
    "last_run_duration_seconds": "How long the last run took.",
    "last_success_timestamp_seconds": "When the last run that exited 0 ended.",
    "newest_hour_timestamp_seconds": "Start of the newest hour in the ledger.",
    "newest_reading_timestamp_seconds": "Time of the table's newest row: empty hours count as loaded, so a dead oximeter shows only here.",
    "missing_seconds": "How much is not loaded after the first loaded hour, of what InfluxDB still holds.",
    "retention_margin_seconds": "How long until InfluxDB forgets the oldest of those unloaded hours (+Inf when none).",
}
ARCHIVE_GAUGES = ("newest_hour_timestamp_seconds", "newest_reading_timestamp_seconds", "missing_seconds", "retention_margin_seconds")
METRIC_PREFIX = "health_metrics_loader_"


def metrics_text(values: Mapping[str, float], table: str) -> str:
    """Prometheus' text format: HELP and TYPE for each gauge, one sample, a `table` label."""
    label = table.replace("\\", "\\\\").replace('"', '\\"')
    lines = []
    for name, text in GAUGES.items():
        if name in values:
            lines += [f"# HELP {METRIC_PREFIX}{name} {text}", f"# TYPE {METRIC_PREFIX}{name} gauge"]
            lines.append(f'{METRIC_PREFIX}{name}{{table="{label}"}} {prometheus_number(values[name])}')
    return "\n".join(lines) + "\n"


def prometheus_number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def previous_metrics(path: Path) -> tuple[dict[str, float], str | None]:
    """The gauges of the last metrics file, and its table label: a run that cannot read the
    ledger keeps them."""
    values, table = {}, None
    with suppress(OSError, UnicodeDecodeError):
        for line in path.read_text().splitlines():
            found = re.fullmatch(rf'{METRIC_PREFIX}(\w+)\{{table="((?:[^"\\]|\\.)*)"\}} (\S+)', line)
            if found:
                values[found[1]], table = float(found[3]), found[2]
    return values, table


def archive_gauges(settings: Settings, now: datetime) -> tuple[dict[str, float], str]:
    """The ledger-derived gauges, and the table as PostgreSQL resolves it."""
    connection = connect_postgres(settings)
    try:
        with database_errors():
            state = extract_state(connection, settings, now)
            table = ledger_key(resolve_table(connection, settings.table))
    finally:
        connection.close()
    gaps = gaps_at_risk(state.ledger, state.first, now, settings)
    margins = [(gap.forgotten_at - now).total_seconds() for gap in gaps if gap.forgotten_at]
    values = {
        "missing_seconds": sum(gap.hours for gap in gaps) * 3600,
        "retention_margin_seconds": max(0.0, min(margins)) if margins else math.inf,
    }
    if state.newest:
        values["newest_hour_timestamp_seconds"] = max(state.newest).timestamp()
    if state.reading:
        values["newest_reading_timestamp_seconds"] = state.reading.timestamp()
    return values, table


def write_metrics(settings: Settings, outcome: Outcome, now: datetime, seconds: float) -> None:
    """METRICS_FILE for node_exporter's textfile collector, replaced atomically: a temporary
    file in the same folder, then a rename, so that a scrape never reads half a file."""
    import tempfile

    path = Path(settings.metrics_file)
    before, label = previous_metrics(path)
    ended = now.timestamp() + seconds
    values = {"last_run_timestamp_seconds": ended, "last_run_exit_code": outcome.code, "last_run_duration_seconds": round(seconds, 3)}
    if outcome.code == EXIT_OK:
        values["last_success_timestamp_seconds"] = ended
    elif "last_success_timestamp_seconds" in before:
        values["last_success_timestamp_seconds"] = before["last_success_timestamp_seconds"]
    try:
        archive, label = archive_gauges(settings, now)
    except LoaderError as exc:
        log.warning("the metrics file keeps the archive's last known state: %s", exc)
        archive = {name: before[name] for name in ARCHIVE_GAUGES if name in before}
    values.update(archive)
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as handle:
            handle.write(metrics_text(values, label or ".".join(settings.table)))
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, path)
    except OSError as exc:
        with suppress(OSError, NameError):
            os.unlink(handle.name)
        log.warning("could not write METRICS_FILE %s (%s)", path, exc.strerror or exc)


# -- Command line ------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """An argument error is one line like every other error (argparse would print its usage too)."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message} (see --help)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="health_metrics_loader.py",
        description="Copy 5-second means of pulse-oximeter readings from InfluxDB into PostgreSQL. "
        "With no arguments (the cron call), load every complete UTC hour of the last CATCH_UP_HOURS "
        "that is not loaded yet, which is usually just the previous hour, and re-check the "
        "RECHECK_HOURS before it for late points. A load never removes a stored row that "
        "InfluxDB's answer does not replace.",
        epilog="Exit codes: 0 success, 1 the run failed (or --verify found missing or changed rows), 2 bad arguments or settings.",
    )
    hours = parser.add_mutually_exclusive_group()
    hours.add_argument("--hour", metavar="HOUR", help="load one UTC hour, e.g. 2021-07-12T14")
    hours.add_argument("--from", dest="start", metavar="HOUR", help="load every hour from this one (needs --to)")
    parser.add_argument("--to", dest="stop", metavar="HOUR", help="... up to, not including, this one")
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--verify",
        action="store_true",
        help="compare the hours (default: the last CATCH_UP_HOURS) with InfluxDB; exit 1 if rows are missing or changed",
    )
    action.add_argument("--repair", action="store_true", help="compare like --verify, then reload the hours that differ")
    action.add_argument("--status", action="store_true", help="show which hours are loaded; exit 1 if the newest is over 2 hours old")
    action.add_argument(
        "--rebuild-rollups",
        action="store_true",
        help="rebuild the minute and hour rollups from every row (after editing the table by hand)",
    )
    parser.add_argument("--replace", action="store_true", help="make the hours exactly InfluxDB's answer, dropping rows it no longer has")
    parser.add_argument("--days", type=int, metavar="N", help="days that --status shows (default 7)")
    parser.add_argument("--dry-run", action="store_true", help="query and report; write nothing")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="log more")
    loudness.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    args = parser.parse_args(argv)
    if (args.start is None) != (args.stop is None):
        parser.error("--from and --to go together")
    if args.days is not None and not args.status:
        parser.error("--days goes with --status")
    args.days = 7 if args.days is None else args.days
    if not 1 <= args.days <= 366:
        parser.error("--days must be from 1 to 366")
    if (args.status or args.rebuild_rollups) and (args.hour or args.start or args.replace or args.dry_run):
        parser.error(f"{'--status' if args.status else '--rebuild-rollups'} takes no hours, --replace or --dry-run")
    if args.replace and (args.verify or not (args.hour or args.start or args.repair)):
        parser.error("--replace goes with --hour, --from/--to or --repair")
    if args.verify and args.dry_run:
        parser.error("--verify writes no row already; --dry-run goes with a load or --repair")
    return args


def requested_hours(args: argparse.Namespace, now: datetime, settings: Settings) -> list[datetime] | None:
    """The hours that --hour, --from/--to, --verify or --repair ask for; None for the cron call."""
    if args.hour:
        hours = [parse_hour(args.hour)]
    elif args.start:
        start, stop = parse_hour(args.start), parse_hour(args.stop)
        if stop <= start:
            raise ConfigError("--to must be after --from")
        hours = Window(start, stop).hours()
    elif args.verify or args.repair:
        return complete_hours(now, settings.settle, settings.catch_up_hours)
    else:
        return None
    refuse_incomplete(hours[-1], now, settings.settle)
    return hours


def refuse_incomplete(hour: datetime, now: datetime, settle: timedelta) -> None:
    latest = latest_complete_hour(now, settle)
    if hour > latest:
        raise ConfigError(
            f"hour {iso(hour)} is not complete yet: an hour counts as complete SETTLE_MINUTES "
            f"({settle.total_seconds() / 60:g}) after it ends; the latest complete hour is {iso(latest)}"
        )


def install_redactor(secrets: Sequence[str]) -> None:
    """Mask secrets in every record of the loader's log, whichever handler gets it (a
    scheduler's own, too)."""
    log.filters[:] = [Redactor(secrets)]


def configure_logging(args: argparse.Namespace, secrets: Sequence[str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    handler.addFilter(Redactor(secrets))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)


SHORT_SECRET = 8


class Redactor(logging.Filter):
    """Masks secrets in every log line, whatever put them there.

    A long secret is masked wherever it appears. A short one is masked only where it stands
    on its own, so that TOKEN=t hides `t` but does not turn "did not answer" into "did no***".
    """

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.patterns = [secret_pattern(s) for s in sorted({s for s in secrets if s}, key=len, reverse=True)]

    def redact(self, text: str) -> str:
        for pattern in self.patterns:
            text = pattern.sub("***", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), None
        return True


def secret_pattern(secret: str) -> re.Pattern[str]:
    if len(secret) >= SHORT_SECRET:
        return re.compile(re.escape(secret))
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])")


# -- Running -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What a run does: which hours (None: what the ledger lacks), and how.

    mode: `load` (bring hours in line with InfluxDB), `verify` (compare only), `repair`
    (compare, report, and load), or `preview` (compare and report, as --repair --dry-run).
    """

    hours: Sequence[datetime] | None = None
    mode: str = "load"
    replace: bool = False  # drop stored rows that InfluxDB's answer lacks

    @property
    def write(self) -> bool:
        return self.mode in ("load", "repair")

    @property
    def checking(self) -> bool:
        """Whether the run notes in the ledger when it compared the hours."""
        return self.mode in ("verify", "repair")


class HoursFailed(LoaderError):
    """Some hours could not be loaded; the others were."""

    def __init__(self, failures: Mapping[datetime, str]) -> None:
        super().__init__("\n".join(f"{iso(hour)} was not loaded: {reason}" for hour, reason in sorted(failures.items())))


def catch_up_windows(connection, settings: Settings, table: tuple[str, ...], now: datetime) -> list[Window]:
    """The complete hours of the catch-up span that the ledger lacks, as chunks.

    When there is something to load, the RECHECK_HOURS before it come along in the same
    query, so that points that arrived late are picked up at no extra query.
    """
    candidates = complete_hours(now, settings.settle, settings.catch_up_hours)
    ledger = extract_ledger(connection, table, candidates[0])
    missing = missing_hours(candidates, ledger)
    if not missing or not settings.recheck_hours:
        return chunked(missing)
    recent = [hour for hour in candidates[-settings.recheck_hours - 1 :] if hour in ledger]
    return chunked([*missing, *recent])


PREFETCH_THREAD = "health_metrics_loader prefetch"


def in_background(action: Callable[..., T], *args) -> Future:
    """Run `action` on a daemon thread: a run that fails must not wait for it to finish."""
    from concurrent.futures import Future

    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(action(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=work, name=PREFETCH_THREAD, daemon=True).start()
    return future


def load_windows(
    settings: Settings,
    connection,
    table: tuple[str, ...],
    source: FluxSource | InfluxQLSource,
    windows: Sequence[Window],
    retrier: Retrier,
    plan: Plan,
    now: datetime,
    filled: bool = True,
) -> list[Loaded]:
    """Extract and load each window, oldest first.

    A second thread fetches and prepares the next window while PostgreSQL takes the
    current one, so a backfill costs little more than its COPYs. A window whose data
    cannot be stored is loaded hour by hour, so that one bad hour holds back no other;
    a failure of either server stops the run.
    """

    def prepare(window: Window) -> Chunk | None:
        frame = extract_frame(source, window, retrier)
        kept = until_hour(frame, window, influx_latest_hour(source, settings, now, clock_notes))
        return prepare_chunk(*kept) if kept else None

    def load(chunk: Chunk | None, started: float) -> None:
        nonlocal asked_for_types, filled
        if clock_notes and not clock_said:  # said here, not on the fetching thread, which may outlive a failed run
            clock_said.append(True)
            log.warning(clock_notes[0])
        if chunk is None:
            return
        if not filled and chunk.frame.empty and plan.write:
            unfilled.append(chunk)  # a misspelt measurement must not mark the catch-up as done
            return
        filled = True
        loaded.append(load_chunk(connection, table, chunk, plan.replace, now, plan.write, plan.checking, frozen_before))
        report_load(chunk.window, loaded[-1], plan, time.monotonic() - started)
        if plan.write and not chunk.frame.empty and not asked_for_types:
            due = bool(loaded[-1].lacking or loaded[-1].created)
            asked_for_types = warn_of_skipped_fields(source, chunk.window, retrier, connection, table, now, due)
        while unfilled:  # readings arrived after all: the empty hours before them are loaded too
            load(unfilled.pop(0), time.monotonic())

    def load_hour_by_hour(window: Window, failure: DataError) -> None:
        if len(window.hours()) == 1:
            failures[window.start] = str(failure)
            return
        log.warning("%s cannot be stored as it is (%s); loading its hours one by one", window, failure)
        for hour in window.hours():
            try:
                chunk = prepare(Window(hour, hour + HOUR))
            except DataError as exc:
                failures[hour] = str(exc)
                continue
            load(chunk, time.monotonic())

    loaded: list[Loaded] = []
    clock_notes: list[str] = []
    clock_said: list[bool] = []
    unfilled: list[Chunk] = []
    frozen_before = settings.frozen_before(now)
    asked_for_types = False
    failures: dict[datetime, str] = {}
    try:
        upcoming = in_background(prepare, windows[0])
        for index, window in enumerate(windows):
            started = time.monotonic()
            try:
                chunk, failure = upcoming.result(), None
            except DataError as exc:
                chunk, failure = None, exc
            if index + 1 < len(windows):
                upcoming = in_background(prepare, windows[index + 1])
            if failure is None:
                load(chunk, started)
            else:
                load_hour_by_hour(window, failure)
    except BaseException:
        retrier.stop()  # a pending fetch gives up instead of holding the run
        raise
    if unfilled:
        warn_of_nothing_found(settings, table, [hour for chunk in unfilled for hour in chunk.window.hours()])
    if failures:
        raise HoursFailed(failures)
    return loaded


FIELDS_RECHECK = timedelta(days=1)


def until_hour(frame: pd.DataFrame, window: Window, latest: datetime | None) -> tuple[pd.DataFrame, Window] | None:
    """The rows and window without the hours after `latest` (None: all of them); None if nothing is left."""
    if latest is None or window.stop - HOUR <= latest:
        return frame, window
    if window.start > latest:
        return None
    return frame[frame["time"] <= latest + HOUR].reset_index(drop=True), Window(window.start, latest + HOUR)


def warn_of_nothing_found(settings: Settings, table: tuple[str, ...], hours: Sequence[datetime]) -> None:
    log.warning(
        "InfluxDB has no readings of measurement %r in bucket %r for %s, and %s holds none yet: "
        "check INFLUX_MEASUREMENT and INFLUX_BUCKET; these hours are not recorded, so the next run asks again",
        settings.measurement,
        settings.bucket,
        ", ".join(f"{iso(first)}..{iso(last + HOUR)}" for first, last in runs(hours)),
        ".".join(table),
    )


def influx_latest_hour(source: FluxSource | InfluxQLSource, settings: Settings, now: datetime, notes: list[str]) -> datetime | None:
    """The latest complete hour by InfluxDB's clock, when ours runs ahead of it by more than
    SETTLE_MINUTES (a Raspberry Pi without a real-time clock after a power cut): an hour that
    has not ended there may still gain points. A clock behind InfluxDB's only delays loading.
    Appends to `notes` the line to warn with."""
    skew = source.clock_skew
    if skew is None or abs(skew) <= settings.settle.total_seconds():
        return None
    theirs = now + timedelta(seconds=skew)
    outcome = "hours are taken as complete by InfluxDB's clock" if skew < 0 else "the later one only delays loading"
    notes.append(f"this machine's clock says {iso(now)}, InfluxDB's says {iso(theirs)}: {outcome}")
    return latest_complete_hour(theirs, settings.settle) if skew < 0 else None


def warn_of_skipped_fields(
    source: FluxSource | InfluxQLSource, window: Window, retrier: Retrier, connection, table: tuple[str, ...], now: datetime, due: bool
) -> bool:
    """InfluxQL's mean(*) skips a field that is not a number without a word, so ask which
    fields those are: when the first load creates the table or an answer lacks a field the
    table has (`due`), and else once a day. Each such field is named once; returns whether
    it asked."""
    if source.dialect != "influxql":
        return False
    with database_errors(), connection.cursor() as cursor:
        cursor.execute(
            f"SELECT fields_checked_at, skipped_fields FROM {qualified(tables_of(table))} WHERE target_table = %s", (ledger_key(table),)
        )
        checked_at, named = cursor.fetchone() or (None, [])
    connection.rollback()
    if not due and checked_at is not None and now - checked_at < FIELDS_RECHECK:
        return False
    fields = retrier.call(lambda: source.non_numeric_fields(window))
    new = [f for f in fields if f not in named or due]
    if new:
        log.warning(
            "field %s of measurement %r is not a number, so mean(*) skips it and it is not archived",
            ", ".join(map(repr, new)),
            source.settings.measurement,
        )
    with database_errors(), connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {qualified(tables_of(table))} SET fields_checked_at = %s, skipped_fields = %s WHERE target_table = %s",
            (now, sorted(set(named) | set(fields)), ledger_key(table)),
        )
    connection.commit()
    return True


def report_load(window: Window, loaded: Loaded, plan: Plan, seconds: float) -> None:
    """A log line for the window, a warning for each hour with kept rows, and with
    `plan.checking` a line on stdout for each hour that differs."""
    if plan.write:
        unchanged = sum(1 for hour, check in loaded.checks.items() if check.stored and hour not in loaded.rewritten)
        extra = f" ({plural(unchanged, 'hour')} already up to date)" if unchanged else ""
        # The daily repair reads a month: a window it left as it was is worth no line in the log.
        quiet = plan.mode == "repair" and not loaded.rewritten
        log.log(logging.DEBUG if quiet else logging.INFO, "loaded %s: %s in %.2fs%s", window, plural(loaded.rows, "row"), seconds, extra)
    outcome = {"verify": "", "repair": " (reloaded)", "preview": " (would reload)"}.get(plan.mode)
    for hour, check in loaded.checks.items():
        if outcome is not None and (check.differs or check.left or check.conflicting):
            done = outcome if hour in loaded.rewritten or (plan.mode == "preview" and check.differs) else ""
            twice = f", stored twice {check.copies}" if check.copies else ""
            twice += f", conflicting {check.conflicting}" if check.conflicting else ""
            print(f"{iso(hour)}  missing {check.missing}, changed {check.changed}, kept {check.left}{twice}{done}")
        if plan.write and check.kept and plan.replace and hour in loaded.rewritten:
            log.info("%s: dropped %s that InfluxDB no longer has (--replace)", iso(hour), plural(check.kept, "stored row"))
        if plan.write and check.kept and not plan.replace:
            log.warning(
                "InfluxDB no longer has %d of the %d rows stored for %s; kept them (--hour %s --replace drops them)",
                check.kept,
                check.stored,
                iso(hour),
                iso(hour)[:13],
            )
        if check.frozen:
            log.info(
                "%s: kept %s where InfluxDB is forgetting readings (INFLUX_RETENTION_HOURS)", iso(hour), plural(check.frozen, "stored row")
            )
        if check.conflicting:
            log.warning(
                "%s holds %s stored more than once with different values; left as they are (delete the wrong rows by hand)",
                iso(hour),
                plural(check.conflicting, "time"),
            )


def summary(loaded: Sequence[Loaded], plan: Plan) -> tuple[str, int]:
    """The closing line of --verify and --repair, and the exit code: 1 when --verify finds
    rows that InfluxDB has and the table lacks or holds otherwise."""
    checks = [check for chunk in loaded for check in chunk.checks.values()]
    differing = [check for check in checks if check.wrong]
    kept = [check for check in checks if check.left]
    text = (
        f"{plural(len(checks), 'hour')} checked: {len(checks) - len(differing)} equal, {len(differing)} with missing or changed rows"
        f" ({sum(c.missing for c in checks)} missing, {sum(c.changed for c in checks)} changed),"
        f" {len(kept)} with rows InfluxDB no longer has ({sum(c.left for c in checks)} kept)"
    )
    if any(c.copies or c.conflicting for c in checks):
        text += f", {sum(c.copies for c in checks)} stored twice, {sum(c.conflicting for c in checks)} conflicting"
    if plan.mode == "repair":
        text += f"; reloaded {plural(sum(len(chunk.rewritten) for chunk in loaded), 'hour')}"
    return text, EXIT_FAILED if plan.mode in ("verify", "preview") and differing else EXIT_OK


def run(
    settings: Settings, plan: Plan, dry_run: bool = False, now: datetime | None = None, sleep: Callable[[float], None] | None = None
) -> list[Loaded]:
    """Carry out the plan; returns what each window's load found and did."""
    now = now or datetime.now(timezone.utc)
    install_redactor(settings.secrets())
    retrier = Retrier(settings.retry_budget, sleep=sleep)
    connection, table = None, settings.table
    source = open_source(settings)
    try:
        with database_errors():
            if plan.hours is None or not dry_run or plan.mode != "load":
                connection = connect_postgres(settings)
                table = resolve_table(connection, settings.table)
            filled = True
            if not dry_run:
                acquire_lock(connection, table, wait=None if plan.hours is None else settings.lock_timeout)
                with table_locks_named(connection, table), connection.cursor() as cursor:
                    ensure_ledger(cursor, table)
                    filled = adopt_table(cursor, table, settings) if plan.write else check_resolution(cursor, table, settings)[1]
                connection.commit()
            elif connection is not None:
                with connection.cursor() as cursor:
                    filled = check_resolution(cursor, table, settings)[1]
                connection.rollback()
            windows = chunked(plan.hours) if plan.hours is not None else catch_up_windows(connection, settings, table, now)
            if not windows:
                log.info("nothing to load: the last %d complete hours are all loaded", settings.catch_up_hours)
                return []
            if dry_run and plan.mode == "load":
                report_windows(source, windows, retrier)
                return []
            return load_windows(settings, connection, table, source, windows, retrier, plan, now, filled)
    finally:
        source.close()
        if connection is not None:
            release_lock(connection)
            connection.close()


@contextmanager
def table_locks_named(connection, table: tuple[str, ...]) -> Iterator[None]:
    import psycopg2.errors

    try:
        yield
    except psycopg2.errors.LockNotAvailable:
        raise lock_refused(connection, table, "nothing was written") from None


def report_windows(source: FluxSource | InfluxQLSource, windows: Sequence[Window], retrier: Retrier) -> None:
    for window in windows:
        for hour, rows in rows_per_hour(extract_frame(source, window, retrier), window).items():
            print(f"{iso(hour)}  {rows} rows")


def plain_utc(moment: datetime) -> datetime:
    """A timezone-aware datetime of any kind (pendulum's included) as a plain UTC datetime."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ConfigError("start, stop and now must be timezone-aware datetimes")
    utc = moment.astimezone(timezone.utc)
    return datetime(utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second, utc.microsecond, tzinfo=timezone.utc)


def load_window(settings: Settings, start: datetime, stop: datetime, now: datetime | None = None, replace: bool = False) -> int:
    """Load the complete hours in [start, stop) for schedulers such as Airflow; returns rows written.

    The same rules as `--from/--to`: an hour must be complete (SETTLE_MINUTES after its end,
    by `now`), and stored rows that InfluxDB no longer has stay unless `replace`.
    """
    start, stop = plain_utc(start), plain_utc(stop)
    now = plain_utc(now) if now is not None else datetime.now(timezone.utc)
    if start != hour_floor(start) or stop != hour_floor(stop) or stop <= start:
        raise ConfigError(f"start and stop must be whole hours, start before stop (got {iso(start)}..{iso(stop)})")
    hours = Window(start, stop).hours()
    refuse_incomplete(hours[-1], now, settings.settle)
    try:
        return sum(loaded.rows for loaded in run(settings, Plan(hours, replace=replace), now=now))
    except LoaderError as exc:  # a scheduler prints it as it is: mask it as main would
        exc.args = (Redactor(settings.secrets()).redact(str(exc)),)
        raise


def rebuild_rollups_of(settings: Settings) -> int:
    """--rebuild-rollups: under the table's lock, like any load."""
    with database_errors():
        connection = connect_postgres(settings)
        try:
            table = resolve_table(connection, settings.table)
            acquire_lock(connection, table, wait=settings.lock_timeout)
            with table_locks_named(connection, table), connection.cursor() as cursor:
                columns = table_columns(cursor, table)
                if not columns:
                    raise ConfigError(f"there is no table {'.'.join(table)} to build rollups of: check PG_TABLE")
                build_rollups(cursor, table, columns)
            connection.commit()
        finally:
            connection.close()
    return EXIT_OK


@dataclass(frozen=True)
class ArchiveState:
    """What the ledger and the table say: enough for --status and the metrics file."""

    ledger: dict[datetime, LedgerEntry]  # the hours InfluxDB still keeps, and the days asked for
    newest: dict[datetime, LedgerEntry]
    first: datetime | None  # the oldest loaded hour
    reading: datetime | None  # the newest row's time


def extract_state(connection, settings: Settings, now: datetime, days: int = 1) -> ArchiveState:
    """Read the archive's state: four indexed queries."""
    table = resolve_table(connection, settings.table)
    first = extract_first_hour(connection, table)
    edge = settings.forgets_before(now)
    since = hour_floor(now).replace(hour=0) - timedelta(days=days)
    since = min(since, max(first, edge) if edge and first else first or since)
    ledger = extract_ledger(connection, table, hour_floor(since))
    with connection.cursor() as cursor:
        reading = None
        if has_rows(cursor, table):
            cursor.execute(f"SELECT max(time)::timestamptz FROM {qualified(table)}")
            reading = cursor.fetchone()[0]
    connection.rollback()
    return ArchiveState(ledger, extract_ledger(connection, table, None), first, reading)


def extract_first_hour(connection, table: tuple[str, ...]) -> datetime | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", (qualified(ledger_of(table)),))
        if cursor.fetchone()[0] is None:
            connection.rollback()
            return None
        cursor.execute(
            f"SELECT min(hour) FROM {qualified(ledger_of(table))} WHERE target_table = ANY(%s)",
            (ledger_keys(table),),
        )
        first = cursor.fetchone()[0]
    connection.rollback()
    return first


def show_status(settings: Settings, now: datetime, days: int) -> int:
    with database_errors():
        connection = connect_postgres(settings)
        try:
            state = extract_state(connection, settings, now, days)
        finally:
            connection.close()
    text, code = status_report(state.ledger, now, settings, days, state.newest, state.first, state.reading)
    print(text)
    return code


def loosely_readable(paths: Iterable[Path]) -> list[str]:
    """Warnings for .env files that other users may read, as ssh warns about keys."""
    warnings = []
    for path in paths:
        mode = path.stat().st_mode & 0o777 if path.is_file() else 0
        if mode & 0o077:
            warnings.append(f"{path} can be read by other users (mode {mode:o}); it holds secrets: chmod 600 {path}")
    return warnings


def env_file_paths(environ: Mapping[str, str]) -> list[Path]:
    """The .env files to read: LOADER_ENV_FILE alone when it is set (empty: none), else
    `.env` in the working directory and beside the script."""
    if "LOADER_ENV_FILE" in environ:
        named = environ["LOADER_ENV_FILE"].strip()
        if named and not Path(named).is_file():
            raise ConfigError(f"LOADER_ENV_FILE names {named}, which is not a file")
        return [Path(named)] if named else []
    return list(dict.fromkeys([Path.cwd() / ".env", Path(__file__).resolve().parent / ".env"]))


def plan_from_args(args: argparse.Namespace, now: datetime, settings: Settings) -> Plan:
    mode = "verify" if args.verify else ("preview" if args.dry_run else "repair") if args.repair else "load"
    return Plan(requested_hours(args, now, settings), mode, args.replace)


@dataclass(frozen=True)
class Outcome:
    """What a run came to: its exit code and the one line that says so."""

    code: int
    line: str


def carry_out(args: argparse.Namespace, settings: Settings, now: datetime) -> Outcome:
    """Do what the arguments ask; every expected failure becomes an Outcome, printed as one line."""
    secrets = settings.secrets()
    try:
        if args.status:
            return Outcome(show_status(settings, now, args.days), "status shown")
        if args.rebuild_rollups:
            return Outcome(rebuild_rollups_of(settings), "rollups rebuilt")
        plan = plan_from_args(args, now, settings)
        loaded = run(settings, plan, args.dry_run, now)
        if plan.mode != "load":
            text, code = summary(loaded, plan)
            print(Redactor(secrets).redact(text))
            return Outcome(code, text)
        return Outcome(EXIT_OK, load_summary(loaded))
    except LoaderError as exc:
        kind = "error: " if exc.exit_code else ""
        lines = Redactor(secrets).redact(str(exc)).splitlines()
        for line in lines:
            print(f"health_metrics_loader: {kind}{line}", file=sys.stderr)
        return Outcome(exc.exit_code, "; ".join(lines))


def load_summary(loaded: Sequence[Loaded]) -> str:
    rows = sum(chunk.rows for chunk in loaded)
    hours = sum(len(chunk.checks) for chunk in loaded)
    rewritten = sum(len(chunk.rewritten) for chunk in loaded)
    return f"loaded {plural(rows, 'row')}: {plural(hours, 'hour')} compared, {rewritten} rewritten" if loaded else "nothing to load"


def main(argv: Sequence[str] | None = None, now: datetime | None = None) -> int:
    """Run the loader; `now` is for tests and schedulers that pass their own clock."""
    started = time.monotonic()
    now = now or datetime.now(timezone.utc)
    secrets: list[str] = []
    env_files: list[Path] = []
    try:
        args = parse_args(argv)
        env_files = env_file_paths(os.environ)
        environ = {**read_env_files(env_files), **os.environ}
        settings = settings_from_env(environ)
        secrets = settings.secrets()
        configure_logging(args, secrets)
        for warning in loosely_readable(env_files):
            log.warning(warning)
    except LoaderError as exc:
        text = str(exc)
        if "is not set" in text and not any(path.is_file() for path in env_files):
            text += " (copy .env.example to .env and fill it in)"
        for line in Redactor(secrets).redact(text).splitlines():
            print(f"health_metrics_loader: error: {line}", file=sys.stderr)
        return exc.exit_code
    outcome = carry_out(args, settings, now)
    report_outcome(settings, args, outcome, now, time.monotonic() - started)
    return outcome.code


if __name__ == "__main__":
    raise SystemExit(main())
