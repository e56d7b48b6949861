"""Real clusters on loopback, as separate processes: Spark standalone and Dask distributed.

The cluster tests (and ``bench/scale.py``) start a Spark standalone master and
workers as JVM processes from the pyspark package (``bin/spark-class``; the
wheel has no ``start-*.sh``), and a Dask scheduler and workers with the
``dask`` CLI. Everything binds to 127.0.0.1, every process has its own work
directory under a temporary directory, memory and cores are small (the
machine is shared), and every wait is bounded. :meth:`stop` ends exactly the
processes started here (their process groups), never anything found by name.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port that is free on loopback now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until ``port`` accepts connections; fail with the log tail if ``proc`` dies or time ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not open after {timeout}s:\n{tail(log)}")


def wait_for_text(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Until ``pattern`` (a regex) appears in ``log``; the matching text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace")) if log.exists() else None
        if found:
            return found.group(0)
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{tail(log)}")
        time.sleep(0.2)
    raise TimeoutError(f"{pattern!r} not in {log} after {timeout}s:\n{tail(log)}")


def tail(log: Path, lines: int = 40) -> str:
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def children(pid: int) -> list[int]:
    """Direct child process ids of ``pid`` (from /proc; Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after it.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class Processes:
    """Processes started in their own process groups, stopped together."""

    root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, name: str, argv: list[str], env: dict[str, str]
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        """SIGTERM each group, then SIGKILL what is left after a bounded wait."""
        for proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)
        self.procs.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def spark_home() -> str:
    import pyspark

    return os.path.dirname(pyspark.__file__)


class SparkStandalone:
    """A standalone master and ``workers`` workers (1 core, ``worker_memory`` each) on loopback."""

    def __init__(self, root: Path, workers: int = 2, worker_memory: str = "1g") -> None:
        self.root = root
        self.n_workers = workers
        self.worker_memory = worker_memory
        self.processes = Processes(root)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.url = ""
        # The master's web UI (its /json/ status is what the coordinator's poller reads).
        self.webui_url = ""

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        home = spark_home()
        env.update(
            SPARK_HOME=home,
            SPARK_LOCAL_IP=LOOPBACK,
            SPARK_LOG_DIR=str(self.root / "logs"),
            SPARK_DAEMON_MEMORY="256m",
            PYSPARK_PYTHON=sys.executable,
            PYSPARK_DRIVER_PYTHON=sys.executable,
            # The REST submission server and the UIs are not needed and would take ports.
            SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false -Dspark.ui.enabled=false",
            SPARK_WORKER_OPTS="-Dspark.worker.ui.enabled=false",
        )
        return env

    def start(self) -> str:
        spark_class = os.path.join(spark_home(), "bin", "spark-class")
        port = free_port()
        webui = free_port()
        master, log = self.processes.start(
            "master",
            [
                spark_class,
                "org.apache.spark.deploy.master.Master",
                "--host",
                LOOPBACK,
                "--port",
                str(port),
                "--webui-port",
                str(webui),
            ],
            self.env(),
        )
        wait_for_port(port, master, log, timeout=90)
        self.url = f"spark://{LOOPBACK}:{port}"
        self.webui_url = f"http://{LOOPBACK}:{webui}"
        for i in range(self.n_workers):
            self.add_worker(i)
        return self.url

    def add_worker(self, i: int) -> subprocess.Popen[bytes]:
        spark_class = os.path.join(spark_home(), "bin", "spark-class")
        work = self.root / f"worker{i}"
        work.mkdir(exist_ok=True)
        proc, log = self.processes.start(
            f"worker{i}",
            [
                spark_class,
                "org.apache.spark.deploy.worker.Worker",
                "--host",
                LOOPBACK,
                "--cores",
                "1",
                "--memory",
                self.worker_memory,
                "--work-dir",
                str(work),
                "--webui-port",
                str(free_port()),
                self.url,
            ],
            self.env(),
        )
        wait_for_text(log, r"Successfully registered with master", proc, timeout=90)
        self.workers.append(proc)
        return proc

    def executors(self, worker: int) -> list[int]:
        """Process ids of the executor JVMs the given worker launched."""
        return [
            pid
            for pid in children(self.workers[worker].pid)
            if "CoarseGrainedExecutorBackend" in cmdline(pid)
        ]

    def stop(self) -> None:
        self.processes.stop()


class DaskCluster:
    """``dask scheduler`` and ``workers`` ``dask worker`` processes (1 thread each) on loopback."""

    def __init__(
        self,
        root: Path,
        workers: int = 2,
        memory_limit: str = "1GB",
        python_path: list[str] | None = None,
    ) -> None:
        self.root = root
        self.python_path = python_path or []
        self.n_workers = workers
        self.memory_limit = memory_limit
        self.processes = Processes(root)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.address = ""

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DASK_DISTRIBUTED__WORKER__DAEMON"] = "False"
        if self.python_path:
            env["PYTHONPATH"] = os.pathsep.join([*self.python_path, env.get("PYTHONPATH", "")])
        return env

    def start(self) -> str:
        port = free_port()
        proc, log = self.processes.start(
            "scheduler",
            [
                sys.executable,
                "-m",
                "dask",
                "scheduler",
                "--host",
                LOOPBACK,
                "--port",
                str(port),
                "--no-dashboard",
            ],
            self.env(),
        )
        wait_for_port(port, proc, log, timeout=60)
        self.address = f"tcp://{LOOPBACK}:{port}"
        for i in range(self.n_workers):
            self.add_worker(i)
        return self.address

    def add_worker(self, i: int) -> subprocess.Popen[bytes]:
        work = self.root / f"worker{i}"
        work.mkdir(exist_ok=True)
        # No nanny: the worker is the process itself, so killing it kills the worker for good.
        proc, log = self.processes.start(
            f"worker{i}",
            [
                sys.executable,
                "-m",
                "dask",
                "worker",
                self.address,
                "--host",
                LOOPBACK,
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--memory-limit",
                self.memory_limit,
                "--local-directory",
                str(work),
                "--name",
                f"w{i}",
            ],
            self.env(),
        )
        wait_for_text(log, r"Registered to", proc, timeout=60)
        self.workers.append(proc)
        return proc

    def stop(self) -> None:
        self.processes.stop()
