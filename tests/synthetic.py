"""Synthetic 1 Hz pulse-oximeter readings, and the 5-second means they should give."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone


def reading(second: int) -> tuple[int, float]:
    """(pulse, spo2) at a Unix second: a slow wave plus a little deterministic wobble."""
    pulse = 72 + round(8 * math.sin(second / 600)) + (second * 7919) % 5 - 2
    spo2 = round(96.5 + 1.5 * math.sin(second / 900) + ((second * 104729) % 7 - 3) / 10, 1)
    return pulse, spo2


def line_protocol(start: datetime, hours: float, uid: str = "A", measurement: str = "spo2") -> str:
    """Line protocol, precision s: `pulse` as an integer field and `spo2` as a float."""
    first = int(start.timestamp())
    lines = []
    for second in range(first, first + int(hours * 3600)):
        pulse, spo2 = reading(second)
        lines.append(f"{measurement},uid={uid} pulse={pulse}i,spo2={spo2} {second}")
    return "\n".join(lines) + "\n"


def expected_rows(start: datetime, hours: float, every: int = 5) -> list[tuple[datetime, float, float]]:
    """(time, pulse mean, spo2 mean) for data written by `line_protocol` over the same span."""
    first = int(start.timestamp())
    rows = []
    for window in range(first, first + int(hours * 3600), every):
        values = [reading(s) for s in range(window, window + every)]
        stamp = datetime.fromtimestamp(window + every, timezone.utc)
        rows.append((stamp, sum(p for p, _ in values) / every, sum(s for _, s in values) / every))
    return rows


def hour_range(start: datetime, hours: int) -> list[datetime]:
    return [start + timedelta(hours=i) for i in range(hours)]
