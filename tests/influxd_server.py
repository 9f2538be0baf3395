"""A throwaway InfluxDB 1.x server (Debian's `influxd`) for tests and the benchmark.

Its own config, data and WAL directories in a temporary folder, free ports on 127.0.0.1
for HTTP and the RPC bind address, reporting and the internal monitor store off, and a
wait on /ping. Authentication is optional: one admin user, as the recorded `auth_*`
conformance cases had.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from pathlib import Path

from tests.pg_server import free_port, watch_over

CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{dir}/meta"
  logging-enabled = false

[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  query-log-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = {auth}
  log-enabled = false
  pprof-enabled = false
  max-row-limit = {max_row_limit}
"""


def find_influxd() -> str:
    found = shutil.which("influxd")
    if not found:
        raise RuntimeError("InfluxDB 1.x's influxd was not found: install it (Debian: apt-get install influxdb)")
    return found


class ThrowawayInfluxd:
    def __init__(self, admin: tuple[str, str] | None = None, max_row_limit: int = 0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hml-influxd-"))
        self.http_port, self.rpc_port = free_port(), free_port()
        self.admin = admin
        self.max_row_limit = max_row_limit
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30) -> ThrowawayInfluxd:
        config = self.dir / "influxdb.conf"
        auth = "true" if self.admin else "false"
        config.write_text(
            CONFIG.format(dir=self.dir, rpc_port=self.rpc_port, http_port=self.http_port, auth=auth, max_row_limit=self.max_row_limit)
        )
        log = open(self.dir / "influxd.log", "wb")
        self.process = subprocess.Popen([find_influxd(), "run", "-config", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        pid = self.process.pid  # killed only if it is still this influxd, not a process that took its number
        watch_over(f"grep -q influxd /proc/{pid}/cmdline 2>/dev/null && kill {pid}; rm -rf {self.dir}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"influxd exited with {self.process.returncode}: {(self.dir / 'influxd.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=1) as answer:
                    if answer.status == 204:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"influxd did not answer /ping within {timeout:g}s")
        if self.admin:  # with auth on and no user yet, the first statement may create the admin
            user, password = self.admin
            self.query(f"CREATE USER \"{user}\" WITH PASSWORD '{password}' WITH ALL PRIVILEGES", auth=False)
        return self

    def headers(self, auth: bool = True) -> dict[str, str]:
        if not (self.admin and auth):
            return {}
        return {"Authorization": "Basic " + b64encode(":".join(self.admin).encode()).decode()}

    def request(self, method: str, path: str, params: dict[str, str], body: bytes | None = None, headers: dict[str, str] | None = None):
        """(status, headers, body) of one request; errors are answers too."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def query(self, statement: str, auth: bool = True, **params: str) -> bytes:
        status, _, body = self.request("POST", "/query", {"q": statement, **params}, headers=self.headers(auth))
        if status != 200 or b'"error"' in body:
            raise RuntimeError(f"influxd refused {statement!r}: {status} {body[:300]!r}")
        return body

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')

    def write(self, database: str, lines: str, precision: str = "ns", batch: int = 50_000) -> None:
        """Line protocol, in batches: influxd refuses a body over 25 MB."""
        rows = lines.splitlines()
        for i in range(0, len(rows), batch):
            payload = ("\n".join(rows[i : i + batch]) + "\n").encode()
            status, _, body = self.request("POST", "/write", {"db": database, "precision": precision}, payload, headers=self.headers())
            if status != 204:
                raise RuntimeError(f"influxd refused the write: {status} {body[:300]!r}")

    def queries_answered(self) -> int:
        """How many /query requests the server has taken (its own httpd statistics)."""
        with urllib.request.urlopen(self.url + "/debug/vars", timeout=10) as answer:
            stats = json.loads(answer.read())
        return next(v["values"].get("queryReq", 0) for k, v in stats.items() if k.startswith("httpd"))

    def drop_database(self, name: str) -> None:
        self.query(f'DROP DATABASE "{name}"')

    def stop(self) -> None:
        try:
            if self.process and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def influxd_missing_reason() -> str | None:
    """Why the real-server tests cannot run here, or None."""
    if os.environ.get("TEST_NO_INFLUXD"):
        return "TEST_NO_INFLUXD is set"
    if not shutil.which("influxd"):
        return "influxd is not installed (Debian: apt-get install influxdb)"
    return None
