"""The coordinator flow end to end: a policy written, reviewed, then applied on Dask and Spark.

On the embedded defaults, in a fresh temporary directory each time:

1. ``cape coordinator init`` makes a coordinator on a local SQLite file and
   ``cape coordinator serve`` starts it on a free 127.0.0.1 port;
2. the admin makes tokens for an author, a reviewer, a pipeline and an
   auditor, and the keys the demo policy names (random, made by the
   coordinator: no demo key is involved here);
3. the author pushes the bundled demo policy and submits it; the author cannot
   approve it; a reviewer does, which activates and signs it;
4. a pipeline applies it by label, through ``coordinator_client.Client``, on
   Dask and on Spark to the bundled sample customers: the policy's signature is
   verified against the pinned key before any data is read, keys come from the
   coordinator, and each run's audit records go back to it;
5. the auditor lists the runs (``cape runs list``) and verifies the audit
   hash chain (``cape audit verify``); then the coordinator is stopped.

Every admin, author, reviewer and auditor step is the ``cape`` command line
(run as a subprocess, the way a script would use it); the pipeline step is the
Python API.

    python examples/coordinator_flow.py
    python examples/coordinator_flow.py --keep     # keep the directory (database, outputs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FlowResult:
    """What the flow did, for a test to check."""

    workdir: Path
    label: str
    version: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    verified: bool = False
    self_approval_refused: bool = False
    same_tokens: bool = False
    url: str = ""


class Cape:
    """Runs ``cape ...`` in a subprocess, as one principal (its token in ``CAPE_TOKEN``)."""

    def __init__(self, url: str | None = None):
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        if url:
            self.env["CAPE_COORDINATOR_URL"] = url
        self.last_code = 0
        self.last_error = ""

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cape_pipelines.cli", *args]

    def run(
        self, *args: str, token: str | None = None, check: bool = True, show: bool = True
    ) -> str:
        """Run ``cape ARGS`` (printing the command); return its standard output."""
        env = dict(self.env)
        if token is not None:
            env["CAPE_TOKEN"] = token
        if show:
            print(f"  $ cape {' '.join(args)}")
        proc = subprocess.run(
            self.command(*args), capture_output=True, text=True, env=env, timeout=300, check=False
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"cape {' '.join(args)} failed: {proc.stderr.strip()}")
        self.last_error = proc.stderr.strip()
        self.last_code = proc.returncode
        return proc.stdout

    @staticmethod
    def last_line(text: str) -> str:
        return text.strip().splitlines()[-1]


def step(number: int, title: str) -> None:
    print(f"\n== {number}. {title}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key_names(document: Any) -> list[str]:
    """Every ``{secret: NAME}`` a policy document refers to, in order of appearance."""
    found: list[str] = []
    if isinstance(document, dict):
        if set(document) == {"secret"} and isinstance(document["secret"], str):
            return [document["secret"]]
        for value in document.values():
            found += [n for n in key_names(value) if n not in found]
    elif isinstance(document, list):
        for value in document:
            found += [n for n in key_names(value) if n not in found]
    return found


def start_server(cape: Cape, db: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``cape coordinator serve`` in the background; returns once it answers /healthz."""
    import requests

    args = ["coordinator", "serve", "--db", str(db), "--host", "127.0.0.1", "--port", str(port)]
    print(f"  $ cape {' '.join(args)} &")
    with open(log, "ab") as out:
        proc = subprocess.Popen(cape.command(*args), stdout=out, stderr=out, env=cape.env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the coordinator exited: {log.read_text()}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the coordinator did not start within 60 s: {log.read_text()}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def local_spark() -> Any:
    """A small local SparkSession for running this file on its own."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("cape-coordinator-flow")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def run_pipelines(url: str, token: str, public_key: str, label: str, work: Path, spark: Any):
    """The pipeline's part: the same label applied on Dask and on Spark, through one client."""
    import dask.dataframe as dd
    import pandas as pd

    import cape_pipelines.dask as cape_dask
    import cape_pipelines.spark as cape_spark
    from cape_pipelines.cli import demo_paths
    from coordinator_client import Client

    data, _ = demo_paths()
    table = pacsv.read_csv(data)
    client = Client(url, token, public_key=public_key, spool_dir=work / "spool")
    try:
        print(f"  client = Client({url!r}, <pipeline token>, public_key=<pinned>)")
        # Both engines get the same Arrow-typed input (integers with nulls stay integers).
        ddf = dd.from_pandas(table.to_pandas(types_mapper=pd.ArrowDtype), npartitions=4)
        print(f"  cape_pipelines.dask.apply_policy(ddf, {label!r}, client=client)")
        protected = cape_dask.apply_policy(ddf, label, client=client)
        on_dask = cape_dask.compute(protected).sort_values("customer_id")
        print(f"    Dask: {len(on_dask)} of {table.num_rows} rows kept (row-redact removes minors)")

        print(f"  cape_pipelines.spark.apply_policy(sdf, {label!r}, client=client)")
        sdf = spark.createDataFrame(table).repartition(4)
        out = cape_spark.apply_policy(sdf, label, client=client)
        counters = cape_spark.write(out, str(work / "spark-output"), mode="overwrite")
        on_spark = spark.read.parquet(str(work / "spark-output")).toPandas()
        on_spark = on_spark.sort_values("customer_id")
        print(f"    Spark: wrote {counters.rows_out} rows to {work / 'spark-output'}")

        same = list(on_dask.columns) == list(on_spark.columns) and all(
            _values(on_dask[c]) == _values(on_spark[c]) for c in on_dask.columns
        )
        print(f"    Dask and Spark wrote the same values in every column: {same}")
        first = on_dask.iloc[0]
        print(
            f"    first row: customer {first['customer_id']}, email {first['email']}, "
            f"phone {first['phone'][:24]}..."
        )
        sink = client.default_audit_sink()
        delivered = sink.flush(60)
        print(f"  audit records delivered to the coordinator: {delivered}")
    finally:
        client.close()
    return same


def _values(column: Any) -> list[Any]:
    """A column's values as Python objects, every kind of null as None."""
    import pandas as pd

    return [None if pd.isna(v) else v for v in column.tolist()]


def run_flow(work: Path, spark: Any = None) -> FlowResult:
    """The whole flow in ``work``; the coordinator is stopped whatever happens."""
    from cape_pipelines.cli import demo_paths

    _, policy_file = demo_paths()
    document = yaml.safe_load(policy_file.read_text(encoding="utf-8"))
    label = document["label"]
    db = work / "cape.db"
    cape = Cape()

    step(1, "Initialise a coordinator on a local SQLite file")
    admin = Cape.last_line(cape.run("coordinator", "init", "--db", str(db)))
    print("    database, master key and signing key created; admin token printed once")
    public_key = Cape.last_line(cape.run("coordinator", "public-key", "--db", str(db)))
    print(f"    signing public key (pinned by the pipeline): {public_key}")

    step(2, "Start it on a free local port")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(cape, db, port, work / "serve.log")
    print(f"    serving on {url}")
    cape = Cape(url)
    try:
        step(3, "The admin makes one token per person or job, and the policy's keys")

        def token(role: str, name: str, *extra: str) -> str:
            out = cape.run("token", "create", "--role", role, "--name", name, *extra, token=admin)
            return Cape.last_line(out)

        author = token("author", "alice")
        alice_reviewing = token("reviewer", "alice")
        reviewer = token("reviewer", "bob")
        pipeline = token("pipeline", "nightly-etl", "--labels", label)
        auditor = token("auditor", "carol")
        for name in key_names(document):
            cape.run("key", "create", name, "--labels", label, token=admin)
        print("    random 32-byte keys, kept encrypted by the coordinator")

        step(4, "The author pushes the demo policy and submits it for review")
        pushed = cape.run("policy", "push", str(policy_file), token=author)
        version = int(Cape.last_line(pushed))
        print(f"    {label} version {version} (draft)")
        cape.run("policy", "submit", label, str(version), token=author)
        print("    alice also holds a reviewer token, but may not approve her own policy:")
        cape.run("policy", "approve", label, str(version), token=alice_reviewing, check=False)
        refused = cape.last_code != 0
        print(f"    {cape.last_error}")

        step(5, "A reviewer approves it: it is now active, and signed")
        approved = cape.run("policy", "approve", label, str(version), token=reviewer)
        print(f"    {approved.strip()}")

        step(6, "A pipeline applies it by label on Dask and on Spark")
        own_spark = spark is None
        spark = spark or local_spark()
        try:
            same = run_pipelines(url, pipeline, public_key, label, work, spark)
        finally:
            if own_spark:
                spark.stop()

        step(7, "The auditor lists the runs and verifies the audit chain")
        table = cape.run("runs", "list", "--label", label, token=auditor)
        print("\n".join(f"    {line}" for line in table.rstrip().splitlines()))
        listed = cape.run("runs", "list", "--label", label, "--json", token=auditor, show=False)
        runs = [json.loads(line) for line in listed.splitlines()]
        verify = cape.run("audit", "verify", token=auditor, check=False)
        print(f"    {verify.strip()}")
        verified = cape.last_code == 0
    finally:
        step(8, "Stop the coordinator")
        stop_server(server)
        print("    stopped")
    return FlowResult(work, label, version, runs, verified, refused, same, url)


def succeeded(result: FlowResult) -> bool:
    """Did the flow do what it shows: self-approval refused, both runs succeeded, chain intact."""
    return (
        result.verified
        and result.self_approval_refused
        and result.same_tokens
        and sorted((r["engine"], r["status"]) for r in result.runs)
        == [("dask", "succeeded"), ("spark", "succeeded")]
    )


def main(argv: list[str] | None = None, spark: Any = None) -> int:
    """Run the flow in a fresh temporary directory (removed afterwards unless ``--keep``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cape-coordinator-flow-"))
    print("Cape coordinator flow (synthetic sample data; keys made by the coordinator)")
    print(f"  working directory: {work}")
    try:
        result = run_flow(work, spark)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    ok = succeeded(result)
    print("\ncoordinator flow: " + ("done" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
