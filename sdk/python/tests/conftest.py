"""Test harness: each test gets its own PostgreSQL databases (one for sagad, one for the
participants) and its own RabbitMQ vhost on the real servers, and the real ``sagad`` binary
started as a subprocess on free ports; sagas are started and read with ``sagactl``.

The binaries come from the repository's ``target/debug`` (``cargo build --bin sagad --bin
sagactl``), or from ``SAGAD_BIN`` / ``SAGACTL_BIN``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[3]
PG = "postgresql://postgres@127.0.0.1:5432"
T = TypeVar("T")

sys.path.insert(0, str(Path(__file__).parent))


def _binary(name: str) -> str:
    path = os.environ.get(f"{name.upper()}_BIN") or str(REPO / "target" / "debug" / name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `cargo build --bin sagad --bin sagactl` first")
    return path


def _run(*args: str, input: str | None = None) -> None:
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, input=input)
    if out.returncode != 0:
        raise RuntimeError(f"{args}: {out.stderr.strip()}")


def psql(sql: str) -> None:
    _run("psql", "-h", "127.0.0.1", "-U", "postgres", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql)


class Env:
    """An isolated vhost and two databases: ``saga_url`` for sagad, ``shop_url`` for the
    participants."""

    def __init__(self) -> None:
        self.name = f"saga_py_{uuid.uuid4().hex}"
        self.vhost = self.name
        self.saga_url = f"{PG}/{self.name}"
        self.shop_url = f"{PG}/{self.name}_shop"
        self.amqp_url = f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"

    def create(self) -> None:
        # One rabbitmqctl call makes the vhost and guest's permissions (each call starts an
        # Erlang VM, seconds on a busy machine), while psql makes the databases.
        definitions = {
            "vhosts": [{"name": self.vhost}],
            "permissions": [
                {"user": "guest", "vhost": self.vhost, "configure": ".*", "write": ".*",
                 "read": ".*"}
            ],
        }
        with ThreadPoolExecutor(3) as pool:
            jobs = [
                # Read from standard input: a file would be read by the broker's own user.
                pool.submit(_run, "rabbitmqctl", "-q", "import_definitions",
                            input=json.dumps(definitions)),
                pool.submit(psql, f"CREATE DATABASE {self.name}"),
                pool.submit(psql, f"CREATE DATABASE {self.name}_shop"),
            ]
            for job in jobs:
                job.result()

    def drop(self) -> threading.Thread:
        """Drops the databases and the vhost in a background thread (joined at the end of the
        session), so the next test need not wait."""

        def drop() -> None:
            for db in (self.name, f"{self.name}_shop"):
                subprocess.run(
                    ["psql", "-h", "127.0.0.1", "-U", "postgres", "-q", "-c",
                     f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"],
                    capture_output=True,
                )
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.vhost], capture_output=True)

        thread = threading.Thread(target=drop, name=f"drop {self.name}")
        thread.start()
        _CLEANUPS.append(thread)
        return thread

    async def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Runs a query on the participants' database."""
        async with await psycopg.AsyncConnection.connect(self.shop_url, autocommit=True) as c:
            cur = await c.execute(sql, params)
            return list(await cur.fetchall())


_CLEANUPS: list[threading.Thread] = []


@pytest.fixture(scope="session", autouse=True)
def _wait_for_cleanups() -> Iterator[None]:
    yield
    for thread in _CLEANUPS:
        thread.join()


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    try:
        e.create()
        yield e
    finally:
        e.drop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def poll(
    what: str, check: Callable[[], Awaitable[T | None]], timeout: float = 30.0,
    interval: float = 0.05,
) -> T:
    """Calls ``check`` until it returns something other than None or False; fails after
    ``timeout`` seconds naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last is not None and last is not False:
            return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


class Sagad:
    """The real sagad binary on free ports, and sagactl to talk to it."""

    def __init__(
        self,
        env: Env,
        definitions: Path,
        log: Path,
        extra_args: tuple[str, ...] = (),
        token: str | None = None,
    ) -> None:
        self.token = token
        self.port = free_port()
        self.metrics_port = free_port()
        self.server = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen(
            [
                _binary("sagad"),
                "--database-url", env.saga_url,
                "--amqp-url", env.amqp_url,
                "--listen", f"127.0.0.1:{self.port}",
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                "--definitions", str(definitions),
                "--db-max-connections", "8",
                "--timer-poll", "50ms",
                "--outbox-poll", "200ms",
                *extra_args,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "RUST_LOG": os.environ.get("RUST_LOG", "info"),
                "SAGA_CONSOLE_LISTEN": "127.0.0.1:0",
            },
        )

    async def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"sagad exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1
                ) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        async def check() -> bool:
            return await asyncio.to_thread(ready)

        await poll("sagad to be ready", check, timeout=60)

    async def sagactl(self, *args: str) -> Any:
        proc = await asyncio.create_subprocess_exec(
            _binary("sagactl"), "--server", self.server, "--output", "json", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **({"SAGA_TOKEN": self.token} if self.token else {})},
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"sagactl {args}: {err.decode().strip()}")
        return json.loads(out)

    async def start(self, definition: str, saga_input: dict[str, Any]) -> str:
        started = await self.sagactl("start", definition, "--input", json.dumps(saga_input))
        return str(started["saga_id"])

    async def show(self, saga_id: str) -> dict[str, Any]:
        saga: dict[str, Any] = await self.sagactl("show", saga_id)
        return saga

    async def wait_status(self, saga_id: str, status: str, timeout: float = 30.0) -> dict[str, Any]:
        last: dict[str, Any] = {}

        async def check() -> dict[str, Any] | None:
            nonlocal last
            last = await self.show(saga_id)
            return last if last.get("status") == status else None

        try:
            return await poll(f"saga {saga_id} to be {status}", check, timeout, interval=0.1)
        except pytest.fail.Exception:
            pytest.fail(f"saga {saga_id} is not {status}: {json.dumps(last, indent=1)[:4000]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


@pytest.fixture
def definitions(tmp_path: Path) -> Path:
    """A definitions directory holding the repository's sagas/*.toml; tests may add files."""
    d = tmp_path / "sagas"
    shutil.copytree(REPO / "sagas", d)
    return d


@pytest.fixture
async def sagad(env: Env, definitions: Path, tmp_path: Path) -> AsyncIterator[Sagad]:
    s = Sagad(env, definitions, tmp_path / "sagad.log")
    try:
        await s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


class Shop:
    """The shop participants (tests/shop.py) running in this process."""

    def __init__(self, env: Env, **options: Any) -> None:
        import shop

        self.participants = shop.build(env.amqp_url, env.shop_url, **options)
        self.env = env
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> "Shop":
        import shop

        await shop.create_schema(self.env.shop_url)
        self.tasks = [asyncio.create_task(p.run()) for p in self.participants]
        await asyncio.wait_for(
            asyncio.gather(*(p.wait_ready() for p in self.participants)), timeout=30
        )
        return self

    async def stop(self) -> None:
        for p in self.participants:
            p.stop()
        await asyncio.wait_for(asyncio.gather(*self.tasks), timeout=30)


@pytest.fixture
async def shop_factory(env: Env) -> AsyncIterator[Callable[..., Awaitable[Shop]]]:
    started: list[Shop] = []

    async def make(**options: Any) -> Shop:
        s = await Shop(env, **options).start()
        started.append(s)
        return s

    yield make
    for s in started:
        await s.stop()
