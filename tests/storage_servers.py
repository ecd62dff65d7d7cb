"""Real servers for storage tests: a fresh Postgres database, and moto's S3 server on loopback.

    with FreshPostgres() as pg:          # CREATE DATABASE spk_test_<random>; dropped on exit
        pg.url                           # postgresql://postgres@127.0.0.1:5432/spk_test_...
    with MotoS3() as s3:                 # `python -m moto.server` as a subprocess
        s3.env(bucket)                   # SPK_S3_* variables for a core pointed at it
        s3.client()                      # a boto3 client (to create buckets, inspect objects)

Postgres is part of this machine's CI (.ci/run starts it): an unreachable server fails the test
with a message saying so, never a silent skip.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.index_server import free_port

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
S3_KEY_ID = "spk-test-key-id"
S3_SECRET = "spk-test-secret-Zq9x7Lr2"  # distinctive, so tests can grep logs and files for it


class FreshPostgres:
    def __init__(self) -> None:
        self.name = f"spk_test_{secrets.token_hex(6)}"
        self.url = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.name}"

    def _admin(self) -> Any:
        import psycopg2

        try:
            conn = psycopg2.connect(
                host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5
            )
        except psycopg2.OperationalError as exc:
            pytest.fail(
                f"Postgres is not reachable at {PG_HOST}:{PG_PORT} as {PG_USER} ({exc});"
                " these tests need it: start it (.ci/run does) and run them again"
            )
        conn.autocommit = True
        return conn

    def __enter__(self) -> FreshPostgres:
        conn = self._admin()
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.name}"')
        conn.close()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        conn = self._admin()
        with conn.cursor() as cur:
            # FORCE: a core process killed by a test may still hold a connection for a moment.
            cur.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        conn.close()


class MotoS3:
    def __init__(self, log_dir: Path) -> None:
        self.port = 0
        self._log = log_dir / "moto-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MotoS3:
        self.port = free_port()
        env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY_ID, AWS_SECRET_ACCESS_KEY=S3_SECRET)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {self._log.read_text()}")
                time.sleep(0.1)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def env(self, bucket: str) -> dict[str, str]:
        return {
            "SPK_S3_ENDPOINT": self.endpoint,
            "SPK_S3_BUCKET": bucket,
            "SPK_S3_REGION": "us-east-1",
            "SPK_S3_ACCESS_KEY_ID": S3_KEY_ID,
            "SPK_S3_SECRET_ACCESS_KEY": S3_SECRET,
            "SPK_S3_PATH_STYLE": "true",
        }

    def client(self) -> Any:
        from core.storage.s3_store import make_client, s3_config_from_env

        config, problem = s3_config_from_env(self.env("unused"))
        assert config is not None, problem
        return make_client(config)

    def new_bucket(self) -> str:
        name = f"spk-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name
