"""A small emulator of InfluxDB 2's HTTP API, for tests and demos.

It stores points written as line protocol and answers Flux queries built from
from |> range |> filter |> aggregateWindow |> drop/keep |> pivot (plus first, last,
mean and yield) with the real server's semantics and annotated-CSV wire format:

- range keeps start <= _time < stop and adds _start/_stop to the group key;
- aggregateWindow's windows are aligned to the epoch (plus offset), clipped to the
  range, and each row is stamped with its (clipped) window stop; createEmpty: false
  leaves empty windows out; mean always yields doubles;
- drop/keep merge tables whose group keys become equal, rows in arrival order;
- pivot makes one row per row key in order of first appearance, the last value wins;
- the CSV has CRLF line ends, a leading empty column, #datatype/#group/#default rows,
  a new block (after an empty line) when the schema changes, RFC3339Nano UTC times,
  and an empty line after each result; an answer with no tables is exactly CRLF.

Faults for testing clients are queued with `Emulator.inject(...)` or
`POST /emulator/faults`: an HTTP status (429 with Retry-After, 5xx), an error table
after some data, a body cut off mid-stream, a connection reset, a slow answer.

Run on its own:  python -m tests.influxdb_emulator --port 8086 --token TOKEN --org ORG
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import math
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests import emulator_influxql as influxql
from tests.emulator_flux import (  # noqa: F401  (re-exported: tests check the parts through this module)
    STATUS_BY_CODE,
    FluxError,
    Table,
    do_drop,
    do_pivot,
    encode_error,
    encode_result,
    encode_results,
    execute,
    format_double,
    format_time,
    parse_time,
    tokenize,
)
from tests.emulator_storage import NS, PRECISION_NS, Storage, parse_line  # noqa: F401

VERSION = "v2.7.11-emulator"


# -- HTTP ------------------------------------------------------------------------------------
@dataclass
class Fault:
    """What to do to the next query instead of answering it normally.

    kind: "status" (status, retry_after, message), "error_table" (message, after
    the first `keep_rows` data rows), "truncate" (cut the body after `keep_bytes`),
    "reset" (close the connection without an answer), "slow" (wait `delay` first),
    "slow_body" (send `keep_bytes` of the answer, wait `delay`, then the rest),
    "canned" (answer 200 with `body` instead), "gateway" (a 502, 503 or 504 as an HTML page
    from a load balancer, not JSON). Retry-After goes in whole seconds, as real servers send it.
    """

    kind: str
    status: int = 500
    retry_after: float | None = None
    message: str = ""
    keep_rows: int = 1
    keep_bytes: int = 200
    delay: float = 0.0
    body: str = ""
    fractional: bool = False  # send Retry-After as given, not in whole seconds as real servers do


ERROR_CODES = {400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not found", 429: "too many requests", 503: "unavailable"}
ERROR_MESSAGES = {  # what the real server says when a test does not say otherwise
    400: "compilation failed: error @1:1-1:5: undefined identifier",
    401: "unauthorized access",
    403: "insufficient permissions for read:orgs/04014de4ed590000/buckets",
    404: "failed to initialize execute state: could not find bucket",
    429: "org 04014de4ed590000 has exceeded limited_read plan limit",
    503: "service unavailable",
}
GATEWAY_PAGES = {  # what InfluxDB Cloud's load balancer sends when the service behind it is down
    502: "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n",
    503: "<html><body><h1>503 Service Unavailable</h1>\nNo server is available to handle this request.\n</body></html>\n",
    504: "<html><body><h1>504 Gateway Time-out</h1>\nThe server didn't respond in time.\n</body></html>\n",
}


@dataclass
class Emulator:
    """The server. An organisation is named by its name or its ID, as InfluxDB OSS 2 takes
    either; a wrong one is refused as OSS refuses it. (InfluxDB Cloud ignores `org` when the
    token belongs to one organisation; following OSS is the stricter of the two, so a
    loader that passes here passes there.)

    `v1_users` switches /query to InfluxDB 1.x authentication (user and password, by Basic
    auth or u/p parameters); without it /query takes the token as InfluxDB 2's v1 API does.
    """

    token: str = "emulator-token"
    org: str = "emulator-org"
    buckets: tuple[str, ...] = ("pulse_oximeter",)
    now: Callable[[], int] = field(default=lambda: time.time_ns())
    org_id: str = "04014de4ed590000"
    v1_users: dict[str, str] | None = None
    clock_offset: float = 0.0  # seconds the Date header runs ahead of the real clock

    def __post_init__(self) -> None:
        self.storage = Storage(self.buckets)
        self.faults: list[Fault] = []
        self.queries: list[str] = []
        self.cache: dict[tuple, tuple[int, bytes]] = {}
        self.lock = threading.Lock()
        self.server: QuietServer | None = None

    # The API tests use directly
    def inject(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def next_fault(self) -> Fault | None:
        with self.lock:
            return self.faults.pop(0) if self.faults else None

    def reset(self) -> None:
        with self.lock:
            self.storage = Storage(self.buckets)
            self.faults.clear()
            self.queries.clear()
            self.clock_offset = 0.0
            self.cache.clear()

    def write_lines(self, bucket: str, text: str, precision: str = "ns") -> None:
        points = []
        now = self.now()
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                try:
                    points.extend(parse_line(line, precision, now))
                except ValueError as exc:
                    raise FluxError(f"unable to parse '{line}': {exc}") from None
        self.storage.write(bucket, points)

    def answer(self, query: str, annotations: tuple[str, ...]) -> bytes:
        """The CSV body for a query; memoised until the next write.

        The memo is keyed by the query's tokens, so texts that differ only in spacing share
        an answer; a query with a negative duration (relative to now) is never memoised.
        """
        tokens = tuple(token[:2] for token in tokenize(query))
        key = (tokens, annotations)
        hit = self.cache.get(key)
        if hit and hit[0] == self.storage.generation:
            return hit[1]
        generation = self.storage.generation
        body = encode_results(execute(query, self.storage, self.now()), annotations).encode()
        if not any(kind == "duration" and text.startswith("-") for kind, text in tokens):
            self.cache[key] = (generation, body)
        return body

    def influxql_answer(self, query: str, database: str, epoch: bool, chunk_size: int | None, as_csv: bool) -> bytes:
        """The body for an InfluxQL statement that succeeds; memoised until the next write, like `answer`."""
        key = ("influxql", query, database, epoch, chunk_size, as_csv)
        hit = self.cache.get(key)
        if hit and hit[0] == self.storage.generation:
            return hit[1]
        generation = self.storage.generation
        series = influxql.execute(query, database, self.storage)
        body = (influxql.encode_csv(series, epoch) if as_csv else influxql.encode_json(series, epoch, chunk_size)).encode()
        self.cache[key] = (generation, body)
        return body

    # Serving
    def start(self, host: str = "127.0.0.1", port: int = 0, tls: tuple[str, str] | None = None) -> str:
        """Serve in a thread; `tls` is (certificate file, key file) for https."""
        emulator = self

        class Handler(RequestHandler):
            pass

        Handler.emulator = emulator
        self.server = QuietServer((host, port), Handler)
        self.scheme = "http"
        if tls:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a timeout test, say) is not the server's problem."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    emulator: Emulator

    def log_message(self, format: str, *args: Any) -> None:  # quiet, like a test server should be
        pass

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The Date header, from a clock that `Emulator.clock_offset` may move (a server whose clock differs)."""
        return super().date_time_string((timestamp or time.time()) + self.emulator.clock_offset)

    def version_headers(self) -> None:
        self.send_header("X-Influxdb-Build", "OSS")
        self.send_header("X-Influxdb-Version", VERSION)

    def send_body(self, status: int, body: bytes, content_type: str, extra: dict | None = None, from_influxdb: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if from_influxdb:  # a load balancer's own page carries no InfluxDB headers
            self.version_headers()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, payload: dict, extra: dict | None = None) -> None:
        """InfluxDB 2's shape: {"code","message"} with X-Platform-Error-Code, no trailing newline."""
        code = {"X-Platform-Error-Code": payload["code"]} if "code" in payload else {}
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_body(status, body, "application/json; charset=utf-8", {**code, **(extra or {})})

    def send_error_json(self, code: str, message: str, extra: dict | None = None, status: int | None = None) -> None:
        self.send_json(status or STATUS_BY_CODE.get(code, 500), {"code": code, "message": message}, extra)

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return body

    def authorized(self) -> bool:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() in ("token", "bearer") and token == self.emulator.token:
            return True
        self.send_error_json("unauthorized", "unauthorized access")
        return False

    def org_ok(self, params: dict) -> bool:
        org = (params.get("org") or params.get("orgID") or [None])[0]
        if org is None:
            self.send_error_json("invalid", "failed to decode request body: Please provide either orgID or org")
            return False
        if org in (self.emulator.org, self.emulator.org_id):
            return True
        if re.fullmatch(r"[0-9a-f]{16}", org):  # a value that parses as an ID is taken as one
            self.send_error_json("not found", f"failed to decode request body: organization not found: {org}")
        else:
            self.send_error_json("invalid", f'failed to decode request body: organization name "{org}" not found')
        return False

    def v1_authorized(self, params: dict) -> bool:
        """InfluxDB 1.x's check with `v1_users`, else the token as InfluxDB 2's v1 API takes it."""
        scheme, _, credentials = (self.headers.get("Authorization") or "").partition(" ")
        user = password = None
        if scheme.lower() == "basic":
            user, _, password = base64.b64decode(credentials).decode(errors="replace").partition(":")
        elif "u" in params and "p" in params:
            user, password = params["u"][0], params["p"][0]
        users = self.emulator.v1_users
        if users is None:
            if (scheme.lower() == "token" and credentials == self.emulator.token) or password == self.emulator.token:
                return True
            self.send_error_json("unauthorized", "unauthorized access")
            return False
        if user is None:
            self.send_v1_error(401, "unable to parse authentication credentials", {"WWW-Authenticate": 'Basic realm="InfluxDB"'})
            return False
        if users.get(user) != password:
            self.send_v1_error(401, "authorization failed")
            return False
        return True

    def send_v1_error(self, status: int, message: str, extra: dict | None = None) -> None:
        """InfluxDB 1.x's shape: {"error"} and a newline."""
        body = (json.dumps({"error": message}, separators=(",", ":")) + "\n").encode()
        self.send_body(status, body, "application/json", extra)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/health":
            self.send_json(
                200,
                {
                    "name": "influxdb",
                    "message": "ready for queries and writes",
                    "status": "pass",
                    "checks": [],
                    "version": VERSION,
                    "commit": "emulator",
                },
            )
        elif path in ("/ping", "/ready"):
            self.send_response(204)
            self.version_headers()
            self.end_headers()
        elif path == "/query":
            self.handle_influxql(parse_qs(urlsplit(self.path).query, keep_blank_values=True))
        else:
            self.send_error_json("not found", "path not found")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        params = parse_qs(parts.query)
        body = self.read_body()
        if parts.path == "/emulator/faults":
            self.emulator.inject(*(Fault(**f) for f in json.loads(body or b"[]")))
            self.send_response(204)
            self.end_headers()
            return
        if parts.path == "/query":  # 1.x takes the parameters in a form body too
            self.handle_influxql({**params, **parse_qs(body.decode(), keep_blank_values=True)})
            return
        if parts.path not in ("/api/v2/query", "/api/v2/write"):
            self.send_error_json("not found", "path not found")
            return
        if not self.authorized() or not self.org_ok(params):
            return
        if parts.path == "/api/v2/write":
            self.handle_write(params, body)
        else:
            self.handle_query(body)

    def handle_write(self, params: dict, body: bytes) -> None:
        bucket = (params.get("bucket") or [""])[0]
        precision = (params.get("precision") or ["ns"])[0]
        if precision not in PRECISION_NS:
            self.send_error_json("invalid", f"invalid precision {precision!r}")
            return
        if bucket not in self.emulator.storage.buckets:
            self.send_error_json("not found", f'bucket "{bucket}" not found')
            return
        try:
            self.emulator.write_lines(bucket, body.decode(), precision)
        except (FluxError, ValueError) as exc:
            self.send_error_json("invalid", str(exc))
            return
        self.send_response(204)
        self.version_headers()
        self.end_headers()

    def handle_query(self, body: bytes) -> None:
        content_type = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        if content_type == "application/vnd.flux":
            query, annotations = body.decode(), ()
        else:
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                self.send_error_json(
                    "invalid",
                    "failed to decode request body: failed parsing request body as JSON; if sending a raw Flux script, set 'Content-Type: application/vnd.flux' in your request headers",
                )
                return
            query = request.get("query") or ""
            annotations = tuple((request.get("dialect") or {}).get("annotations") or ())
        if not query:
            self.send_error_json("invalid", "failed to decode request body: request body requires either query or AST")
            return
        self.emulator.queries.append(query)
        fault = self.failed_by_fault()
        if fault is False:
            return
        try:
            answer = fault.body.encode() if fault and fault.kind == "canned" else self.emulator.answer(query, annotations)
        except FluxError as exc:
            self.send_error_json(exc.code, str(exc))
            return
        if fault and fault.kind == "error_table":
            answer = (
                keep_data_rows(answer, fault.keep_rows) + b"\r\n" + encode_error(fault.message or "internal error", annotations).encode()
            )
        self.send_stream(answer, "text/csv; charset=utf-8", fault)

    def handle_influxql(self, params: dict) -> None:
        """GET or POST /query: InfluxQL as InfluxDB 1.x answers it."""
        if not self.v1_authorized(params):
            return
        get = {k: v[-1] for k, v in params.items()}
        query = get.get("q", "")
        if not query:
            self.send_v1_error(400, 'missing required parameter "q"')
            return
        self.emulator.queries.append(query)
        fault = self.failed_by_fault()
        if fault is False:
            return
        as_csv = "application/csv" in (self.headers.get("Accept") or "") or "text/csv" in (self.headers.get("Accept") or "")
        epoch = bool(get.get("epoch"))
        chunk_size = int(get.get("chunk_size") or 10000) if get.get("chunked") == "true" else None
        try:
            answer = self.emulator.influxql_answer(query, get.get("db", ""), epoch, chunk_size, as_csv)
        except influxql.ParseError as exc:
            self.send_v1_error(400, f"error parsing query: {exc}")
            return
        except influxql.StatementError as exc:
            answer = "" if as_csv else influxql.statement_error(str(exc))  # with CSV, 1.x drops the error
            self.send_stream(answer.encode(), "text/csv" if as_csv else "application/json", fault)
            return
        if fault and fault.kind == "canned":
            answer = fault.body.encode()
        elif fault and fault.kind == "error_table" and not as_csv:
            rows = self.emulator.influxql_answer(query, get.get("db", ""), epoch, max(1, fault.keep_rows), False)
            answer = rows.splitlines()[0] + b"\n" + influxql.statement_error(fault.message or "internal error").encode()
        self.send_stream(answer, "text/csv" if as_csv else "application/json", fault)

    def failed_by_fault(self) -> Fault | None | bool:
        """Apply the next fault that replaces an answer; False when it has answered already."""
        fault = self.emulator.next_fault()
        if fault and fault.kind == "slow":
            time.sleep(fault.delay)
            return None
        if fault and fault.kind == "status":
            extra = {}
            if fault.retry_after is not None:
                extra["Retry-After"] = f"{fault.retry_after:g}" if fault.fractional else str(math.ceil(fault.retry_after))
            code = ERROR_CODES.get(fault.status, "internal error")
            self.send_error_json(code, fault.message or ERROR_MESSAGES.get(fault.status, "internal error"), extra, status=fault.status)
            return False
        if fault and fault.kind == "gateway":
            page = (fault.body or GATEWAY_PAGES.get(fault.status, GATEWAY_PAGES[502])).encode()
            self.send_body(fault.status, page, "text/html", from_influxdb=False)
            return False
        if fault and fault.kind == "reset":
            self.close_abruptly()
            return False
        return fault

    def send_stream(self, answer: bytes, content_type: str, fault: Fault | None) -> None:
        """A 200 answer, chunked as InfluxDB streams it; gzipped when asked and worth it."""
        gzipped = "gzip" in (self.headers.get("Accept-Encoding") or "") and len(answer) >= 1400
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Vary", "Accept-Encoding")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
            answer = gzip.compress(answer, compresslevel=6)  # Go's default, which InfluxDB uses
        self.send_header("Transfer-Encoding", "chunked")
        self.version_headers()
        self.end_headers()
        if fault and fault.kind == "truncate":
            self.write_chunk(answer[: fault.keep_bytes])
            self.close_abruptly()
            return
        if fault and fault.kind == "slow_body":
            self.write_chunk(answer[: fault.keep_bytes])
            time.sleep(fault.delay)
            answer = answer[fault.keep_bytes :]
        for i in range(0, len(answer), 65536):
            self.write_chunk(answer[i : i + 65536])
        self.wfile.write(b"0\r\n\r\n")

    def write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def close_abruptly(self) -> None:
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True


def keep_data_rows(answer: bytes, keep_rows: int) -> bytes:
    """The head of an answer: its annotation and header lines and the first data rows."""
    lines, kept, data = answer.split(b"\r\n"), [], 0
    for line in lines:
        if line.startswith(b",,"):
            if data >= keep_rows:
                break
            data += 1
        kept.append(line)
    return b"\r\n".join(kept).rstrip(b"\r\n") + b"\r\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve an InfluxDB 2 API emulator until stopped.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8086)
    parser.add_argument("--token", default="emulator-token")
    parser.add_argument("--org", default="emulator-org")
    parser.add_argument("--bucket", action="append", help="a bucket to create (repeatable; default pulse_oximeter)")
    args = parser.parse_args(argv)
    emulator = Emulator(token=args.token, org=args.org, buckets=tuple(args.bucket or ["pulse_oximeter"]))
    url = emulator.start(args.host, args.port)
    print(f"InfluxDB emulator serving on {url} (org {args.org}, buckets {', '.join(emulator.buckets)}); Ctrl-C stops it", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
