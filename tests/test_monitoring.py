"""Hearing about it: pings in healthchecks.io's protocol, a metrics file read by the real
node_exporter and linted by promtool, the alert rules, gaps at risk in --status, and a
machine clock that runs ahead of InfluxDB's."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg2
import pytest

import health_metrics_loader as hml
from tests.conftest import ROOT, TOKEN, run_loader, unavailable, utc
from tests.pg_server import PASSWORD, free_port
from tests.synthetic import line_protocol
from tests.test_catch_up import ledger

H14 = utc(2021, 7, 12, 14)
NOW = H14 + timedelta(hours=1, minutes=5)
SECRET_PATH = "ping/5f1c0a9e-secret-check-uuid"


def call(capsys, argv=(), now=NOW):
    return run_loader(capsys, argv, now)


def warnings(err: str) -> list[str]:
    return [line.split(" WARNING ", 1)[1] for line in err.splitlines() if " WARNING " in line]


# -- Pings ---------------------------------------------------------------------------------------
class Receiver(ThreadingHTTPServer):
    """A healthchecks.io stand-in that records each ping: (path, body)."""

    def __init__(self) -> None:
        self.pings: list[tuple[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:  # noqa: N805
                body = handler.rfile.read(int(handler.headers.get("Content-Length", 0))).decode()
                self.pings.append((handler.path, body))
                handler.send_response(200)
                handler.send_header("Content-Length", "2")
                handler.end_headers()
                handler.wfile.write(b"OK")

            def log_message(handler, *args) -> None:  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{SECRET_PATH}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receiver(monkeypatch):
    server = Receiver()
    monkeypatch.setenv("PING_URL", server.url())
    yield server
    server.close()


@pytest.fixture
def hour14(loader_env, influx, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "1")
    influx.write_lines("pulse_oximeter", line_protocol(H14, 1), precision="s")
    return loader_env


def test_a_successful_cron_call_pings_the_url_with_its_summary(hour14, receiver, capsys):
    code, out, err = call(capsys)
    assert code == 0, err
    assert receiver.pings == [(f"/{SECRET_PATH}", "loaded 720 rows: 1 hour compared, 1 rewritten")]
    assert SECRET_PATH not in out + err


def test_a_failed_run_pings_its_exit_code_with_the_error_and_never_the_token(hour14, receiver, capsys, monkeypatch):
    monkeypatch.setenv("TOKEN", "wrong-" + TOKEN)
    code, _, err = call(capsys)
    assert code == 1
    assert receiver.pings == [
        (f"/{SECRET_PATH}/1", "InfluxDB refused the token (401: unauthorized access): check TOKEN in .env"),
    ]
    assert TOKEN not in receiver.pings[0][1] and SECRET_PATH not in err


def test_verify_pings_its_summary_and_a_cron_call_that_steps_aside_counts_as_success(hour14, receiver, capsys, fresh_db):
    assert call(capsys)[0] == 0
    code, out, _ = call(capsys, ["--verify", "--hour", "2021-07-12T14"])
    assert code == 0 and receiver.pings[-1] == (f"/{SECRET_PATH}", out.strip())
    holder = psycopg2.connect(fresh_db)
    holder.cursor().execute("SELECT pg_advisory_lock(hashtext('health_metrics_loader:public.pox_five_second_mean'))")
    try:
        code, _, err = call(capsys, now=NOW + timedelta(hours=1))
    finally:
        holder.close()
    assert code == 0
    assert receiver.pings[-1] == (
        f"/{SECRET_PATH}",
        "another run is loading public.pox_five_second_mean; it will catch up, so this one stops here",
    )
    assert call(capsys, ["--status"])[0] == 0 and len(receiver.pings) == 3  # --status is no load: no ping


def test_a_receiver_that_never_answers_costs_seconds_not_the_run(hour14, capsys, monkeypatch):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the kernel; nobody ever answers
    monkeypatch.setenv("PING_URL", f"http://127.0.0.1:{silent.getsockname()[1]}/{SECRET_PATH}")
    try:
        started = time.monotonic()
        code, out, err = call(capsys)
        spent = time.monotonic() - started
    finally:
        silent.close()
    assert code == 0 and spent < 15
    assert [w.split(" (")[0] for w in warnings(err)] == ["could not ping 127.0.0.1"]
    assert SECRET_PATH not in out + err
    assert ledger(hour14["PG_CONNECT"]) == {H14: 720}


def test_a_receiver_that_refuses_connections_is_one_warning(hour14, capsys, monkeypatch):
    monkeypatch.setenv("PING_URL", f"http://127.0.0.1:{free_port()}/{SECRET_PATH}")
    code, out, err = call(capsys)
    assert code == 0
    assert len(warnings(err)) == 1 and warnings(err)[0].startswith("could not ping 127.0.0.1 (")
    assert SECRET_PATH not in out + err


# -- The metrics file, read by node_exporter ------------------------------------------------------------
@pytest.fixture
def node_exporter(tmp_path):
    binary = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if not binary:
        unavailable("prometheus-node-exporter is not installed (Debian: apt-get install prometheus-node-exporter)")
    folder = tmp_path / "textfile"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [binary, "--collector.disable-defaults", "--collector.textfile", f"--collector.textfile.directory={folder}"]
        + [f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("node_exporter did not start")
            time.sleep(0.1)
    yield folder, url
    process.terminate()
    process.wait(timeout=10)


def scrape(url: str) -> dict[str, float]:
    """Every sample node_exporter serves, by its name and labels."""
    samples = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_node_exporter_serves_every_gauge_and_a_failed_run_keeps_what_it_cannot_know(hour14, node_exporter, capsys, monkeypatch):
    folder, url = node_exporter
    monkeypatch.setenv("METRICS_FILE", str(folder / "health_metrics_loader.prom"))
    monkeypatch.setenv("CATCH_UP_HOURS", "3")
    code, _, err = call(capsys)
    assert code == 0, err
    samples = scrape(url)
    ours = {k.split("{")[0].removeprefix("health_metrics_loader_"): v for k, v in samples.items() if k.startswith("health_metrics_loader_")}
    assert all(k.endswith('{table="public.pox_five_second_mean"}') for k in samples if k.startswith("health_metrics_loader_"))
    duration = ours.pop("last_run_duration_seconds")
    assert 0 < duration < 30
    assert ours == {
        "last_run_timestamp_seconds": pytest.approx(NOW.timestamp() + duration, abs=0.01),
        "last_run_exit_code": 0,
        "last_success_timestamp_seconds": pytest.approx(NOW.timestamp() + duration, abs=0.01),
        "newest_hour_timestamp_seconds": H14.timestamp(),
        "newest_reading_timestamp_seconds": (H14 + timedelta(hours=1)).timestamp(),
        "missing_seconds": 0,
        "retention_margin_seconds": float("inf"),
    }
    assert samples["node_textfile_scrape_error"] == 0
    good = ours["last_success_timestamp_seconds"]

    monkeypatch.setenv("PG_CONNECT", f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/nowhere")
    code, _, err = call(capsys, now=NOW + timedelta(hours=1))
    assert code == 1
    samples = scrape(url)
    ours = {k.split("{")[0].removeprefix("health_metrics_loader_"): v for k, v in samples.items() if k.startswith("health_metrics_loader_")}
    assert ours["last_run_exit_code"] == 1
    assert ours["last_success_timestamp_seconds"] == pytest.approx(good, abs=0.01)
    assert ours["newest_hour_timestamp_seconds"] == H14.timestamp() and ours["missing_seconds"] == 0
    assert samples['health_metrics_loader_last_run_exit_code{table="public.pox_five_second_mean"}'] == 1  # the resolved name, kept
    assert samples["node_textfile_scrape_error"] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["health_metrics_loader.prom"]  # no temporary file left
    assert PASSWORD not in err


def test_two_missing_hours_are_7200_seconds_and_their_margin_counts_down(loader_env, influx, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("METRICS_FILE", str(tmp_path / "loader.prom"))
    influx.write_lines("pulse_oximeter", line_protocol(H14 - timedelta(hours=3), 4), precision="s")
    for hour in ("2021-07-12T11", "2021-07-12T14"):
        assert call(capsys, ["--hour", hour])[0] == 0
    values, table = hml.previous_metrics(tmp_path / "loader.prom")
    assert table == "public.pox_five_second_mean"
    assert values["missing_seconds"] == 7200
    assert values["retention_margin_seconds"] == (H14 - timedelta(hours=2) + timedelta(hours=720) - NOW).total_seconds()


def test_promtool_finds_nothing_to_lint_in_the_metrics_file(hour14, capsys, monkeypatch, tmp_path):
    if not shutil.which("promtool"):
        unavailable("promtool is not installed (Debian: apt-get install prometheus)")
    monkeypatch.setenv("METRICS_FILE", str(tmp_path / "loader.prom"))
    assert call(capsys)[0] == 0
    result = subprocess.run(["promtool", "check", "metrics"], stdin=(tmp_path / "loader.prom").open(), capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_alert_rules_pass_their_promtool_tests():
    if not shutil.which("promtool"):
        unavailable("promtool is not installed (Debian: apt-get install prometheus)")
    result = subprocess.run(
        ["promtool", "test", "rules", "health_metrics_loader.rules.test.yml"], cwd=ROOT / "prometheus", capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["Unit", "Testing:", "health_metrics_loader.rules.test.yml", "SUCCESS"]


# -- Gaps at risk in --status -------------------------------------------------------------------------
def ledger_with_a_gap(url: str, first, last, gap: list) -> None:
    hours = [first + timedelta(hours=i) for i in range(int((last - first) / timedelta(hours=1)) + 1)]
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE loaded_hours (target_table text, hour timestamptz, rows integer, loaded_at timestamptz,"
                       " checked_at timestamptz, repaired_at timestamptz, PRIMARY KEY (target_table, hour))")  # fmt: skip
        cursor.executemany(
            "INSERT INTO loaded_hours VALUES ('public.pox_five_second_mean', %s, 720, %s)",
            [(h, h + timedelta(hours=1)) for h in hours if h not in gap],
        )


@pytest.mark.parametrize("retention, code", [("720", 1), ("0", 0)])
def test_a_gap_27_days_back_is_named_with_its_time_left(loader_env, capsys, monkeypatch, retention, code):
    now = utc(2021, 8, 10, 12, 5)
    gap = [utc(2021, 7, 14, 5) + timedelta(hours=i) for i in range(3)]
    ledger_with_a_gap(loader_env["PG_CONNECT"], utc(2021, 7, 13), utc(2021, 8, 10, 11), gap)
    monkeypatch.setenv("INFLUX_RETENTION_HOURS", retention)
    got, out, _ = call(capsys, ["--status", "--days", "1"], now=now)
    assert got == code
    when = "forgotten in 2.7 days" if retention == "720" else "never forgotten"
    held = "InfluxDB still holds them" if retention == "720" else "InfluxDB keeps them"
    assert out.splitlines()[-2:] == [
        f"not loaded, and {held} (3 hours):",
        f"  2021-07-14T05:00:00Z..2021-07-14T08:00:00Z  {when}; load it with --from 2021-07-14T05 --to 2021-07-14T08",
    ]


# -- An honest clock -----------------------------------------------------------------------------------
def test_a_machine_clock_ahead_of_influxdb_s_records_no_hour_that_has_not_ended_there(loader_env, influx, capsys, monkeypatch):
    monkeypatch.setenv("CATCH_UP_HOURS", "6")
    influx.write_lines("pulse_oximeter", line_protocol(H14 - timedelta(hours=5), 6), precision="s")
    influx.clock_offset = -3 * 3600  # InfluxDB's Date header: three hours behind this machine
    code, _, err = call(capsys)
    assert code == 0, err
    assert warnings(err) == [
        "this machine's clock says 2021-07-12T15:05:00Z, InfluxDB's says 2021-07-12T12:05:00Z: hours are taken as complete by InfluxDB's clock"
    ]
    assert sorted(ledger(loader_env["PG_CONNECT"])) == [H14 - timedelta(hours=h) for h in (5, 4, 3)]  # 09, 10, 11
    influx.clock_offset = 0
    assert call(capsys)[0] == 0
    assert ledger(loader_env["PG_CONNECT"]) == {H14 - timedelta(hours=h): 720 for h in range(6)}


def test_a_clock_behind_influxdb_s_only_delays_loading(hour14, influx, capsys):
    influx.clock_offset = 3 * 3600
    code, _, err = call(capsys)
    assert code == 0
    assert len(warnings(err)) == 1 and warnings(err)[0].endswith("the later one only delays loading")
    assert ledger(hour14["PG_CONNECT"]) == {H14: 720}
