"""The benchmark runs end to end (its figures are for people; nothing here times anything)."""

from __future__ import annotations

import re

from tests import benchmark


def test_benchmark_runs_on_one_day(capsys):
    assert benchmark.main(["--days", "1", "--repeat", "1", "--blog-processes", "2", "--read-days", "8"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(loader, 1-day backfill|blog pipeline, 1 days) .*?MiB\s+([\d,]+)", out, re.M))
    assert rows == {"loader, 1-day backfill": "17,280", "blog pipeline, 1 days": "17,280"}
    assert re.search(r"^loader, hourly cron call .* 720\s+1$", out, re.M)
    assert re.search(r"^  the same, re-checking 6 hours .* 720\s+1$", out, re.M)
    assert re.search(r"^loader, 1-day --verify .* 17,280\s+1$", out, re.M)
    assert re.search(r"^influxql, 1 days, emulator .* 17,280\s+2$", out, re.M)  # the day, and the new table's field check
    assert "floor: import the dependencies" in out
    assert re.search(r"^138240 rows of 5-second means, ", out, re.M)  # the read side, on 8 days
    assert [line.split()[0] + " " + line.split()[1] for line in out.splitlines() if re.match(r"^(6 h|24 h|7 d|30 d|1 y) ", line)] == [
        "6 h",
        "24 h",
        "7 d",
    ]
