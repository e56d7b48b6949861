"""Issue 11 item 5: audit sinks as configuration (settings, a file, an environment
variable), and the webhook signature as a receiver verifies it, tried as an attacker
would: forged, altered, re-signed with another key, replayed late, headers missing."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sink_receivers import WebhookReceiver, wait_for

from cape_coordinator.config import (
    SINKS_ENV,
    SINKS_FILE_ENV,
    Paths,
    Settings,
    load_settings,
    resolve_sinks,
    save_settings,
)
from cape_coordinator.coordinator import Coordinator
from cape_coordinator.crypto import CoordinatorSetupError
from cape_coordinator.sinks.webhook import (
    WebhookVerificationError,
    sign,
    verify_request,
    verify_webhook,
)

SECRET = "a-webhook-secret-nobody-else-knows"


def _hook(name: str = "hook", **extra: object) -> dict[str, object]:
    return {"name": name, "kind": "webhook", "url": "http://127.0.0.1:9/x", **extra}


# ---- configuration ------------------------------------------------------------------------------


def test_sinks_from_settings_file_and_environment_in_order(tmp_path):
    sinks_file = tmp_path / "sinks.yaml"
    sinks_file.write_text(
        "- name: siem\n  kind: syslog\n  transport: tcp\n  port: 6514\n  events: ['run.*']\n",
        encoding="utf-8",
    )
    settings = Settings.from_dict(
        {
            "audit_sinks": [{"name": "file", "kind": "jsonl", "path": "/tmp/a.jsonl"}],
            "audit_sinks_file": str(sinks_file),
        }
    )
    env = {SINKS_ENV: json.dumps([_hook(secret_env="HOOK_SECRET")])}
    sinks = resolve_sinks(settings, env)
    assert [(s.name, s.kind) for s in sinks] == [
        ("file", "jsonl"),
        ("siem", "syslog"),
        ("hook", "webhook"),
    ]
    assert sinks[1].matches("run.completed") and not sinks[1].matches("policy.approved")
    assert sinks[0].matches("anything.at.all")
    # The file may come from the environment instead of the settings.
    only_env = resolve_sinks(Settings(), {SINKS_FILE_ENV: str(sinks_file)})
    assert [s.name for s in only_env] == ["siem"]


def test_duplicate_names_and_bad_entries_are_setup_errors_naming_the_place(tmp_path):
    settings = Settings.from_dict({"audit_sinks": [_hook(secret=SECRET)]})
    with pytest.raises(CoordinatorSetupError, match=r"'hook' is used twice \(config and \$CAPE"):
        resolve_sinks(settings, {SINKS_ENV: json.dumps([_hook(secret_env="X")])})
    with pytest.raises(CoordinatorSetupError, match=r"\$CAPE_COORDINATOR_AUDIT_SINKS: 0\.webhook"):
        resolve_sinks(Settings(), {SINKS_ENV: json.dumps([_hook(secret=SECRET, retries=3)])})
    with pytest.raises(CoordinatorSetupError, match="not valid JSON"):
        resolve_sinks(Settings(), {SINKS_ENV: "[{"})
    with pytest.raises(CoordinatorSetupError, match="exactly one of secret"):
        resolve_sinks(Settings(), {SINKS_ENV: json.dumps([_hook()])})
    with pytest.raises(CoordinatorSetupError, match="unix syslog sink needs socket_path"):
        Settings.from_dict({"audit_sinks": [{"name": "s", "kind": "syslog", "transport": "unix"}]})
    with pytest.raises(CoordinatorSetupError, match="event pattern"):
        Settings.from_dict({"audit_sinks": [_hook(secret=SECRET, events=["run.* OR 1=1"])]})
    with pytest.raises(CoordinatorSetupError, match="cannot read audit sinks file"):
        resolve_sinks(Settings(audit_sinks_file=str(tmp_path / "missing.json")), {})
    # An error about the secret's entry never quotes the secret.
    with pytest.raises(CoordinatorSetupError) as info:
        Settings.from_dict({"audit_sinks": [_hook(secret=SECRET, url="ftp://x")]})
    assert SECRET not in str(info.value)


def test_the_secret_stays_out_of_reprs_dumps_status_and_logs(tmp_path, caplog, monkeypatch):
    settings = Settings.from_dict({"audit_sinks": [_hook(secret=SECRET, retry_base_seconds=0.01)]})
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump(mode="json"))
    # The config file keeps it (mode 0600), and loads back the same.
    path = tmp_path / "cape.config.json"
    save_settings(path, settings)
    assert load_settings(path).audit_sinks[0].secret_bytes() == SECRET.encode()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    caplog.set_level(logging.DEBUG)
    coord, _ = Coordinator.initialize(Paths.resolve(str(tmp_path / "cape.db")), settings)
    try:
        coord.delivery.start()
        wait_for(lambda: coord.delivery.counters()["hook"]["failed"] >= 2, what="failures")
        assert SECRET not in repr(coord.delivery)
        assert SECRET not in json.dumps(coord.delivery.status())
    finally:
        coord.close()
    assert "seq 1-1 failed" in caplog.text
    assert SECRET not in caplog.text


def test_secret_from_env_or_file_and_too_short_secrets_refused(tmp_path, monkeypatch):
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    from_file = Settings.from_dict({"audit_sinks": [_hook(secret_file=str(secret_file))]})
    assert from_file.audit_sinks[0].secret_bytes() == SECRET.encode()
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    from_env = Settings.from_dict({"audit_sinks": [_hook(secret_env="HOOK_SECRET")]})
    assert from_env.audit_sinks[0].secret_bytes() == SECRET.encode()
    monkeypatch.setenv("HOOK_SECRET", "short")
    with pytest.raises(CoordinatorSetupError, match="at least 16 bytes") as info:
        from_env.audit_sinks[0].secret_bytes()
    assert "short" not in str(info.value)


# ---- the webhook signature, as a receiver checks it --------------------------------------------


def _signed(body: bytes, secret: str = SECRET, at: float | None = None) -> tuple[str, str]:
    stamp = str(int(time.time() if at is None else at))
    return stamp, sign(secret.encode(), stamp, body)


def test_a_genuine_batch_verifies():
    body = b'{"records":[{"seq":1}],"sink":"hook"}'
    stamp, signature = _signed(body)
    assert verify_webhook(SECRET, body, stamp, signature)["records"] == [{"seq": 1}]
    headers = {"cape-webhook-timestamp": stamp, "CAPE-WEBHOOK-SIGNATURE": signature}
    assert verify_request(SECRET.encode(), headers, body)["sink"] == "hook"


@pytest.mark.parametrize(
    "attack",
    [
        "altered body",
        "other secret",
        "signature moved to another timestamp",
        "stale replay",
        "future timestamp",
        "no timestamp",
        "no signature",
        "unversioned signature",
        "not hex",
        "truncated signature",
    ],
)
def test_forged_altered_and_replayed_batches_are_refused(attack):
    body = b'{"records":[{"seq":7}],"sink":"hook"}'
    stamp, signature = _signed(body)
    now = time.time()
    if attack == "altered body":
        body = body.replace(b"7", b"8")
    elif attack == "other secret":
        stamp, signature = _signed(body, secret="guessed-secret-of-an-attacker")
    elif attack == "signature moved to another timestamp":
        stamp = str(int(stamp) + 1)
    elif attack == "stale replay":
        now += 301
    elif attack == "future timestamp":
        stamp, signature = _signed(body, at=now + 3600)
    elif attack == "no timestamp":
        stamp = ""
    elif attack == "no signature":
        signature = ""
    elif attack == "unversioned signature":
        signature = signature[3:]
    elif attack == "not hex":
        signature = "v1=" + "zz" * 32
    elif attack == "truncated signature":
        signature = signature[:-2]
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET, body, stamp, signature, now=now)


def test_the_loopback_receiver_refuses_a_forged_post_and_a_replay():
    import requests

    receiver = WebhookReceiver(SECRET, tolerance=60).start()
    try:
        body = json.dumps({"records": [{"seq": 1}], "sink": "hook"}).encode()
        stamp, signature = _signed(body, secret="not-the-shared-secret-at-all")
        headers = {"Cape-Webhook-Timestamp": stamp, "Cape-Webhook-Signature": signature}
        assert requests.post(receiver.url, data=body, headers=headers, timeout=5).status_code == 401
        stamp, signature = _signed(body, at=time.time() - 3600)
        headers = {"Cape-Webhook-Timestamp": stamp, "Cape-Webhook-Signature": signature}
        assert requests.post(receiver.url, data=body, headers=headers, timeout=5).status_code == 401
        assert receiver.by_seq == {}
        assert receiver.rejected == [
            "signature does not match the body",
            receiver.rejected[1],
        ]
        assert "tolerance (stale or replayed)" in receiver.rejected[1]
    finally:
        receiver.stop()


def test_a_webhook_secret_missing_from_the_environment_stops_start_up(tmp_path, monkeypatch):
    monkeypatch.delenv("CAPE_TEST_ABSENT_SECRET", raising=False)
    settings = Settings.from_dict({"audit_sinks": [_hook(secret_env="CAPE_TEST_ABSENT_SECRET")]})
    coord, _ = Coordinator.initialize(Paths.resolve(str(tmp_path / "cape.db")), settings)
    try:
        with pytest.raises(CoordinatorSetupError, match="CAPE_TEST_ABSENT_SECRET is empty"):
            coord.delivery.start()
    finally:
        coord.close()
