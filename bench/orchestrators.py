"""Benchmark: what one orchestrator poll costs the coordinator, by applications and runs.

A YARN ResourceManager stand-in on loopback answers ``/ws/v1/cluster/apps``
with N applications (the documented shape); an in-process coordinator on a
fresh SQLite database holds R running runs that claim R of them. Each round
polls once; reported are the median and worst poll time of the rounds after
the first (which also links every run), the first poll's time, and the
response size. ``--end`` makes every claimed application end before the last
round, so that round also fails R runs (one chained record each).

    python bench/orchestrators.py --apps 5000 --runs 1000 --rounds 7
    python bench/orchestrators.py --apps 5000 --runs 200 --end
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "orchestrators"))

from _standin import serve, yarn_app  # noqa: E402

from cape_coordinator.config import Paths, Settings  # noqa: E402
from cape_coordinator.coordinator import Coordinator  # noqa: E402
from cape_coordinator.services.base import Principal  # noqa: E402
from cape_pipelines.audit import MemorySink, RunContext  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--end", action="store_true", help="end the claimed apps before the last round"
    )
    args = parser.parse_args()
    ids = [f"application_1700000000000_{i:06d}" for i in range(args.apps)]
    listing = {"apps": {"app": [yarn_app(i, "RUNNING") for i in ids]}}
    pipe = Principal("tok-bench", "bench", "pipeline", ("customers",))
    with tempfile.TemporaryDirectory() as tmp, serve() as rm:
        rm.route("/ws/v1/cluster/apps", listing)
        endpoint = {
            "name": "rm",
            "kind": "yarn",
            "url": rm.url,
            "grace_seconds": 0,
            "timeout_seconds": 30,
        }
        coord, _ = Coordinator.initialize(
            Paths.resolve(str(Path(tmp) / "c.db")), Settings(orchestrators=[endpoint])
        )
        try:
            records = []
            for i in range(args.runs):
                ctx = RunContext(engine="spark", sink=MemorySink())
                ctx.set_policy("customers", 1, "ab")
                records.append(ctx.record("run.started", orchestrator={"yarn": {"app_id": ids[i]}}))
            for i in range(0, len(records), 1000):
                coord.post_audit(pipe, records[i : i + 1000])
            times = []
            for round_no in range(args.rounds):
                if args.end and round_no == args.rounds - 1:
                    ended = [yarn_app(i, "KILLED", "KILLED") for i in ids[: args.runs]]
                    rm.route(
                        "/ws/v1/cluster/apps",
                        {"apps": {"app": ended + listing["apps"]["app"][args.runs :]}},
                    )
                start = time.perf_counter()
                status = coord.orchestrators.poll()["rm"]
                times.append(time.perf_counter() - start)
                assert status.last_error is None, status.last_error
            later = times[1:-1] if args.end else times[1:]
            out = {
                "apps": args.apps,
                "runs": args.runs,
                "response_bytes": len(json.dumps(listing)),
                "first_poll_s": round(times[0], 3),
                "poll_median_s": round(statistics.median(later), 3) if later else None,
                "poll_max_s": round(max(later), 3) if later else None,
                "linked": status.linked,
            }
            if args.end:
                out["ending_poll_s"] = round(times[-1], 3)
                out["failed_runs"] = status.failed_runs
            print(json.dumps(out))
        finally:
            coord.close()


if __name__ == "__main__":
    main()
