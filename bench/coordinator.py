"""Benchmark: concurrent clients posting audit batches to one coordinator on loopback.

Starts ``cape coordinator serve`` on a fresh SQLite database in a temporary
directory (127.0.0.1, an ephemeral port), runs N client threads that each post
batches of run records for D seconds, then reports records/s, request latency
p50/p99, and checks that the database holds exactly the records sent (none
lost, none duplicated) and that the hash chain verifies. It also prints the
server's CPU use and the machine's load average, since on a shared machine the
numbers depend on what else runs.

    python bench/coordinator.py --clients 20 --seconds 30 --batch 100
    python bench/coordinator.py --sqlite-synchronous NORMAL   # the weaker setting
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator_client import Client  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def _start(db: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cape_coordinator",
            "coordinator",
            "serve",
            "--db",
            str(db),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=_env(),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("coordinator did not start")


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _batch(run_id: str, size: int) -> tuple[bytes, int]:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    records = [
        {
            "record_id": str(uuid.uuid4()),
            "run_id": run_id,
            "event": "policy.fetched",
            "time": now,
            "engine": "bench",
            "engine_version": "1",
            "principal": "bench",
            "policy": {"label": "bench", "version": 1, "sha256": "0" * 64},
            "source": "bench/coordinator.py",
        }
        for _ in range(size)
    ]
    return json.dumps({"records": records}).encode(), size


def _client_loop(
    url: str,
    token: str,
    batch: int,
    stop: float,
    latencies: list[float],
    sent: list[int],
    errors: list[str],
) -> None:
    session = requests.Session()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    run_id = str(uuid.uuid4())
    count = 0
    while time.monotonic() < stop:
        body, n = _batch(run_id, batch)
        t0 = time.perf_counter()
        resp = session.post(url + "/v1/audit", data=body, headers=headers, timeout=60)
        latencies.append(time.perf_counter() - t0)
        if resp.status_code != 200 or resp.json()["accepted"] != n:
            errors.append(f"{resp.status_code} {resp.text[:200]}")
            continue
        count += n
    sent.append(count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=100, help="records per request")
    parser.add_argument(
        "--sqlite-synchronous",
        choices=["FULL", "EXTRA", "NORMAL"],
        default=None,
        help="the server's sqlite_synchronous setting (default: the coordinator's, FULL)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        init = subprocess.run(
            [sys.executable, "-m", "cape_coordinator", "coordinator", "init", "--db", str(db)],
            capture_output=True,
            text=True,
            env=_env(),
            check=True,
        )
        admin_token = init.stdout.strip().splitlines()[-1]
        config = Path(tmp) / "bench.db.config.json"
        if args.sqlite_synchronous:
            settings = json.loads(config.read_text())
            settings["sqlite_synchronous"] = args.sqlite_synchronous
            config.write_text(json.dumps(settings))
        synchronous = json.loads(config.read_text()).get("sqlite_synchronous", "NORMAL")
        port = _free_port()
        proc = _start(db, port)
        url = f"http://127.0.0.1:{port}"
        try:
            admin = Client(url, admin_token)
            token = admin.create_token("bench", "pipeline", labels=["bench"])["token"]
            auditor = admin.create_token("bench-auditor", "auditor")["token"]
            latencies: list[float] = []
            sent: list[int] = []
            errors: list[str] = []
            load_before = os.getloadavg()[0]
            cpu_before = _cpu_seconds(proc.pid)
            start = time.monotonic()
            stop = start + args.seconds
            threads = [
                threading.Thread(
                    target=_client_loop,
                    args=(url, token, args.batch, stop, latencies, sent, errors),
                )
                for _ in range(args.clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            cpu_after = _cpu_seconds(proc.pid)
            load_after = os.getloadavg()[0]
            verify = Client(url, auditor, timeout=(3, 600)).verify_audit()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        con = sqlite3.connect(db)
        stored = con.execute("SELECT count(*) FROM audit WHERE kind = 'run'").fetchone()[0]
        distinct = con.execute(
            "SELECT count(DISTINCT record_id) FROM audit WHERE kind = 'run'"
        ).fetchone()[0]
        con.close()

    total = sum(sent)
    qs = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    print(f"clients {args.clients}, batch {args.batch} records, {elapsed:.1f} s")
    print(f"sqlite synchronous {synchronous}")
    print(f"requests {len(latencies)}, errors {len(errors)}")
    print(f"records sent {total}, stored {stored} (distinct {distinct})")
    print(f"throughput {total / elapsed:,.0f} records/s")
    print(f"latency p50 {qs[49] * 1000:.1f} ms, p99 {qs[98] * 1000:.1f} ms")
    print(f"chain intact: {verify['intact']} ({verify['count']} entries)")
    if cpu_before is not None and cpu_after is not None:
        print(f"server CPU {(cpu_after - cpu_before) / elapsed:.2f} cores", end="; ")
    print(f"machine: {os.cpu_count()} CPUs, load average {load_before:.1f} -> {load_after:.1f}")
    for e in errors[:5]:
        print(f"error: {e}")
    ok = stored == total == distinct and not errors and verify["intact"]
    print("OK: every record stored exactly once" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
