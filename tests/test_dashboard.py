"""grafana/pulse_oximeter.json: every panel's SQL, expanded as Grafana expands it, run against a
year of archive in a real PostgreSQL, and compared with what the raw rows give."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

import health_metrics_loader as hml
from tests.conftest import ROOT, utc
from tests.grafana_macros import expand, panel_interval_ms, parse_interval
from tests.synthetic import line_protocol
from tests.test_rollups import assert_same_buckets, grafana_rows, make_year

DASHBOARD = json.loads((ROOT / "grafana" / "pulse_oximeter.json").read_text())
END = utc(2021, 7, 2, 6)
RANGES = {"6h": timedelta(hours=6), "24h": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30), "1y": timedelta(days=365)}


def targets():
    return [(panel, target) for panel in DASHBOARD["panels"] for target in panel["targets"]]


def test_the_dashboard_imports_with_one_data_source_input():
    (source,) = DASHBOARD["__inputs"]
    assert (source["type"], source["pluginId"]) == ("datasource", "grafana-postgresql-datasource")
    wanted = {"type": "grafana-postgresql-datasource", "uid": "${" + source["name"] + "}"}
    assert all(panel["datasource"] == wanted and target["datasource"] == wanted for panel, target in targets())
    assert len({panel["id"] for panel in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])
    assert [panel["title"] for panel in DASHBOARD["panels"]] == [
        "SpO2: mean of each step, with its lowest and highest 5-second mean",
        "Pulse: mean of each step, with its lowest and highest 5-second mean",
        "SpO2 over the range",
        "Newest loaded hour",
        "Hours loaded per day (UTC)",
    ]


@pytest.fixture
def year(loader_env, influx, capsys, pg):
    """A year of the blog's rows, then the first run of the loader, which builds the rollups."""
    make_year(loader_env["PG_CONNECT"])
    influx.write_lines("pulse_oximeter", line_protocol(END - timedelta(hours=3), 3), precision="s")
    assert hml.main([], now=END + timedelta(minutes=5)) == 0
    capsys.readouterr()
    return pg


def run_panel(pg, panel, target, span):
    start, stop = END - span, END
    step = panel_interval_ms(
        int(span.total_seconds() * 1000), panel.get("maxDataPoints", 1000), parse_interval(panel.get("interval", "1ms"))
    )
    with pg.cursor() as cursor:
        cursor.execute(expand(target["rawSql"], start, stop, step))
        return [cursor.description[i].name for i in range(len(cursor.description))], cursor.fetchall(), (start, stop, step)


@pytest.mark.parametrize("span", list(RANGES), ids=list(RANGES))
def test_every_panel_gives_what_the_raw_rows_give(year, span):
    pg = year
    series, stat, newest, per_day = targets()[0], targets()[2], targets()[3], targets()[4]
    for (panel, target), field in ((series, "spo2"), (targets()[1], "pulse")):
        names, rows, (start, stop, step) = run_panel(pg, panel, target, RANGES[span])
        assert names == ["time", f"{field} mean", f"{field} lowest", f"{field} highest"]
        want = [
            (r[0], *r[1 + 3 * ["pulse", "spo2"].index(field) : 4 + 3 * ["pulse", "spo2"].index(field)])
            for r in grafana_rows(pg, start, stop, step)
        ]
        assert_same_buckets([(row[0].timestamp(), *row[1:]) for row in rows], want)
        assert rows, "a panel with no data proves nothing"
    names, rows, (start, stop, _) = run_panel(pg, *stat, RANGES[span])
    with pg.cursor() as cursor:
        cursor.execute("SELECT avg(spo2), min(spo2) FROM pox_five_second_mean WHERE time BETWEEN %s AND %s", (start, stop))
        average, lowest = cursor.fetchone()
    assert names == ["average SpO2", "lowest SpO2"]
    assert rows[0][0] == pytest.approx(average, rel=1e-9) and rows[0][1] == lowest
    assert run_panel(pg, *newest, RANGES[span])[1] == [(END - timedelta(hours=1),)]
    names, rows, (start, stop, _) = run_panel(pg, *per_day, RANGES[span])
    with pg.cursor() as cursor:
        cursor.execute("SELECT hour, rows FROM loaded_hours WHERE hour BETWEEN %s AND %s", (start, stop))
        ledger = cursor.fetchall()
    days = {}
    for hour, count in ledger:
        day = hour.replace(hour=0)
        days.setdefault(day, [0, 0])[0 if count else 1] += 1
    assert names == ["time", "with readings", "empty"]
    assert [(t, a, b) for t, a, b in rows] == [(day, *counts) for day, counts in sorted(days.items())]
