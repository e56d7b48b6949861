"""Support for the coordinator tests: the server subprocess, the CLI runner, sample policies."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
# The editable install may predate these packages' __init__ files; make the checkout win.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from coordinator_client import Client  # noqa: E402

ROLES = ("admin", "author", "reviewer", "pipeline", "auditor", "requester")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("CAPE_COORDINATOR_MASTER_KEY", None)
    return env


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m cape_coordinator ARGS`` (the same handlers ``cape`` calls)."""
    proc = subprocess.run(
        [sys.executable, "-m", "cape_coordinator", *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cape {' '.join(args)} failed: {proc.stderr}")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One coordinator database and the uvicorn process serving it: a SQLite file in
    ``directory``, or the database at ``db_url`` (PostgreSQL) with its master key and
    settings files in ``directory``."""

    def __init__(self, directory: Path, *flags: str, db_url: str | None = None):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db: Path | str = directory / "cape.db" if db_url is None else db_url
        self.flags = list(flags)
        if db_url is not None:
            self.flags += [
                "--key-file",
                str(directory / "cape.key"),
                "--config",
                str(directory / "cape.config.json"),
            ]
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        out = run_cli("coordinator", "init", "--db", str(self.db), *self.flags).stdout
        lines = out.strip().splitlines()
        self.admin_token = lines[-1]
        self.public_key = next(
            line.rsplit(" ", 1)[1] for line in lines if line.startswith("signing public key")
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def replica(self) -> Server:
        """Another serving process on this same database (its own port, no init)."""
        other = object.__new__(Server)
        other.dir, other.db, other.flags = self.dir, self.db, list(self.flags)
        other.admin_token, other.public_key = self.admin_token, self.public_key
        other.port, other.proc = _free_port(), None
        return other

    def start(self) -> None:
        """Start serving (on the same port as before, so clients keep their URL)."""
        for _ in range(3):
            log = open(self.dir / "serve.log", "ab")
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cape_coordinator",
                    "coordinator",
                    "serve",
                    "--db",
                    str(self.db),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    *self.flags,
                ],
                stdout=log,
                stderr=log,
                env=_env(),
            )
            log.close()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                        return
                except requests.RequestException:
                    time.sleep(0.1)
            self.stop()
            self.port = _free_port()
        raise RuntimeError(f"coordinator did not start: {(self.dir / 'serve.log').read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self, token: str | None, **kwargs: object) -> Client:
        return Client(self.url, token, public_key=self.public_key, **kwargs)  # type: ignore[arg-type]


def new_label(prefix: str) -> str:
    """A policy label no other test uses."""
    return f"{prefix}-{time.time_ns() % 10**12}"


def policy_doc(label: str, column: str = "ssn", key: str | None = None) -> dict[str, object]:
    """A valid policy (drop ``column``; perturb ``age`` with ``key`` if given)."""
    rules: list[dict[str, object]] = [{"match": {"name": column}, "actions": ["drop"]}]
    if key is not None:
        rules.append(
            {
                "match": {"name": "age"},
                "actions": [
                    {
                        "transform": {
                            "type": "numeric-perturbation",
                            "min": -2,
                            "max": 2,
                            "key": {"secret": key},
                        }
                    }
                ],
            }
        )
    return {"label": label, "rules": rules}


def fetched_records(run_id: str, n: int, label: str, note: str) -> list[dict[str, object]]:
    """``n`` fresh ``policy.fetched`` run records of ``run_id``, for the ingest tests."""
    return [
        {
            "record_id": str(uuid.uuid4()),
            "run_id": run_id,
            "event": "policy.fetched",
            "time": "2024-05-01T12:00:00.000001Z",
            "engine": "test",
            "policy": {"label": label, "version": 1, "sha256": "ab"},
            "note": note,
        }
        for _ in range(n)
    ]
