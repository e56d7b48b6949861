"""``./scripts/demo --console``: a local coordinator seeded with the demo story, serving the
console until Ctrl-C.

The story, on a fresh SQLite file in a temporary directory: people of every role;
keys; two requests (one fulfilled, one in review, one declined); ``customers``
approved twice (v1 then v2 under a two-person rule) with comments; ``orders`` v1
sent back with "request changes" and v2 in review with its thread; pipeline runs
of every engine, among them one failed and one lost. Everything goes through the
same service methods as the API, so every step is on the audit chain. The
admin's sign-in token and the URL are printed; nothing leaves 127.0.0.1.

    python -m cape_coordinator.console.demo [--port 8687] [--dir PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from .. import db
from ..config import Paths, Settings
from ..coordinator import Coordinator
from ..services.base import Principal

PEOPLE = [
    ("rita", "requester"),
    ("alice", "author"),
    ("bob", "reviewer"),
    ("dana", "reviewer"),
    ("carol", "auditor"),
]

CUSTOMERS_V1 = {
    "label": "customers",
    "description": "Customer table for the churn model",
    "rules": [
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "customers-key"}}}],
        },
        {"match": {"name": "ssn"}, "actions": ["drop"]},
    ],
}
CUSTOMERS_V2 = {
    **CUSTOMERS_V1,
    "rules": [
        *CUSTOMERS_V1["rules"],
        {
            "match": {"name": "income"},
            "actions": [{"transform": {"type": "numeric-rounding", "precision": -3}}],
        },
    ],
}
ORDERS_V1 = {
    "label": "orders",
    "rules": [{"match": {"name": "card_number"}, "actions": ["drop"]}],
}
ORDERS_V2 = {
    "label": "orders",
    "rules": [
        {"match": {"name": "card_number"}, "actions": ["drop"]},
        {
            "match": {"name": "customer_email"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "orders-key"}}}],
        },
    ],
}


def seed(coord: Coordinator) -> dict[str, str]:
    """Write the demo story into ``coord``; returns each person's token (admin included)."""
    wf = coord.workflow
    system = Principal(token_id="-", name="demo-setup", role="admin")  # noqa: S106
    _, admin_token = coord.create_token(system, name="demo-admin", role="admin")
    admin = coord.tokens.authenticate(admin_token)
    tokens = {"demo-admin": admin_token}
    who: dict[str, Principal] = {}
    for name, role in PEOPLE:
        _, token = coord.create_token(admin, name=name, role=role)
        tokens[name] = token
        who[name] = coord.tokens.authenticate(token)
    _, pipe_token = coord.create_token(
        admin, name="nightly-etl", role="pipeline", labels=["customers", "orders"]
    )
    pipeline = coord.tokens.authenticate(pipe_token)
    coord.secrets.create(admin, "customers-key", ["customers"])
    coord.secrets.create(admin, "orders-key", ["orders"])
    coord.secrets.rotate(admin, "customers-key")

    rita, alice, bob, dana = who["rita"], who["alice"], who["bob"], who["dana"]
    # customers: requested, drafted, reviewed, approved; then v2 under the two-person rule.
    req = wf.create_request(
        rita,
        dataset="customers",
        schema={
            "id": "int64",
            "email": "string",
            "ssn": "string",
            "income": "float64",
            "signup": "date",
        },
        purpose="Train the churn model on last year's customers.",
        columns=[
            {"name": "id", "need": "join key with the events table"},
            {"name": "income", "need": "model feature (rounded is fine)"},
            {"name": "signup", "need": "tenure feature"},
        ],
    )
    v1 = coord.policies.push(alice, CUSTOMERS_V1)
    wf.link_request(alice, req["id"], "customers", v1["version"])
    coord.policies.submit(alice, "customers", v1["version"])
    wf.assign(alice, "customers", v1["version"], ["bob"])
    wf.comment(bob, "customers", 1, "Email is tokenized with a keyed HMAC: fine for joins.", rule=0)
    wf.approve(bob, "customers", 1)
    wf.set_review_settings(admin, "customers", required_approvals=2, reviewers=["bob", "dana"])
    v2 = coord.policies.push(alice, CUSTOMERS_V2)
    coord.policies.submit(alice, "customers", v2["version"])
    wf.comment(dana, "customers", 2, "Rounding income to thousands keeps the model useful.", rule=2)
    wf.approve(bob, "customers", 2)
    wf.approve(dana, "customers", 2)

    # orders: requested; v1 sent back; v2 in review, with the thread carried over.
    req2 = wf.create_request(
        rita,
        dataset="orders",
        schema={
            "order_id": "int64",
            "customer_email": "string",
            "card_number": "string",
            "amount": "float64",
        },
        purpose="Weekly revenue dashboard per customer segment.",
        columns=[
            {"name": "order_id", "need": "counting orders"},
            {"name": "amount", "need": "revenue"},
            {"name": "customer_email", "need": "joining to segments"},
        ],
    )
    o1 = coord.policies.push(alice, ORDERS_V1)
    wf.link_request(alice, req2["id"], "orders", o1["version"])
    coord.policies.submit(alice, "orders", 1)
    wf.assign(alice, "orders", 1, ["bob"])
    first = wf.comment(bob, "orders", 1, "customer_email goes out in clear text.")
    wf.comment(alice, "orders", 1, "Right, I will tokenize it.", reply_to=first["id"])
    wf.request_changes(bob, "orders", 1, "Tokenize customer_email before this ships.")
    coord.policies.push(alice, ORDERS_V2)
    coord.policies.submit(alice, "orders", 2)

    req3 = wf.create_request(
        rita,
        dataset="support_tickets",
        schema={"ticket_id": "int64", "body": "string"},
        purpose="Look for product names in raw ticket text.",
        columns=[{"name": "body", "need": "free-text search"}],
    )
    wf.decline_request(alice, req3["id"], "Raw ticket text holds personal data; ask for tags.")

    _runs(coord, pipeline)
    return tokens


def _runs(coord: Coordinator, pipeline: Principal) -> None:
    """Runs of every engine over the last two days: succeeded ones, one failed, one lost."""
    now = datetime.now(UTC)
    engines = ["pandas", "dask", "spark", "beam", "pandas", "dask", "spark", "beam"]
    records: list[dict[str, Any]] = []
    lost_id = ""
    for i, engine in enumerate([*engines, "spark", "dask"]):
        run_id = f"{engine}-{uuid.uuid4().hex[:8]}"
        start = now - timedelta(hours=44 - i * 4.5)
        label = "customers" if i % 3 else "orders"
        version = 2 if label == "customers" else 1
        policy = {"label": label, "version": version, "sha256": "0" * 64}
        base = {"run_id": run_id, "engine": engine, "engine_version": "demo", "policy": policy}
        records.append(
            {
                **base,
                "record_id": f"{run_id}:start",
                "event": "run.started",
                "time": db.format_time(start),
            }
        )
        rows = 20_000 + 7_000 * i
        if i == len(engines):
            records.append(
                {
                    **base,
                    "record_id": f"{run_id}:failed",
                    "event": "run.failed",
                    "time": db.format_time(start + timedelta(minutes=3)),
                    "error": {"type": "KeyMissingError", "message": "key orders-key not found"},
                }
            )
        elif i == len(engines) + 1:
            lost_id = run_id
        else:
            records.append(
                {
                    **base,
                    "record_id": f"{run_id}:done",
                    "event": "run.completed",
                    "time": db.format_time(start + timedelta(minutes=2)),
                    "rows_in": rows,
                    "rows_out": rows - 37,
                    "rows_redacted": 37,
                    "columns": {
                        "email": {"transform": "tokenizer", "values": rows - 12, "nulls": 12},
                        "ssn": {"transform": "column-redact", "values": rows, "nulls": 0},
                    },
                }
            )
    coord.post_audit(pipeline, records)
    # Demo only: the lost run last reported two hours ago (the run summary, not the chain).
    with coord.engine.begin() as conn:
        conn.execute(
            update(db.runs)
            .where(db.runs.c.run_id == lost_id)
            .values(last_seen=db.format_time(now - timedelta(hours=2)))
        )


def main(argv: list[str] | None = None) -> int:
    """Seed a fresh coordinator and serve it until Ctrl-C."""
    import uvicorn

    from ..app import create_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8687)
    parser.add_argument("--dir", help="where to keep the database (default: a temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cape-console-demo-"))
    paths = Paths.resolve(str(work / "cape.db"))
    coord, _ = Coordinator.initialize(paths, Settings(lost_after_seconds=3600))
    try:
        tokens = seed(coord)
        app = create_app(coord)
        url = f"http://127.0.0.1:{args.port}/ui"
        print(f"Cape console demo: {url}  (database {paths.sqlite_file})")
        print("Sign in with one of these tokens (Ctrl-C stops the server):")
        for name, token in tokens.items():
            print(f"  {name:<11} {token}")
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        coord.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
