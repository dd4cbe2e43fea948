"""A local S3-compatible server for tests: moto's server mode on 127.0.0.1.

Use it from a test module by importing the fixtures (pytest finds fixtures in a module's globals):

    from tests.support.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)

    def test_something(s3_bucket):           # a fresh, empty bucket: "s3://<name>"
        run_pipeline(Workdir(f"{s3_bucket}/run"), ...)

`s3_server` (session scope) starts `moto_server` as a subprocess on a free port and points every
S3 client at it the way a production user configures one, through the environment:
`AWS_ENDPOINT_URL` (honoured by botocore, hence aiobotocore / s3fs, boto3, the aws CLI, and by
pyarrow's own S3 filesystem) and fake `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
`AWS_DEFAULT_REGION`. Because it is a separate process reached over HTTP and configured by
environment variables, child processes (torchrun workers reading videos, Prefect workers, `lvr`
run as a subprocess) inherit the settings and see the same buckets; a server thread inside the
test process would also be reachable, but would compete with the test's own work for the GIL.
`S3Server.env` holds the variables for a subprocess started with an explicit environment.

`s3_bucket` (function scope) creates a uniquely named bucket and deletes it, with everything in
it, after the test. The environment is restored and the server stopped at the end of the session.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from parallel.local import free_port

# Fake credentials: moto accepts any, and they must never be real ones (a misrouted request then
# fails to authenticate instead of touching a real account).
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "lvr-test-key",
    "AWS_SECRET_ACCESS_KEY": "lvr-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would send clients elsewhere or to other credentials than the fake ones.
CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", "FSSPEC_S3")
START_TIMEOUT_S = 30


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    env: dict[str, str]  # what a client process needs in its environment to use this server

    @functools.cached_property
    def filesystem(self):
        """An s3fs filesystem on this server for the tests' own reads and writes, without a listing
        cache (tests read what other processes wrote) and apart from the instances the code under
        test gets from fsspec (clearing those leaves this one alone)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket; returns its URL, `s3://<name>`."""
        name = name or f"lvr-test-{uuid.uuid4().hex[:12]}"
        self.filesystem.mkdir(name)
        return f"s3://{name}"

    def delete_bucket(self, url: str) -> None:
        fs = self.filesystem
        name = url.removeprefix("s3://").strip("/")
        if fs.exists(name):
            fs.rm(name, recursive=True)  # every object, then the bucket itself


def _moto_server_argv(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        found = shutil.which("moto_server")
        if found is None:
            raise RuntimeError("moto_server is not installed: pip install 'moto[server]'")
        exe = Path(found)
    return [str(exe), "-H", "127.0.0.1", "-p", str(port)]


def _wait_until_up(endpoint: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode} before answering on {endpoint}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {START_TIMEOUT_S} s")


def _clear_s3fs_instances() -> None:
    """s3fs reuses filesystem instances across calls: drop any made before (or with) the test
    server's environment, so no client keeps pointing at the wrong endpoint."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(_moto_server_argv(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    saved = {key: os.environ.get(key) for key in (*env, *CLEARED)}
    try:
        _wait_until_up(endpoint, proc)
        for key in CLEARED:
            os.environ.pop(key, None)
        os.environ.update(env)
        _clear_s3fs_instances()
        yield S3Server(endpoint, env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _clear_s3fs_instances()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh bucket for one test, `s3://<name>`, deleted with its contents afterwards."""
    url = s3_server.create_bucket()
    try:
        yield url
    finally:
        s3_server.delete_bucket(url)
        _clear_s3fs_instances()
