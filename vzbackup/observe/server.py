"""The scheduler daemon's HTTP endpoint: ``/metrics`` (Prometheus) and ``/`` (the report;
``?since=7d&storage=NAME`` as ``vzbackup report`` takes them).

A threaded wsgiref server in a daemon thread; it binds to localhost unless jobs.cfg's
``metrics-listen`` says otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from vzbackup.config.node import Node
from vzbackup.errors import UsageError
from vzbackup.observe import facts as F
from vzbackup.observe import metrics

REPORT_SINCE = "30d"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class Endpoint:
    """Serves metrics and the report of *node* on (host, port) until ``close``."""

    def __init__(self, node: Node, host: str, port: int, log: Callable[[str], None]) -> None:
        self.node = node
        self.log = log
        self.cache = metrics.RepoCache()
        self.metrics_app = make_wsgi_app(metrics.registry(node, self.cache))
        self.server = make_server(host, port, self._app, server_class=_Server,
                                  handler_class=_QuietHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="http",
                                       daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _app(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path.startswith("/metrics"):
            return self.metrics_app(environ, start_response)
        if path in ("/", "/report", "/report.html"):
            query = parse_qs(environ.get("QUERY_STRING", ""))
            try:
                since = F.parse_since(query.get("since", [REPORT_SINCE])[0])
            except UsageError as e:
                start_response("400 Bad Request", [("Content-Type", "text/plain")])
                return [f"{e}\n".encode()]
            try:
                from vzbackup.observe import report as R  # matplotlib: on first request only

                data = R.gather(self.node, query.get("storage", [None])[0], since)
                page = R.render(data).encode()
            except Exception as e:  # a broken page must not take the daemon down
                self.log(f"report failed: {e}")
                start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
                return [f"report failed: {e}\n".encode()]
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(page)))])
            return [page]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /\n"]
