"""The CLI contract scripts rely on, through the integrated ``cape`` command."""

from __future__ import annotations

import pytest
import yaml
from _coord_support import new_label, policy_doc, run_cli

from cape_pipelines.cli import main


@pytest.fixture
def cape(server, monkeypatch, capsys):
    """Run ``cape ARGS`` as ``token`` (via CAPE_TOKEN); returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("CAPE_COORDINATOR_URL", server.url)

    def run(token: str, *args: str) -> tuple[int, str, str]:
        monkeypatch.setenv("CAPE_TOKEN", token)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_script_flow(cape, tokens, tmp_path):
    code, out, _ = cape(tokens["admin"], "token", "create", "--role", "author", "--name", "erin")
    assert code == 0
    author = out.strip().splitlines()[-1]
    assert author.startswith("cape_") and " " not in author
    code, out, _ = cape(tokens["admin"], "token", "create", "--role", "reviewer", "--name", "finn")
    reviewer = out.strip().splitlines()[-1]

    label = new_label("cli")
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_doc(label)))
    code, out, _ = cape(author, "policy", "push", str(path))
    assert code == 0 and out.strip().splitlines()[-1] == "1"
    path.write_text(yaml.safe_dump(policy_doc(label, column="other")))
    code, out, _ = cape(author, "policy", "push", str(path))
    assert out.strip().splitlines()[-1] == "2"

    assert cape(author, "policy", "submit", label, "1")[0] == 0
    assert cape(author, "policy", "submit", label, "2")[0] == 0
    assert cape(reviewer, "policy", "approve", label, "1")[0] == 0
    code, out, _ = cape(reviewer, "policy", "reject", label, "2", "--reason", "wrong column")
    assert code == 0 and "rejected" in out

    code, out, _ = cape(reviewer, "policy", "history", label)
    assert [line.split("\t")[:2] for line in out.strip().splitlines()[1:]] == [
        ["1", "active"],
        ["2", "rejected"],
    ]
    code, out, _ = cape(reviewer, "policy", "diff", label, "1", "2")
    assert "-    name: ssn" in out and "+    name: other" in out
    code, out, _ = cape(reviewer, "policy", "show", label)
    assert yaml.safe_load(out)["rules"][0]["match"] == {"name": "ssn"}

    code, out, _ = cape(tokens["admin"], "key", "create", new_label("k"), "--labels", "customers")
    assert code == 0 and "version 1" in out
    code, out, _ = cape(tokens["auditor"], "runs", "list", "--json")
    assert code == 0
    code, out, _ = cape(
        tokens["auditor"], "audit", "list", "--label", label, "--event", "policy.approved"
    )
    assert code == 0 and len(out.strip().splitlines()) == 1
    assert cape(tokens["auditor"], "audit", "verify")[0] == 0


@pytest.mark.parametrize(
    "role,args,reason",
    [
        ("author", ["policy", "approve", "customers", "1"], "403 forbidden"),
        ("reviewer", ["policy", "approve", "no-such-label", "1"], "404"),
        ("auditor", ["token", "create", "--role", "admin", "--name", "x"], "403 forbidden"),
        ("pipeline", ["audit", "verify"], "403 forbidden"),
        ("admin", ["token", "revoke", "0000000000000000"], "404"),
        ("admin", ["key", "create", "k", "--labels", ","], "at least one label"),
    ],
)
def test_refused_actions_exit_nonzero_with_one_line(cape, tokens, role, args, reason):
    code, out, err = cape(tokens[role], *args)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and reason in err
    assert "Traceback" not in out + err


def test_malformed_policy_file(cape, tokens, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "label: ok\nrules:\n  - match: {name: a}\n"
        "    actions: [{transform: {type: numeric-rounding}}]\n"
    )
    code, _, err = cape(tokens["author"], "policy", "push", str(path))
    assert code != 0 and "rules[0].actions[0].transform.precision" in err
    path.write_text("label: [unclosed\n")
    code, _, err = cape(tokens["author"], "policy", "push", str(path))
    assert code != 0 and "line 2" in err


def test_connection_from_flags_or_environment(server, tokens, monkeypatch, capsys):
    monkeypatch.delenv("CAPE_COORDINATOR_URL", raising=False)
    monkeypatch.delenv("CAPE_TOKEN", raising=False)
    assert main(["runs", "list"]) != 0
    assert "CAPE_COORDINATOR_URL" in capsys.readouterr().err
    assert main(["runs", "list", "--coordinator", server.url]) != 0
    assert "CAPE_TOKEN" in capsys.readouterr().err
    assert main(["runs", "list", "--coordinator", server.url, "--token", tokens["auditor"]]) == 0
    monkeypatch.setenv("CAPE_COORDINATOR_URL", "http://127.0.0.1:9")
    assert main(["runs", "list", "--token", tokens["auditor"]]) != 0
    assert "cannot reach the coordinator" in capsys.readouterr().err


def test_init_refuses_an_existing_database(server):
    proc = run_cli("coordinator", "init", "--db", str(server.db), check=False)
    assert proc.returncode != 0
    assert "already" in proc.stderr and "Traceback" not in proc.stderr


def test_policy_rollback_command(server, clients, tokens, capsys):
    label = new_label("rollback")
    author, reviewer = clients["author"], clients["reviewer"]
    versions = []
    for column in ("a", "b"):
        v = author.push_policy(policy_doc(label, column))["version"]
        author.submit_policy(label, v)
        reviewer.approve_policy(label, v)
        versions.append(v)
    conn = ["--coordinator", server.url, "--token", tokens["reviewer"]]
    argv = ["policy", "rollback", label, str(versions[0]), "--reason", "b drops too much"]
    assert main([*argv, *conn]) == 0
    assert f"version {versions[0]} is now active" in capsys.readouterr().out
    history = {p["version"]: p["state"] for p in author.policy_history(label)}
    assert history == {versions[0]: "active", versions[1]: "superseded"}
    assert main(["policy", "rollback", label, str(versions[0]), "--reason", "again", *conn]) != 0
