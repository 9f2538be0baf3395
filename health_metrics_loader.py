#!/usr/bin/env python3
"""Copy pulse-oximeter readings from InfluxDB into PostgreSQL, one UTC hour at a time.

Each run asks InfluxDB for 5-second means of the previous complete UTC hour and writes
them to a PostgreSQL table that Grafana can read for years. `--hour` and `--from/--to`
reload chosen hours. Reloading an hour replaces its rows, so nothing is ever duplicated.

Settings come from the environment, then from a `.env` file in the working directory
or beside this script (the environment wins):
    CONNECTION          InfluxDB URL, e.g. https://eu-central-1-1.aws.cloud2.influxdata.com
    TOKEN               InfluxDB API token with read access to the bucket
    ORG                 InfluxDB organization name or ID
    PG_CONNECT          SQLAlchemy URL, e.g. postgresql://pi:secret@localhost:5432/health
    INFLUX_BUCKET       default pulse_oximeter
    INFLUX_MEASUREMENT  default spo2
    AGGREGATE_EVERY     default 5s
    PG_TABLE            default pox_five_second_mean (may be schema.table)
    QUERY_TIMEOUT       seconds per InfluxDB query, default 60
    CATCH_UP_HOURS      how far back the cron call fills missing hours, default 72 (max 720)
    SETTLE_MINUTES      minutes after an hour ends before it counts as complete, default 2
    LOCK_TIMEOUT        seconds --hour and --from/--to wait for another run, default 300
    RETRY_BUDGET        seconds a run may spend waiting to retry InfluxDB, default 180

Every loaded hour is recorded in the table `loaded_hours` (same schema as PG_TABLE),
in the same transaction as its rows. The cron call loads every complete hour of the
last CATCH_UP_HOURS that is not recorded there, oldest first.

Exit codes: 0 success (an hour without data included), 1 the run failed,
2 bad arguments or settings. `--status` exits 1 when the newest loaded hour is
more than two hours old.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # pandas is imported where it is used: `--help` should not pay for it
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


class ConfigError(LoaderError):
    exit_code = EXIT_USAGE


class SourceError(LoaderError):
    """InfluxDB could not be reached, refused the request, or sent a bad answer."""


class TransientSourceError(SourceError):
    """A source failure that a later try may not meet: worth a retry."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IncompleteAnswer(TransientSourceError):
    """The answer was cut off: nothing of it may be written."""


class DataError(LoaderError):
    """InfluxDB answered, but the data cannot be stored as it is."""


class DatabaseError(LoaderError):
    """PostgreSQL could not be reached or refused a statement."""


# -- Settings --------------------------------------------------------------------------
REQUIRED = {
    "CONNECTION": "the InfluxDB URL",
    "TOKEN": "an InfluxDB API token",
    "ORG": "the InfluxDB organization",
    "PG_CONNECT": "the PostgreSQL URL",
}
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
}
MAX_CATCH_UP_HOURS = 720  # InfluxDB Cloud's free plan keeps 30 days
NUMBER_RULES = {  # setting: (the test its value must pass, what it must be)
    "QUERY_TIMEOUT": (lambda n: n > 0, "a positive number of seconds"),
    "CATCH_UP_HOURS": (lambda n: 1 <= n <= MAX_CATCH_UP_HOURS and n == int(n), f"a whole number from 1 to {MAX_CATCH_UP_HOURS}"),
    "SETTLE_MINUTES": (lambda n: 0 <= n <= 59, "a number of minutes from 0 to 59"),
    "LOCK_TIMEOUT": (lambda n: n >= 0, "a number of seconds, 0 or more"),
    "RETRY_BUDGET": (lambda n: n >= 0, "a number of seconds, 0 or more"),
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

    def secrets(self) -> list[str]:
        """Values that must never be printed."""
        from sqlalchemy.engine import make_url

        password = make_url(self.pg_url).password
        return [s for s in (self.token, password) if s]

    def __repr__(self) -> str:  # a stray repr() in a log must not leak the token
        return f"Settings(influx_url={self.influx_url!r}, org={self.org!r}, table={self.table!r})"


def settings_from_env(environ: Mapping[str, str]) -> Settings:
    """Read and check every setting; name all problems at once."""
    get = {k: environ.get(k, "").strip() for k in [*REQUIRED, *DEFAULTS]}
    problems = [f"{k} is not set ({what})" for k, what in REQUIRED.items() if not get[k]]
    values = {k: get[k] or default for k, default in DEFAULTS.items()}

    url = get["CONNECTION"]
    if url and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s]*)?", url):
        problems.append("CONNECTION must be an http:// or https:// URL")
    pg_url = ""
    if get["PG_CONNECT"]:
        try:
            pg_url = postgres_url(get["PG_CONNECT"])
        except ValueError as exc:
            problems.append(f"PG_CONNECT {exc}")
    for name in ("INFLUX_BUCKET", "INFLUX_MEASUREMENT"):
        if any(ord(c) < 32 for c in values[name]):
            problems.append(f"{name} must not contain control characters")
    if duration_ns(values["AGGREGATE_EVERY"]) is None:
        problems.append("AGGREGATE_EVERY must be a Flux duration from 1s to 1h, e.g. 5s or 1m")
    table = tuple(values["PG_TABLE"].split("."))
    if len(table) > 2 or not all(IDENTIFIER.fullmatch(part) for part in table):
        problems.append("PG_TABLE must be a table name or schema.table (letters, digits, _)")
    numbers = {name: number(values[name]) for name in NUMBER_RULES}
    for name, (fits, what) in NUMBER_RULES.items():
        if numbers[name] is None or not fits(numbers[name]):
            problems.append(f"{name} must be {what}")
    if problems:
        hint = " (copy .env.example to .env and fill it in)" if any("is not set" in p for p in problems) else ""
        raise ConfigError("; ".join(problems) + hint)
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
    )


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def duration_ns(text: str) -> int | None:
    """Nanoseconds in a Flux duration like `5s` or `1m30s`, or None if it is not one."""
    parts = DURATION_PART.findall(text)
    if not parts or "".join(n + unit for n, unit in parts) != text:
        return None
    total = sum(int(n) * DURATION_NS[unit] for n, unit in parts)
    return total if 10**9 <= total <= 3600 * 10**9 else None


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
            merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
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
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


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
        raise ValueError(f"{text!r} is not an hour like 2021-07-12T14 or 2021-07-12T14:00:00Z")
    try:
        return datetime.strptime(f"{match[1]}T{match[2]}", "%Y-%m-%dT%H").replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid date and hour") from None


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
    fields = [c for c in block.header if c not in META_COLUMNS and c != "_time" and not block.group.get(c)]
    wrong = [f for f in fields if block.datatypes.get(f) not in NUMERIC_TYPES]
    if wrong:
        raise DataError(f"field {wrong[0]!r} is {block.datatypes.get(wrong[0])}, not a number; only numeric fields can be averaged")
    names = ["", *block.header]
    frame = pd.read_csv(
        io.BytesIO(block.data),
        header=None,
        names=names,
        usecols=["_time", *fields],
        dtype={"_time": str, **{f: "float64" for f in fields}},
        keep_default_na=False,
        na_values={f: ["", "NaN"] for f in fields},
    )
    try:
        frame["_time"] = pd.to_datetime(frame["_time"], format="ISO8601", utc=True)
    except (ValueError, TypeError):
        raise SourceError("InfluxDB sent a _time value that is not an RFC3339 time") from None
    return frame


def read_answer(body: bytes) -> pd.DataFrame:
    """All blocks of an answer, combined into one frame of `_time` and field columns."""
    import pandas as pd

    frames = [frame_from_block(block) for block in split_blocks(body)]
    if not frames:
        return pd.DataFrame({"_time": pd.Series([], dtype="datetime64[ns, UTC]")})
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def clean(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows ready to store: `time` in UTC, sorted and unique, fields as floats."""
    frame = frame.rename(columns={"_time": "time"})
    frame = frame.sort_values("time", kind="stable", ignore_index=True)
    reject_repeated_times(frame)
    return blank_non_finite(frame)


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


def rows_per_hour(frame: pd.DataFrame, window: Window) -> dict[datetime, int]:
    """How many rows belong to each hour; hour H holds the times in (H, H+1h]."""
    import pandas as pd

    hours = (frame["time"] - pd.Timedelta(1, "us")).dt.floor("h").value_counts()
    counts = {stamp.to_pydatetime(): int(n) for stamp, n in hours.items()}
    return {hour: counts.get(hour, 0) for hour in window.hours()}


# -- I/O edges: InfluxDB --------------------------------------------------------------
TRANSIENT_STATUS = {429, 500, 502, 503, 504}


def connect_influx(settings: Settings):
    from influxdb_client import InfluxDBClient

    return InfluxDBClient(
        url=settings.influx_url,
        token=settings.token,
        org=settings.org,
        timeout=int(settings.query_timeout * 1000),
        verify_ssl=True,
    )


@dataclass
class Retrier:
    """Bounded, jittered exponential backoff; one budget of waiting for a whole run."""

    budget: float
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[], float] = random.random
    base: float = 1.0
    cap: float = 60.0
    spent: float = 0.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return min(self.cap, self.base * 2**attempt) * (0.5 + self.jitter() / 2)

    def call(self, action: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return action()
            except TransientSourceError as exc:
                delay = self.delay(attempt, exc.retry_after)
                if self.spent + delay > self.budget:
                    tries = f"{attempt + 1} tries" if attempt else "1 try"
                    raise SourceError(f"{exc}; gave up after {tries} (RETRY_BUDGET {self.budget:g}s)") from None
                attempt += 1
                log.warning("%s; retry %d in %.1fs", exc, attempt, delay)
                self.sleep(delay)
                self.spent += delay


def fetch_answer(query_api, settings: Settings, query: str) -> bytes:
    """One try at the raw annotated CSV; failures say whether a retry may help."""
    from influxdb_client.rest import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return query_api.query_raw(query, org=settings.org).data
    except ApiException as exc:
        if exc.status in TRANSIENT_STATUS:
            raise TransientSourceError(describe_api_error(exc), retry_after=seconds_or_none(exc.retry_after)) from None
        raise SourceError(describe_api_error(exc)) from None
    except HTTPError as exc:  # refused, reset, timed out, or cut off mid-answer
        raise TransientSourceError(
            f"InfluxDB at {settings.influx_url} did not answer ({reason(exc)}): check CONNECTION and the network"
        ) from None


def seconds_or_none(text: str | None) -> float | None:
    value = number(text) if text else None
    return value if value is not None and value >= 0 else None


API_ERRORS = {  # status: (what happened, what to check)
    400: ("InfluxDB rejected the query", ": check ORG, INFLUX_BUCKET, INFLUX_MEASUREMENT and AGGREGATE_EVERY"),
    401: ("InfluxDB refused the token", ": check TOKEN in .env"),
    403: ("InfluxDB denied access", ": check that TOKEN may read INFLUX_BUCKET"),
    404: ("InfluxDB found no such bucket or organization", ": check INFLUX_BUCKET and ORG"),
    429: ("InfluxDB is rate-limiting this organization", ""),
}


def describe_api_error(exc) -> str:
    message = exc.message if exc.status else exc.reason
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    lines = [line.strip() for line in (message or exc.reason or "").splitlines() if line.strip()]
    if exc.status == 0:  # influxdb-client's word for a TLS failure; urllib3's reason is its last line
        return f"InfluxDB could not be reached securely ({' '.join(lines[-1:])}): check CONNECTION and the server's certificate"
    what, hint = API_ERRORS.get(exc.status, ("InfluxDB had a server error" if exc.status >= 500 else "InfluxDB refused the query", ""))
    return f"{what} ({exc.status}: {' '.join(lines[:1])}){hint}"


def reason(exc: BaseException) -> str:
    """A short cause for a urllib3 error, without its nested repr noise."""
    while getattr(exc, "reason", None) is not None and isinstance(exc.reason, BaseException):
        exc = exc.reason
    text = str(exc)
    return text.split(": ", 1)[-1] if "object at 0x" in text else text


def extract_frame(query_api, settings: Settings, window: Window, retrier: Retrier) -> pd.DataFrame:
    """The window's 5-second means, cleaned and ready to store."""
    query = flux_query(settings, window)
    try:
        return retrier.call(lambda: clean(read_answer(fetch_answer(query_api, settings, query))))
    except SourceError as exc:
        # InfluxDB's own message does not say which field (influxdb#23321): ask for the types.
        if "unsupported input type for mean aggregate" in str(exc):
            fields = extract_non_numeric_fields(query_api, settings, window)
            if fields:
                raise DataError(
                    f"field {', '.join(map(repr, fields))} of measurement {settings.measurement!r} is not numeric, "
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


def extract_non_numeric_fields(query_api, settings: Settings, window: Window) -> list[str]:
    """Fields whose values are strings or booleans: one table per series, typed by #datatype."""
    fields = set()
    for block in split_blocks(fetch_answer(query_api, settings, field_types_query(settings, window))):
        if block.datatypes.get("_value") in ("string", "boolean") and "_field" in block.header:
            column = block.header.index("_field") + 1
            fields.update(row[column] for row in csv.reader(block.data.decode().splitlines()) if len(row) > column)
    return sorted(fields)


# -- I/O edges: PostgreSQL ---------------------------------------------------------------
def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def qualified(table: tuple[str, ...]) -> str:
    return ".".join(quote_ident(part) for part in table)


def connect_postgres(settings: Settings):
    """A psycopg2 connection with its session pinned to UTC."""
    import psycopg2
    from sqlalchemy.engine import make_url

    # SQLAlchemy reads the URL, query options such as sslmode included; psycopg2 connects.
    # (Loading SQLAlchemy's PostgreSQL dialect just for this would cost the hourly call 50 ms.)
    url = make_url(settings.pg_url)
    params = {**url.translate_connect_args(username="user", database="dbname"), **url.query}
    try:
        connection = psycopg2.connect(**params)
    except psycopg2.Error as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL ({pg_reason(exc)}): check PG_CONNECT") from None
    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
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


def ensure_table(cursor, table: tuple[str, ...], fields: Sequence[str]) -> dict[str, str]:
    """Create the table, or add a column for each new field; returns its columns' types."""
    columns = table_columns(cursor, table)
    if not columns:
        definitions = ", ".join(["time timestamptz PRIMARY KEY", *(f"{quote_ident(f)} double precision" for f in fields)])
        cursor.execute(f"CREATE TABLE {qualified(table)} ({definitions})")
        return {"time": "timestamp with time zone", **dict.fromkeys(fields, "double precision")}
    if "time" not in columns:
        raise DataError(f"table {'.'.join(table)} has no time column; set PG_TABLE to another table")
    for field in fields:
        if field not in columns:
            log.info("new field %s: adding a column to %s", field, ".".join(table))
            cursor.execute(f"ALTER TABLE {qualified(table)} ADD COLUMN {quote_ident(field)} double precision")
            columns[field] = "double precision"
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


def ledger_of(table: tuple[str, ...]) -> tuple[str, ...]:
    """The ledger lives in the target table's schema."""
    return (*table[:-1], LEDGER)


def ensure_ledger(cursor, table: tuple[str, ...]) -> None:
    cursor.execute(
        f"CREATE TABLE IF NOT EXISTS {qualified(ledger_of(table))} ("
        " target_table text NOT NULL, hour timestamptz NOT NULL, rows integer NOT NULL,"
        " loaded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (target_table, hour))"
    )


def extract_ledger(connection, table: tuple[str, ...], since: datetime) -> dict[datetime, tuple[int, datetime]]:
    """Hours from `since` on that the ledger records: hour -> (rows, loaded_at)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", (qualified(ledger_of(table)),))
        if cursor.fetchone()[0] is None:
            connection.rollback()
            return {}
        cursor.execute(
            f"SELECT hour, rows, loaded_at FROM {qualified(ledger_of(table))} WHERE target_table = %s AND hour >= %s",
            (".".join(table), since),
        )
        found = {hour: (rows, loaded_at) for hour, rows, loaded_at in cursor.fetchall()}
    connection.rollback()
    return found


def record_hours(cursor, table: tuple[str, ...], counts: Mapping[datetime, int], loaded_at: datetime | None) -> None:
    from psycopg2.extras import execute_values

    execute_values(
        cursor,
        f"INSERT INTO {qualified(ledger_of(table))} (target_table, hour, rows, loaded_at) VALUES %s"
        " ON CONFLICT (target_table, hour) DO UPDATE SET rows = EXCLUDED.rows, loaded_at = EXCLUDED.loaded_at",
        [(".".join(table), hour, rows, loaded_at) for hour, rows in counts.items()],
        template="(%s, %s, %s, coalesce(%s::timestamptz, now()))",
    )


class LockBusy(LoaderError):
    exit_code = EXIT_OK


def acquire_lock(connection, table: tuple[str, ...], wait: float | None) -> None:
    """Hold the table's advisory lock for the session; `wait=None` does not wait at all."""
    import psycopg2.errors

    key = f"health_metrics_loader:{'.'.join(table)}"
    name = ".".join(table)
    with connection.cursor() as cursor:
        if wait is None:
            cursor.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,))
            if not cursor.fetchone()[0]:
                connection.rollback()
                raise LockBusy(f"another run is loading {name}; it will catch up, so this one stops here")
        else:
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(wait * 1000)}ms",))
            try:
                cursor.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
            except psycopg2.errors.LockNotAvailable:
                connection.rollback()
                raise DatabaseError(f"another run kept {name} locked for over {wait:g}s (LOCK_TIMEOUT); try again later") from None
    connection.commit()


def stored_rows_per_hour(cursor, table: tuple[str, ...], window: Window) -> dict[datetime, int]:
    cursor.execute(
        "SELECT date_trunc('hour', time::timestamptz - interval '1 microsecond'), count(*)"
        f" FROM {qualified(table)} WHERE time > %s AND time <= %s GROUP BY 1",
        (window.start, window.stop),
    )
    return dict(cursor.fetchall())


@dataclass(frozen=True)
class Chunk:
    """A window's rows ready to store: the frame, its rows per hour, and (if it has no
    empty cell) its binary COPY data."""

    window: Window
    frame: pd.DataFrame
    counts: dict[datetime, int]
    binary: bytes | None


def prepare_chunk(frame: pd.DataFrame, window: Window) -> Chunk:
    return Chunk(window, frame, rows_per_hour(frame, window), copy_binary(frame))


def load_frame(connection, table: tuple[str, ...], frame: pd.DataFrame, window: Window, **options) -> int:
    """Replace the window's rows with `frame` and record its hours, in one transaction."""
    return load_chunk(connection, table, prepare_chunk(frame, window), **options)


def load_chunk(connection, table: tuple[str, ...], chunk: Chunk, keep_unanswered: bool = False, loaded_at: datetime | None = None) -> int:
    """Replace the chunk's window in the table and record its hours, in one transaction.

    With `keep_unanswered`, an hour that InfluxDB answered with no data but that the table
    already holds rows for keeps them: InfluxDB may have forgotten it (retention), or a
    setting may point at the wrong measurement; either way, deleting would lose data.
    """
    window, frame = chunk.window, chunk.frame
    try:
        with connection.cursor() as cursor:
            types = ensure_table(cursor, table, list(frame.columns.drop("time")))
            kept = {}
            if keep_unanswered:
                stored = stored_rows_per_hour(cursor, table, window)
                kept = {hour: stored[hour] for hour, rows in chunk.counts.items() if rows == 0 and stored.get(hour)}
            for part in chunked([hour for hour in window.hours() if hour not in kept]):
                cursor.execute(f"DELETE FROM {qualified(table)} WHERE time > %s AND time <= %s", (part.start, part.stop))
            if len(frame):
                binary = chunk.binary is not None and all(types[c] in BINARY_TYPES for c in frame.columns)
                copy_rows(cursor, table, list(frame.columns), chunk.binary if binary else copy_text(frame), binary)
            ensure_ledger(cursor, table)
            record_hours(cursor, table, {**chunk.counts, **kept}, loaded_at)
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
        raise DatabaseError(f"PostgreSQL refused the load of {window} ({pg_reason(exc)}); nothing of it was written") from None
    for hour, rows in kept.items():
        log.warning(
            "InfluxDB has no data for %s, which holds %d rows; kept them (--hour %s replaces them)", iso(hour), rows, iso(hour)[:13]
        )
    return len(frame)


# -- Status ------------------------------------------------------------------------------
MARK_LOADED, MARK_EMPTY, MARK_MISSING, MARK_PENDING = "#", "o", ".", " "


def runs(hours: Sequence[datetime]) -> list[tuple[datetime, datetime]]:
    """Contiguous hours as (first, last) pairs."""
    return [(w.start, w.stop - HOUR) for w in chunked(hours, max_hours=max(1, len(hours)))]


def status_report(ledger: Mapping[datetime, tuple[int, datetime]], now: datetime, settings: Settings, days: int) -> tuple[str, int]:
    """The text of `--status` and its exit code: 1 when the newest loaded hour is over 2 hours old."""
    latest = latest_complete_hour(now, settings.settle)
    lines = []
    if ledger:
        newest = max(ledger)
        rows, loaded_at = ledger[newest]
        lines.append(f"newest loaded hour: {iso(newest)} ({rows} rows), loaded {ago(now - loaded_at)} ago")
    else:
        lines.append("newest loaded hour: none yet")
    lines.append(f"last {days} days (UTC), one mark per hour: {MARK_LOADED} loaded, {MARK_EMPTY} loaded but empty, {MARK_MISSING} missing")
    today = hour_floor(now).replace(hour=0)
    for day in (today - timedelta(days=d) for d in reversed(range(days))):
        hours = [day + h * HOUR for h in range(24)]
        marks = "".join(
            MARK_PENDING if hour > latest else MARK_MISSING if hour not in ledger else MARK_LOADED if ledger[hour][0] else MARK_EMPTY
            for hour in hours
        )
        loaded = [h for h in hours if h in ledger]
        missing = [
            f"{first.hour:02d}-{last.hour:02d}" if last > first else f"{first.hour:02d}"
            for first, last in runs([h for h in hours if h not in ledger and h <= latest])
        ]
        line = f"  {day:%Y-%m-%d}  {marks}  {len(loaded):2d}/24 {sum(ledger[h][0] for h in loaded):7d} rows"
        lines.append(line + (f"  missing {','.join(missing)}" if missing else ""))
    gaps = missing_hours(complete_hours(now, settings.settle, settings.catch_up_hours), ledger)
    span = f"the last {settings.catch_up_hours} hours"
    lines.append(
        f"missing in {span}: "
        + (
            ", ".join(f"{iso(first)}..{iso(last + HOUR)}" if last > first else iso(first) for first, last in runs(gaps))
            + f" ({len(gaps)} hours)"
            if gaps
            else "none"
        )
    )
    stale = not ledger or now - (max(ledger) + HOUR) > timedelta(hours=2)
    return "\n".join(lines), EXIT_FAILED if stale and latest not in ledger else EXIT_OK


def ago(delta: timedelta) -> str:
    minutes = max(0, int(delta.total_seconds() // 60))
    count, unit = (minutes, "minute") if minutes < 120 else (minutes // 60, "hour") if minutes < 48 * 60 else (minutes // 1440, "day")
    return f"{count} {unit}{'' if count == 1 else 's'}"


# -- Command line ------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="health_metrics_loader.py",
        description="Copy 5-second means of pulse-oximeter readings from InfluxDB into PostgreSQL. "
        "With no arguments (the cron call), load every complete UTC hour of the last CATCH_UP_HOURS "
        "that is not loaded yet, which is usually just the previous hour.",
        epilog="Exit codes: 0 success, 1 the run failed, 2 bad arguments or settings.",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--hour", metavar="HOUR", help="load one UTC hour, e.g. 2021-07-12T14, replacing its rows")
    what.add_argument("--from", dest="start", metavar="HOUR", help="load every hour from this one (needs --to)")
    what.add_argument("--status", action="store_true", help="show which hours are loaded; exit 1 if the newest is over 2 hours old")
    parser.add_argument("--to", dest="stop", metavar="HOUR", help="... up to, not including, this one")
    parser.add_argument("--days", type=int, default=7, metavar="N", help="days that --status shows (default 7)")
    parser.add_argument("--dry-run", action="store_true", help="query and report rows per hour; write nothing")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="log more")
    loudness.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    args = parser.parse_args(argv)
    if (args.start is None) != (args.stop is None):
        parser.error("--from and --to go together")
    if not 1 <= args.days <= 366:
        parser.error("--days must be from 1 to 366")
    return args


def requested_windows(args: argparse.Namespace, now: datetime, settle: timedelta) -> list[Window] | None:
    """The windows that --hour or --from/--to ask for; None for the cron call, which asks the ledger."""
    if args.hour:
        hours = [parse_hour(args.hour)]
    elif args.start:
        start, stop = parse_hour(args.start), parse_hour(args.stop)
        if stop <= start:
            raise ValueError("--to must be after --from")
        hours = Window(start, stop).hours()
    else:
        return None
    latest = latest_complete_hour(now, settle)
    if hours[-1] > latest:
        raise ValueError(
            f"hour {iso(hours[-1])} is not complete yet: an hour counts as complete SETTLE_MINUTES "
            f"({settle.total_seconds() / 60:g}) after it ends; the latest complete hour is {iso(latest)}"
        )
    return chunked(hours)


def configure_logging(args: argparse.Namespace, secrets: Sequence[str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    handler.addFilter(Redactor(secrets))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)


class Redactor(logging.Filter):
    """Masks secrets in every log line, whatever put them there."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), None
        return True


def catch_up_windows(connection, settings: Settings, now: datetime) -> list[Window]:
    """The complete hours of the catch-up span that the ledger lacks, as chunks."""
    candidates = complete_hours(now, settings.settle, settings.catch_up_hours)
    return chunked(missing_hours(candidates, extract_ledger(connection, settings.table, candidates[0])))


def load_windows(
    settings: Settings,
    connection,
    query_api,
    windows: Sequence[Window],
    retrier: Retrier,
    catching_up: bool = False,
    now: datetime | None = None,
) -> int:
    """Extract and load each window, oldest first; a failure stops the run.

    A second thread fetches and prepares the next window while PostgreSQL takes the
    current one, so a backfill costs little more than its COPYs.
    """
    from concurrent.futures import ThreadPoolExecutor

    def prepare(window: Window) -> Chunk:
        return prepare_chunk(extract_frame(query_api, settings, window, retrier), window)

    total = 0
    with ThreadPoolExecutor(max_workers=1) as worker:
        upcoming = worker.submit(prepare, windows[0])
        for index, window in enumerate(windows):
            started = time.monotonic()
            chunk = upcoming.result()
            if index + 1 < len(windows):
                upcoming = worker.submit(prepare, windows[index + 1])
            rows = load_chunk(connection, settings.table, chunk, keep_unanswered=catching_up, loaded_at=now)
            log.info("loaded %s: %d rows in %.2fs", window, rows, time.monotonic() - started)
            total += rows
    return total


def report_windows(settings: Settings, query_api, windows: Sequence[Window], retrier: Retrier) -> None:
    for window in windows:
        for hour, rows in rows_per_hour(extract_frame(query_api, settings, window, retrier), window).items():
            print(f"{iso(hour)}  {rows} rows")


def run(
    settings: Settings,
    windows: Sequence[Window] | None,
    dry_run: bool = False,
    now: datetime | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Load `windows`, or with None catch up on what the ledger lacks; returns rows written."""
    retrier = Retrier(settings.retry_budget, sleep=sleep)
    connection = None
    client = connect_influx(settings)
    try:
        with database_errors():
            if windows is None or not dry_run:
                connection = connect_postgres(settings)
            if not dry_run:
                acquire_lock(connection, settings.table, wait=None if windows is None else settings.lock_timeout)
            catching_up = windows is None
            if catching_up:
                windows = catch_up_windows(connection, settings, now or datetime.now(timezone.utc))
                if not windows:
                    log.info("nothing to load: the last %d complete hours are all loaded", settings.catch_up_hours)
                    return 0
            if dry_run:
                report_windows(settings, client.query_api(), windows, retrier)
                return 0
            return load_windows(settings, connection, client.query_api(), windows, retrier, catching_up, now)
    finally:
        client.close()
        if connection is not None:
            connection.close()


def load_window(settings: Settings, start: datetime, stop: datetime) -> int:
    """Load the whole hours in [start, stop), replacing their rows; for schedulers such as Airflow."""
    if start.tzinfo is None or stop.tzinfo is None or start != hour_floor(start) or stop != hour_floor(stop) or stop <= start:
        raise ValueError("start and stop must be timezone-aware whole hours, start before stop")
    return run(settings, chunked(Window(start, stop).hours()))


def show_status(settings: Settings, now: datetime, days: int) -> int:
    since = min(hour_floor(now).replace(hour=0) - timedelta(days=days), now - timedelta(hours=settings.catch_up_hours + 1))
    with database_errors():
        connection = connect_postgres(settings)
        try:
            ledger = extract_ledger(connection, settings.table, hour_floor(since))
        finally:
            connection.close()
    text, code = status_report(ledger, now, settings, days)
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


def main(argv: Sequence[str] | None = None, now: datetime | None = None) -> int:
    """Run the loader; `now` is for tests and schedulers that pass their own clock."""
    args = parse_args(argv)
    now = now or datetime.now(timezone.utc)
    env_files = list(dict.fromkeys([Path.cwd() / ".env", Path(__file__).resolve().parent / ".env"]))
    secrets: list[str] = []
    try:
        environ = {**read_env_files(env_files), **os.environ}
        settings = settings_from_env(environ)
        secrets = settings.secrets()
        configure_logging(args, secrets)
        for warning in loosely_readable(env_files):
            log.warning(warning)
        if args.status:
            return show_status(settings, now, args.days)
        try:
            windows = requested_windows(args, now, settings.settle)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        run(settings, windows, args.dry_run, now)
    except LoaderError as exc:
        kind = "error: " if exc.exit_code else ""
        print(f"health_metrics_loader: {kind}{Redactor(secrets).redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
