"""Benchmark: concurrent clients posting audit batches to one coordinator on loopback.

Starts ``cape coordinator serve`` on a fresh SQLite database in a temporary
directory (127.0.0.1, an ephemeral port) — or, with ``--postgres``, one or
more replicas on one database of a throwaway PostgreSQL cluster, measured one
replica count after the other in the same run — and runs N client threads that
each post batches of run records for D seconds, round-robin over the replicas.
It reports records/s, request latency p50/p99 against the p99 target of issue
14 (under 250 ms with 20 concurrent posters), and checks that the chain holds
exactly the records sent (none lost, none duplicated) and verifies. It also prints the
server's CPU use and the machine's load average, since on a shared machine the
numbers depend on what else runs.

By default, on a machine with two CPUs or more, the server side (the
coordinator processes, and the PostgreSQL cluster with ``--postgres``) is
pinned to CPU 0 and the posting clients (this process) to CPU 1, with
``sched_setaffinity`` (what ``taskset -c`` does), so that the clients' own
work is not counted in the server's latency; ``--server-cpus``/``--client-cpus``
change the split, ``--no-pin`` turns it off. The split is printed with the results.

    python bench/coordinator.py --clients 20 --seconds 30 --batch 100
    python bench/coordinator.py --sqlite-synchronous NORMAL   # the weaker setting
    python bench/coordinator.py --postgres --replicas 1,2      # 1 vs 2 replicas
    python bench/coordinator.py --flood --seconds 10           # /healthz under junk bodies
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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


def _cpus(spec: str) -> set[int]:
    """CPU numbers from ``taskset -c`` syntax: ``0``, ``0,2`` or ``0-1``."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


class Pinning:
    """Where the server side and the clients run: CPU sets, or None to leave both unpinned.

    Child processes inherit the CPU affinity of the process that starts them,
    so :meth:`server` pins this process to the server's CPUs while servers
    (or the PostgreSQL cluster) start, and :meth:`clients` pins it to the
    clients' CPUs while they post.
    """

    def __init__(self, server: set[int] | None, clients: set[int] | None):
        self.server_cpus = server
        self.client_cpus = clients
        self._all = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def _pin(self, cpus: set[int] | None) -> None:
        if cpus is not None and self._all is not None:
            os.sched_setaffinity(0, cpus)

    def server(self) -> None:
        """Pin this process (and so what it starts next) to the server's CPUs."""
        self._pin(self.server_cpus)

    def clients(self) -> None:
        """Pin this process (the posting threads) to the clients' CPUs."""
        self._pin(self.client_cpus)

    def release(self) -> None:
        """Back to every CPU this process started with."""
        self._pin(self._all)

    def describe(self) -> str:
        if self.server_cpus is None or self._all is None:
            return "not pinned (server and clients share every CPU)"
        return (
            f"server side on CPU {_spec(self.server_cpus)} (taskset -c {_spec(self.server_cpus)}), "
            f"clients on CPU {_spec(self.client_cpus or set())} "
            f"(taskset -c {_spec(self.client_cpus or set())})"
        )


def _spec(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _start(db: str, port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cape_coordinator",
            "coordinator",
            "serve",
            "--db",
            db,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
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


def _tree_cpu_seconds(root: int) -> float | None:
    """CPU time of ``root`` and its direct children (a PostgreSQL postmaster and its
    backends), or None without /proc. A child that ended between two samples drops out,
    so this is a lower bound; the pooled connections live through a measured run."""
    total = _cpu_seconds(root)
    if total is None:
        return None
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
    urls: list[str],
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
    turn = 0
    while time.monotonic() < stop:
        body, n = _batch(run_id, batch)
        # Round-robin over the replicas, request by request (as a load balancer would).
        url = urls[turn % len(urls)]
        turn += 1
        t0 = time.perf_counter()
        resp = session.post(url + "/v1/audit", data=body, headers=headers, timeout=60)
        latencies.append(time.perf_counter() - t0)
        if resp.status_code != 200 or resp.json()["accepted"] != n:
            errors.append(f"{resp.status_code} {resp.text[:200]}")
            continue
        count += n
    sent.append(count)


def _run(
    args: argparse.Namespace,
    db: str,
    extra: list[str],
    replicas: int,
    pin: Pinning,
    db_pid: int | None = None,
) -> dict[str, object]:
    """One measured run against ``replicas`` serving processes on one database."""
    pin.server()
    init = subprocess.run(
        [sys.executable, "-m", "cape_coordinator", "coordinator", "init", "--db", db, *extra],
        capture_output=True,
        text=True,
        env=_env(),
        check=True,
    )
    admin_token = init.stdout.strip().splitlines()[-1]
    ports = [_free_port() for _ in range(replicas)]
    procs = [_start(db, port, extra) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        admin = Client(urls[0], admin_token)
        token = admin.create_token("bench", "pipeline", labels=["bench"])["token"]
        auditor = admin.create_token("bench-auditor", "auditor")["token"]
        latencies: list[float] = []
        sent: list[int] = []
        errors: list[str] = []
        pin.clients()
        load_before = os.getloadavg()[0]
        cpu_before = [_cpu_seconds(p.pid) for p in procs]
        db_before = _tree_cpu_seconds(db_pid) if db_pid else None
        start = time.monotonic()
        stop = start + args.seconds
        threads = [
            threading.Thread(
                target=_client_loop,
                args=(
                    [*urls[i % replicas :], *urls[: i % replicas]],
                    token,
                    args.batch,
                    stop,
                    latencies,
                    sent,
                    errors,
                ),
            )
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        cpu_after = [_cpu_seconds(p.pid) for p in procs]
        db_after = _tree_cpu_seconds(db_pid) if db_pid else None
        load_after = os.getloadavg()[0]
        verify = Client(urls[-1], auditor, timeout=(3, 600)).verify_audit()
        stored = distinct = 0
        after = 0
        seen: set[str] = set()
        reader = Client(urls[0], auditor, timeout=(3, 600))
        while True:
            page = reader.list_audit(event="policy.fetched", after_seq=after, limit=1000)
            if not page:
                break
            stored += len(page)
            seen.update(e["record"]["record_id"] for e in page)
            after = page[-1]["seq"]
        distinct = len(seen)
    finally:
        pin.release()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    qs = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    cpu = None
    if None not in cpu_before and None not in cpu_after:
        cpu = sum(a - b for a, b in zip(cpu_after, cpu_before, strict=True)) / elapsed  # type: ignore[operator]
    return {
        "replicas": replicas,
        "elapsed": elapsed,
        "requests": len(latencies),
        "errors": errors,
        "sent": sum(sent),
        "stored": stored,
        "distinct": distinct,
        "rps": sum(sent) / elapsed,
        "p50": qs[49] * 1000,
        "p99": qs[98] * 1000,
        "intact": verify["intact"],
        "entries": verify["count"],
        "cpu": cpu,
        "db_cpu": (db_after - db_before) / elapsed
        if db_before is not None and db_after is not None
        else None,
        "load": (load_before, load_after),
    }


def _healthz_p50(url: str, seconds: float) -> float:
    session = requests.Session()
    times = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        t0 = time.perf_counter()
        session.get(url + "/healthz", timeout=60)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _flood(url: str, stop: float) -> None:
    """Unauthenticated 4 MiB bodies, one after the other, until ``stop``."""
    body = b'{"records": [' + b" " * (4 * 1024 * 1024 - 16) + b"]}"
    session = requests.Session()
    while time.monotonic() < stop:
        try:
            session.post(url + "/v1/audit", data=body, timeout=60)
        except requests.RequestException:
            session = requests.Session()


def flood(args: argparse.Namespace) -> int:
    """/healthz p50 alone, then while 4 threads post unauthenticated 4 MiB bodies."""
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "flood.db")
        subprocess.run(
            [sys.executable, "-m", "cape_coordinator", "coordinator", "init", "--db", db],
            capture_output=True,
            env=_env(),
            check=True,
        )
        port = _free_port()
        proc = _start(db, port, ["--max-body-bytes", str(8 * 1024 * 1024)])
        url = f"http://127.0.0.1:{port}"
        try:
            quiet = _healthz_p50(url, args.seconds)
            stop = time.monotonic() + args.seconds + 2
            threads = [threading.Thread(target=_flood, args=(url, stop)) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(1)
            loud = _healthz_p50(url, args.seconds)
            for t in threads:
                t.join()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"/healthz p50 alone {quiet:.1f} ms; under an unauthenticated 4 MiB flood {loud:.1f} ms")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    return 0


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
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="a throwaway PostgreSQL cluster (initdb/pg_ctl) instead of a SQLite file",
    )
    parser.add_argument(
        "--replicas",
        default="1",
        help="with --postgres: replica counts to measure one after the other, e.g. 1,2",
    )
    parser.add_argument(
        "--flood",
        action="store_true",
        help="instead: /healthz latency while unauthenticated 4 MiB bodies arrive",
    )
    parser.add_argument("--server-cpus", default="0", help="CPUs of the server side (taskset -c)")
    parser.add_argument("--client-cpus", default="1", help="CPUs of the posting clients")
    parser.add_argument(
        "--no-pin", action="store_true", help="leave server and clients on every CPU"
    )
    parser.add_argument(
        "--p99-target", type=float, default=250.0, help="the p99 latency target in ms"
    )
    args = parser.parse_args()
    if args.flood:
        return flood(args)
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    server_cpus, client_cpus = _cpus(args.server_cpus), _cpus(args.client_cpus)
    if args.no_pin or len(usable) < 2:
        pin = Pinning(None, None)
    elif not (server_cpus | client_cpus) <= usable or server_cpus & client_cpus:
        parser.error(f"--server-cpus and --client-cpus must be disjoint CPUs of {sorted(usable)}")
    else:
        pin = Pinning(server_cpus, client_cpus)
    counts = [int(x) for x in args.replicas.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.postgres:
            if counts != [1]:
                parser.error("several replicas need --postgres (one SQLite file, one process)")
            db = Path(tmp) / "bench.db"
            config = Path(tmp) / "bench.db.config.json"
            extra: list[str] = []
            if args.sqlite_synchronous:
                config.write_text(json.dumps({"sqlite_synchronous": args.sqlite_synchronous}))
            results.append(_run(args, str(db), extra, 1, pin))
            backend = f"sqlite (synchronous {args.sqlite_synchronous or 'FULL'})"
        else:
            sys.path.insert(0, str(ROOT / "tests" / "coordinator"))
            from _postgres import Cluster, pg_bin_dir

            bin_dir = pg_bin_dir()
            if bin_dir is None:
                parser.error("no initdb/pg_ctl found (apt-get install postgresql)")
            cluster = Cluster(bin_dir)
            # The database belongs to the server side: its processes inherit this pinning.
            pin.server()
            try:
                cluster.start()
            finally:
                pin.release()
            try:
                postmaster = (cluster.data / "postmaster.pid").read_text().split()[0]
                db_pid: int | None = int(postmaster)
            except (OSError, ValueError, IndexError):
                db_pid = None
            try:
                for i, n in enumerate(counts):
                    extra = [
                        "--key-file",
                        str(Path(tmp) / f"k{i}"),
                        "--config",
                        str(Path(tmp) / f"c{i}.json"),
                    ]
                    results.append(_run(args, cluster.new_database("bench"), extra, n, pin, db_pid))
            finally:
                cluster.stop()
            backend = "postgresql (throwaway cluster, fsync off)"

    print(f"backend {backend}; clients {args.clients}, batch {args.batch} records")
    print(
        f"machine: {os.cpu_count()} CPUs; {pin.describe()}; "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print("replicas  records/s  p50 ms  p99 ms  requests errors  sent/stored/distinct  chain  CPU")
    ok = True
    for r in results:
        cpu = f"{r['cpu']:.2f}" if r["cpu"] is not None else "-"
        if r["db_cpu"] is not None:
            # The database shares the server's CPU: its part of the core, beside the coordinator's.
            cpu += f" + db {r['db_cpu']:.2f}"
        print(
            f"{r['replicas']:>8}  {r['rps']:>9,.0f}  {r['p50']:>6.1f}  {r['p99']:>6.1f}"
            f"  {r['requests']:>8} {len(r['errors']):>6}"  # type: ignore[arg-type]
            f"  {r['sent']}/{r['stored']}/{r['distinct']}"
            f"  {'intact' if r['intact'] else 'BROKEN'}  {cpu}"
            f"  (load {r['load'][0]:.1f} -> {r['load'][1]:.1f})"  # type: ignore[index]
        )
        for e in r["errors"][:5]:  # type: ignore[index]
            print(f"error: {e}")
        ok = ok and r["sent"] == r["stored"] == r["distinct"] and not r["errors"] and r["intact"]
    for r in results:
        p99 = float(r["p99"])  # type: ignore[arg-type]
        met = "met" if p99 < args.p99_target else "missed"
        print(
            f"target: p99 < {args.p99_target:.0f} ms with {args.clients} posters, "
            f"{r['replicas']} replica(s): {p99:.1f} ms, {met}"
        )
    print("OK: every record stored exactly once" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
