"""Audit spool delivery with poisoned records, side by side with a clean spool, in one run.

What one refused record costs the others: N records are put in a spool, P of them
poisoned (the coordinator refuses any batch holding one with 422, storing nothing of
it, as the contract says), and a :class:`~coordinator_client.SpoolSink` delivers them
to a loopback stand-in coordinator (``tests/coordinator/_standin.py``). For each P
the bench reports the median delivery time over the repeats, records/s, the number
of POST requests and records sent, and the ratio to the clean spool (P = 0). Every
good record must be stored exactly once and every poisoned one end in rejected/.

    python bench/spool.py [--records 5000] [--poisoned 0,1,10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "coordinator"))

from _standin import StandIn  # noqa: E402

from coordinator_client import SpoolSink, Transport  # noqa: E402


def _refuse(records: list[dict]) -> tuple[int, dict] | None:
    for index, record in enumerate(records):
        if record.get("poison"):
            error = {"code": "record_invalid", "message": "bad", "index": index}
            return 422, {"error": error}
    return None


def _fill(spool: Path, records: int, poisoned: int) -> None:
    pending = spool / "pending"
    pending.mkdir(parents=True)
    bad = {round(i * records / poisoned) for i in range(poisoned)} if poisoned else set()
    run_id = str(uuid.uuid4())
    for i in range(records):
        record = {
            "record_id": str(uuid.uuid4()),
            "run_id": run_id,
            "event": "policy.fetched",
            "time": "2026-11-30T01:00:00Z",
            "source": "bench",
        }
        if i in bad:
            record["poison"] = True
        (pending / f"{i:020d}-bench.json").write_text(json.dumps(record))


def _once(records: int, poisoned: int, batch_size: int) -> tuple[float, int, int]:
    standin = StandIn()
    standin.refuse = _refuse
    with standin.running(), tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp)
        _fill(spool, records, poisoned)
        start = time.perf_counter()
        sink = SpoolSink(
            Transport(standin.url, "bench"),
            spool,
            batch_size=batch_size,
            min_backoff=0.01,
            max_backoff=0.05,
            poll_interval=0.01,
        )
        if not sink.flush(600):
            raise SystemExit("the spool did not drain in 600 s")
        elapsed = time.perf_counter() - start
        sink.close()
        stored = [r["record_id"] for r in standin.stored]
        assert len(stored) == len(set(stored)) == records - poisoned, "lost or duplicated"
        assert sink.rejected_count() == poisoned, "a poisoned record was not set aside"
        return elapsed, len(standin.batches), sum(standin.batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--poisoned", default="0,1,10")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for poisoned in [int(p) for p in args.poisoned.split(",")]:
        runs = [_once(args.records, poisoned, args.batch_size) for _ in range(args.repeat)]
        median = statistics.median(r[0] for r in runs)
        rows.append((poisoned, median, runs[0][1], runs[0][2]))
    base = rows[0][1]
    print(f"{args.records} records, batch {args.batch_size}, median of {args.repeat}")
    header = ("poisoned", "median s", "good rec/s", "POSTs", "sent", "ratio")
    print("{:>8} {:>9} {:>11} {:>6} {:>7} {:>6}".format(*header))
    for poisoned, median, posts, sent in rows:
        rate = (args.records - poisoned) / median
        print(
            f"{poisoned:>8} {median:>9.2f} {rate:>11,.0f} {posts:>6} {sent:>7} "
            f"{median / base:>6.2f}"
        )


if __name__ == "__main__":
    main()
