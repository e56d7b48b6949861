"""Audit ingest with audit sinks configured, side by side with none, in one run.

What sinks cost ingest, and what a dead receiver costs it: the same workload (B
batches of R run records posted through the ingest service of an in-process SQLite
coordinator, the path ``POST /v1/audit`` takes after parsing) is run with

* ``none``: no sinks (the baseline);
* ``live``: a JSONL sink and a webhook sink whose loopback receiver verifies and
  stores every batch;
* ``hanging``: a webhook whose receiver takes each request and never answers
  (the dispatcher waits out its timeout, then retries);
* ``refused``: a webhook to a closed port (every attempt fails at once; the default
  backoff), and ``refused-fast``: the same retried every 10-100 ms.

For each case the bench reports the median over the repeats of ingest records/s, the
p50 and p99 latency of one batch, the ratio of throughput to ``none``, and for
``live`` how long after the last commit both sinks had everything (the drain time)
and the rate they delivered at. It checks the live receivers got every record.

    python bench/sinks.py [--batches 300] [--records 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "monitoring"))

from _sink_receivers import WebhookReceiver  # noqa: E402

from cape_coordinator.config import Paths, Settings  # noqa: E402
from cape_coordinator.coordinator import Coordinator  # noqa: E402
from cape_coordinator.services.base import Principal  # noqa: E402

SECRET = "bench-webhook-secret-0123456789"
PIPE = Principal("-", "bench", "pipeline", ("bench",))
CASES = ("none", "live", "hanging", "refused", "refused-fast")


def _records(n: int) -> list[dict[str, Any]]:
    run_id = str(uuid.uuid4())
    return [
        {
            "record_id": str(uuid.uuid4()),
            "run_id": run_id,
            "event": "policy.fetched",
            "time": "2026-11-30T01:00:00Z",
            "policy": {"label": "bench", "version": 1, "sha256": "ab"},
        }
        for _ in range(n)
    ]


def _hook(url: str, **extra: Any) -> dict[str, Any]:
    return {"name": "hook", "kind": "webhook", "url": url, "secret": SECRET, **extra}


def _once(case: str, batches: int, size: int, work: Path) -> dict[str, float]:
    receiver = None
    sinks: list[dict[str, Any]] = []
    if case == "live":
        receiver = WebhookReceiver(SECRET).start()
        sinks = [
            _hook(receiver.url, batch_size=500),
            {"name": "file", "kind": "jsonl", "path": str(work / "a.jsonl"), "batch_size": 500},
        ]
    elif case == "hanging":
        receiver = WebhookReceiver(SECRET)
        receiver.hold = threading.Event()
        receiver.start()
        sinks = [_hook(receiver.url, timeout_seconds=30)]
    elif case == "refused":
        # The default backoff (0.5 s doubling to 60 s).
        sinks = [_hook("http://127.0.0.1:9/x")]
    elif case == "refused-fast":
        # A retry every 10-100 ms: the worst a misconfigured sink can do.
        sinks = [_hook("http://127.0.0.1:9/x", retry_base_seconds=0.01, retry_max_seconds=0.1)]
    coord, _ = Coordinator.initialize(
        Paths.resolve(str(work / "cape.db")), Settings.from_dict({"audit_sinks": sinks})
    )
    try:
        coord.delivery.start()
        work_batches = [_records(size) for _ in range(batches)]
        latencies = []
        start = time.perf_counter()
        for batch in work_batches:
            t0 = time.perf_counter()
            coord.post_audit(PIPE, batch)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        out = {
            "rate": batches * size / elapsed,
            "p50": statistics.median(latencies),
            "p99": statistics.quantiles(latencies, n=100)[98],
        }
        if case == "live":
            total = coord.chain.count()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and any(coord.delivery.backlog().values()):
                time.sleep(0.01)
            drain = time.perf_counter() - start - elapsed
            assert receiver is not None and len(receiver.by_seq) == total, "records missing"
            out["drain"] = drain
            out["delivered_rate"] = total / (elapsed + drain)
        return out
    finally:
        if receiver is not None:
            if receiver.hold is not None:
                receiver.hold.set()
            receiver.stop()
        coord.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("cape_coordinator").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up, not counted
        _once("live", args.batches // 4, args.records, Path(tmp))
    results: dict[str, list[dict[str, float]]] = {c: [] for c in CASES}
    for i in range(args.repeat):
        # Interleaved and rotated, so drift on a shared machine hits every case alike.
        for case in CASES[i % len(CASES) :] + CASES[: i % len(CASES)]:
            with tempfile.TemporaryDirectory() as tmp:
                results[case].append(_once(case, args.batches, args.records, Path(tmp)))
    base = statistics.median(r["rate"] for r in results["none"])
    print(
        f"{args.batches} batches x {args.records} records, SQLite (synchronous=FULL), "
        f"median of {args.repeat}"
    )
    print(f"{'case':<13}{'records/s':>12}{'x none':>9}{'p50 ms':>9}{'p99 ms':>9}  delivery")
    for case in CASES:
        rows = results[case]
        rate = statistics.median(r["rate"] for r in rows)
        p50 = statistics.median(r["p50"] for r in rows) * 1000
        p99 = statistics.median(r["p99"] for r in rows) * 1000
        extra = ""
        if case == "live":
            drain = statistics.median(r["drain"] for r in rows)
            delivered = statistics.median(r["delivered_rate"] for r in rows)
            extra = f"drained {drain:.2f} s after the last commit, {delivered:,.0f} records/s"
        print(f"{case:<13}{rate:>12,.0f}{rate / base:>9.2f}{p50:>9.2f}{p99:>9.2f}  {extra}")


if __name__ == "__main__":
    main()
