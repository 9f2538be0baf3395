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


# The steps Grafana rounds a panel's interval to (rangeutil.roundInterval), as (below, step) in ms.
ROUNDED = [
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000), (3500, 2000), (7500, 5000),
    (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000), (90000, 60000), (210000, 120000),
    (450000, 300000), (750000, 600000), (1050000, 900000), (1500000, 1200000), (2700000, 1800000),
    (5400000, 3600000), (9000000, 7200000), (16200000, 10800000), (32400000, 21600000), (86400000, 43200000),
    (604800000, 86400000), (1814400000, 604800000), (3628800000, 2592000000),
]  # fmt: skip


def panel_interval_ms(range_ms: int, max_data_points: int, min_interval_ms: int = 0) -> int:
    """The $__interval_ms Grafana gives a panel: range / points, rounded, never below the panel's minimum."""
    wanted = range_ms / max_data_points
    step = next((step for below, step in ROUNDED if wanted < below), 31536000000)
    return max(step, min_interval_ms)
