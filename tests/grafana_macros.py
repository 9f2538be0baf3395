"""Grafana's PostgreSQL data source, as far as the dashboard needs it: the macros expanded as
Grafana expands them (pkg/tsdb/grafana-postgresql-datasource/macros.go and sqleng), so that
every panel's SQL can be run against a real PostgreSQL."""

from __future__ import annotations

import re
from datetime import datetime, timezone

MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")


def rfc3339nano(moment: datetime) -> str:
    """Go's time.RFC3339Nano in UTC: trailing zeros of the fraction dropped, `Z` for UTC."""
    utc = moment.astimezone(timezone.utc)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += ("." + f"{utc.microsecond:06d}").rstrip("0")
    return text + "Z"


def format_interval(milliseconds: int) -> str:
    """gtime.FormatInterval: the largest unit that fits, in whole units (1m30s becomes 1m)."""
    for unit, size in (("y", 365 * 86_400_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        if milliseconds >= size:
            return f"{milliseconds // size}{unit}"
    return "1ms"


def go_seconds(milliseconds: int) -> str:
    """fmt's %v of a float64 number of seconds: the shortest form, no exponent below 1e21."""
    text = repr(milliseconds / 1000)
    return text[:-2] if text.endswith(".0") else text


def parse_interval(text: str) -> int:
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d|w|y)", text.strip("'"))
    if not match:
        raise ValueError(f"error parsing interval {text}")
    size = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000, "y": 365 * 86_400_000}
    return int(match[1]) * size[match[2]]


def expand(sql: str, start: datetime, stop: datetime, interval_ms: int) -> str:
    """The SQL Grafana sends for a panel over [start, stop] with the panel's interval."""
    if parse_interval(format_interval(interval_ms)) != interval_ms:
        raise ValueError(f"{interval_ms} ms is not an interval Grafana's $__interval can name exactly")
    sql = sql.replace("$__interval_ms", str(interval_ms)).replace("$__interval", format_interval(interval_ms))

    def macro(match: re.Match) -> str:
        name, args = match[1], [a.strip() for a in match[2].split(",")]
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{rfc3339nano(start)}' AND '{rfc3339nano(stop)}'"
        if name == "__timeFrom":
            return f"'{rfc3339nano(start)}'"
        if name == "__timeTo":
            return f"'{rfc3339nano(stop)}'"
        if name in ("__timeGroup", "__timeGroupAlias"):
            seconds = go_seconds(parse_interval(args[1]))
            group = f"floor(extract(epoch from {args[0]})/{seconds})*{seconds}"
            return group + (' AS "time"' if name == "__timeGroupAlias" else "")
        raise ValueError(f"unknown macro {name!r}")

    return MACRO.sub(macro, sql)
