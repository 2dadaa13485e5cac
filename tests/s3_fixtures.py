"""A local S3-compatible server for tests: moto's server on 127.0.0.1 (a free port), one bucket, the
standard AWS environment variables pointing at it, and a count of the HTTP requests it served.

Only loopback: the server binds 127.0.0.1 and the client's endpoint is that address. Tests that use it
skip, saying so, when moto (or obstore, the client) is not installed: `pip install -e ".[test]"`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

BUCKET = "ips-test"


@dataclass
class Requests:
    """What the server was asked: `(method, path, Range header or "")` per request."""

    log: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            self.log.clear()

    def gets(self, contains: str = "") -> list[tuple[str, str, str]]:
        with self.lock:
            return [r for r in self.log if r[0] == "GET" and contains in r[1]]


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    requests: Requests

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


def start_server() -> tuple[S3Server, object]:
    """Start moto's WSGI app on 127.0.0.1 behind a request counter; `(server, werkzeug server)`."""
    pytest.importorskip("obstore", reason="remote stores need obstore (pip install -e '.[test]')")
    pytest.importorskip("moto", reason="the local S3 server is moto's (pip install -e '.[test]')")
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    app = DomainDispatcherApplication(create_backend_app)
    requests = Requests()

    def counting(environ: dict, start_response: object) -> object:
        with requests.lock:
            requests.log.append(
                (environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("HTTP_RANGE", ""))
            )
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counting, threaded=True)
    threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True).start()
    host, port = server.server_address[:2]
    return S3Server(f"http://{host}:{port}", BUCKET, requests), server


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard variables that send an S3 client (obstore, boto3) to `endpoint`, with test keys."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def s3_session() -> Iterator[S3Server]:
    """Body of the session fixture: the server and its bucket for the whole session."""
    s3, server = start_server()
    mp = pytest.MonkeyPatch()
    for k, v in aws_env(s3.endpoint).items():
        mp.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket=s3.bucket)
    try:
        yield s3
    finally:
        mp.undo()
        server.shutdown()  # type: ignore[attr-defined]
