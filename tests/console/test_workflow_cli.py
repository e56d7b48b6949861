"""``cape request ...`` and ``cape policy comment|assign|request-changes|review`` against a
live coordinator, run as a script would run them (a subprocess with CAPE_TOKEN)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _browser import LiveServer
from _console_support import POLICY, ROOT, Coord, make_coord


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Coord, LiveServer]]:
    c = make_coord(tmp_path_factory.mktemp("workflow-cli"))
    srv = LiveServer(c.app)
    srv.start()
    try:
        yield c, srv
    finally:
        srv.stop()
        c.coord.close()


def cape(live: tuple[Coord, LiveServer], who: str, *args: str, ok: bool = True) -> str:
    c, srv = live
    env = dict(os.environ)
    env.update(
        CAPE_COORDINATOR_URL=srv.url,
        CAPE_TOKEN=c.tokens[who],
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cape_pipelines.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


def test_request_to_review_from_the_command_line(live, tmp_path: Path):
    c, _ = live
    sample = tmp_path / "customers.csv"
    sample.write_text("id,email,ssn,age\n1,a@x,123,40\n", encoding="utf-8")
    out = cape(
        live,
        "requester",
        "request",
        "create",
        "--dataset",
        "customers",
        "--sample",
        str(sample),
        "--purpose",
        "churn model",
        "--need",
        "age=model feature",
    )
    request_id = out.strip().splitlines()[-1]
    assert request_id.startswith("req-")
    shown = cape(live, "requester", "request", "show", request_id)
    assert "needs age (int64): model feature" in shown and "(open)" in shown
    assert request_id in cape(live, "author", "request", "list", "--state", "open")

    version = c.coord.policies.push(c.principals["author"], POLICY)["version"]
    cape(live, "author", "request", "link", request_id, "customers", str(version))
    cape(live, "author", "policy", "submit", "customers", str(version))
    out = cape(live, "author", "policy", "assign", "customers", str(version), "bob")
    assert "reviewers bob" in out and "0 of 1" in out
    out = cape(
        live, "reviewer", "policy", "comment", "customers", str(version), "why age?", "--rule", "0"
    )
    assert out.startswith("comment ")
    review = cape(live, "reviewer", "policy", "review", "customers", str(version))
    assert "requested by rita" in review and "ssn: dropped" in review and "why age?" in review
    cape(
        live,
        "reviewer",
        "policy",
        "request-changes",
        "customers",
        str(version),
        "--reason",
        "drop age",
    )
    assert c.coord.policies.info("customers", version)["state"] == "returned"
    thread = cape(live, "author", "policy", "comments", "customers", str(version))
    assert "Changes requested: drop age" in thread


def test_refusals_are_one_line_reasons_with_a_failing_exit(live):
    err = cape(
        live,
        "reviewer",
        "request",
        "create",
        "--dataset",
        "d",
        "--schema",
        "a:int64",
        "--purpose",
        "p",
        "--need",
        "a=x",
        ok=False,
    )
    assert "forbidden" in err or "may not" in err
    err = cape(
        live,
        "requester",
        "request",
        "create",
        "--dataset",
        "d",
        "--schema",
        "a:varchar",
        "--purpose",
        "p",
        "--need",
        "a=x",
        ok=False,
    )
    assert "type must be one of" in err
    err = cape(
        live,
        "requester",
        "request",
        "create",
        "--dataset",
        "d",
        "--schema",
        "a",
        "--purpose",
        "p",
        "--need",
        "a=x",
        ok=False,
    )
    assert "COLUMN:TYPE" in err
    err = cape(live, "author", "request", "decline", "req-000000000000", "--reason", "x", ok=False)
    assert "not found" in err


def test_review_settings_from_the_command_line(live):
    out = cape(
        live,
        "admin",
        "policy",
        "review-settings",
        "customers",
        "--required-approvals",
        "2",
        "--reviewers",
        "bob,dana",
    )
    assert '"required_approvals": 2' in out
    out = cape(live, "reviewer", "policy", "review-settings", "customers")
    assert '"reviewers": ["bob", "dana"]' in out
