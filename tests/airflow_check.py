"""Run the README's Airflow DAG under a real Airflow 3 and check which hours it loads.

    python -m tests.airflow_check

Creates (or reuses) the virtual environment `.venv-airflow` with apache-airflow>=3 and the
project's requirements, copies the DAG out of README.md (so the docs cannot drift from what
was checked), and runs it with `dag.test()` for the logical dates 15:05 and 16:05 against
the InfluxDB emulator and a throwaway PostgreSQL. Exits 1 on any difference. Airflow is
heavy, so this is not part of the test suite.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import venv
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2

from tests.influxdb_emulator import Emulator
from tests.pg_server import ThrowawayPostgres
from tests.synthetic import line_protocol

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("AIRFLOW_CHECK_VENV", ROOT / ".venv-airflow"))
TOKEN, ORG = "airflow-check-token-51c0", "airflow-check-org"
DAY = datetime(2026, 11, 12, tzinfo=timezone.utc)  # after the DAG's start_date: Airflow runs no task before it
RUNS = [  # logical date -> the one hour it must load
    (DAY.replace(hour=15, minute=5), DAY.replace(hour=14)),
    (DAY.replace(hour=16, minute=5), DAY.replace(hour=15)),
]

# Runs inside the Airflow environment: load the DAG file from the dags folder and test it.
RUNNER = """
import importlib.util, sys, pendulum
spec = importlib.util.spec_from_file_location("readme_dag", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
dags = [v for v in vars(module).values() if type(v).__name__ == "DAG"]
dag = dags[0] if dags else module.pulse_oximeter()
run = dag.test(logical_date=pendulum.parse(sys.argv[2]))
print("DAG RUN STATE", run.state)
sys.exit(0 if str(run.state) in ("success", "DagRunState.SUCCESS") else 1)
"""


def readme_dag() -> str:
    """The python block under the README's Airflow heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Or Apache Airflow", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    if not match:
        raise SystemExit("airflow_check: README.md has no python block under '### Or Apache Airflow'")
    return match[1]


def airflow_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV} (apache-airflow>=3 and requirements.txt; a few minutes)", flush=True)
        venv.create(VENV, with_pip=True)
    check = subprocess.run([str(python), "-c", "import airflow, pandas, influxdb_client, psycopg2, dotenv"], capture_output=True)
    if check.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "apache-airflow>=3", "-r", str(ROOT / "requirements.txt")], check=True)
    return python


def ledger(url: str) -> dict[str, int]:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('loaded_hours') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return {}
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute("SELECT hour, rows FROM loaded_hours ORDER BY hour")
        return {hour.strftime("%Y-%m-%dT%H:%MZ"): rows for hour, rows in cursor.fetchall()}


def queried_ranges(emulator: Emulator) -> list[str]:
    return [re.search(r"range\(start: (\S+), stop: (\S+)\)", q).expand(r"\1..\2") for q in emulator.queries]


def run_dag(python: Path, home: Path, dag_file: Path, logical: datetime, env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(python), "-c", RUNNER, str(dag_file), logical.isoformat()], env=env, cwd=home, capture_output=True, text=True, timeout=600
    )
    (home / f"run-{logical:%H%M}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
        raise SystemExit(f"airflow_check: the DAG run for {logical:%H:%M} failed (exit {result.returncode}):\n{tail}")


def main() -> int:
    python = airflow_python()
    version = subprocess.run([str(python), "-c", "import airflow; print(airflow.__version__)"], capture_output=True, text=True)
    print(f"Airflow {version.stdout.strip()} in {VENV}")
    home = Path(tempfile.mkdtemp(prefix="hml-airflow-"))
    dag_file = home / "dags" / "pulse_oximeter.py"
    dag_file.parent.mkdir(parents=True)
    dag_file.write_text(readme_dag())
    emulator = Emulator(token=TOKEN, org=ORG)
    emulator.start()
    emulator.write_lines("pulse_oximeter", line_protocol(DAY.replace(hour=13), 3), precision="s")
    postgres = ThrowawayPostgres().start()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dag_file.parent),
        "PYTHONPATH": str(ROOT),
        "CONNECTION": emulator.url,
        "TOKEN": TOKEN,
        "ORG": ORG,
        "PG_CONNECT": postgres.url,
    }
    problems = []
    try:
        subprocess.run([str(python), "-m", "airflow", "db", "migrate"], env=env, cwd=home, check=True, capture_output=True)
        for logical, hour in RUNS:
            emulator.queries.clear()
            run_dag(python, home, dag_file, logical, env)
            want = f"{hour:%Y-%m-%dT%H:%M:%SZ}..{hour + timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}"
            got = queried_ranges(emulator)
            print(f"logical date {logical:%Y-%m-%dT%H:%MZ}: queried {got}; ledger {json.dumps(ledger(postgres.url))}")
            if got != [want]:
                problems.append(f"the {logical:%H:%M} run queried {got}, not exactly [{want!r}]")
        want_ledger = {f"{hour:%Y-%m-%dT%H:%MZ}": 720 for _, hour in RUNS}
        if ledger(postgres.url) != want_ledger:
            problems.append(f"the ledger holds {ledger(postgres.url)}, not {want_ledger}")
    finally:
        emulator.stop()
        postgres.stop()
    for problem in problems:
        print(f"airflow_check: {problem}", file=sys.stderr)
    print("airflow_check: " + ("FAILED" if problems else "ok: each run loaded exactly the previous complete hour"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
