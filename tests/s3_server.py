"""A real S3 API server on loopback for the object-storage tests: moto's standalone server in its
own process, reached through s3fs with the endpoint and credentials taken from the standard AWS
environment variables only (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ...)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Test credentials of the loopback server: not secrets, and never logged by ecgplat either way.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "ecgplat-test-key",
    "AWS_SECRET_ACCESS_KEY": "ecgplat-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    env: dict  # the variables a client process needs (endpoint and credentials)

    def new_bucket(self, prefix: str = "b") -> str:
        """A fresh, empty bucket's name (each test its own, so tests never see each other)."""
        import s3fs

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(timeout: float = 30.0) -> Iterator[S3Server]:
    """Start ``moto.server`` on 127.0.0.1, point this process's AWS variables at it, and stop it
    (restoring the variables) on exit."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.1)
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint, env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
