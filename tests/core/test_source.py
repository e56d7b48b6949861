"""resolve_policy: without a client nothing changes; with one, the label is fetched from it."""

from __future__ import annotations

from typing import Any

import pytest

from cape_pipelines.audit import MemorySink
from cape_pipelines.keys import KeyRef, KeyResolver
from cape_pipelines.policy import load_policy
from cape_pipelines.source import resolve_policy

DOC = {
    "label": "orders",
    "version": 4,
    "rules": [
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "k"}}}],
        }
    ],
}


class FakeClient:
    """The methods the engines use, recording what was asked."""

    url = "http://coordinator.test"

    def __init__(self) -> None:
        self.sink = MemorySink()
        self.asked: list[str] = []

    def get_policy(self, label: str) -> Any:
        self.asked.append(label)
        return load_policy({**DOC, "label": label})

    def key_provider(self, label: str) -> Any:
        return f"fake ({label})", lambda name: b"c" * 32 if name == "k" else None

    def default_audit_sink(self) -> MemorySink:
        return self.sink


def test_without_client_passes_everything_through():
    resolver = KeyResolver({"k": b"x" * 32})
    sink = MemorySink()
    got = resolve_policy(DOC, resolver=resolver, audit=sink)
    assert (got.policy.label, got.resolver, got.audit, got.source) == (
        "orders",
        resolver,
        sink,
        None,
    )


def test_with_client_the_label_is_fetched():
    client = FakeClient()
    got = resolve_policy("orders", client=client)
    assert client.asked == ["orders"]
    assert got.audit is client.sink
    assert got.source == "coordinator http://coordinator.test label orders version 4"
    assert got.resolver is not None
    assert got.resolver.resolve(KeyRef(secret="k")) == b"c" * 32


def test_explicit_keys_and_audit_come_first():
    client = FakeClient()
    sink = MemorySink()
    got = resolve_policy("orders", client=client, keys={"k": b"e" * 32}, audit=sink)
    assert got.audit is sink
    assert got.resolver is not None
    assert got.resolver.resolve(KeyRef(secret="k")) == b"e" * 32


@pytest.mark.parametrize(
    ("policy", "kwargs", "match"),
    [
        # A policy document with a client: the coordinator's copy must be the one used.
        (DOC, {}, "named by its label on the coordinator"),
        # A resolver would bypass the coordinator's keys.
        ("orders", {"resolver": KeyResolver()}, "keys come from the coordinator"),
    ],
)
def test_refused_combinations(policy, kwargs, match):
    client = FakeClient()
    with pytest.raises(TypeError, match=match):
        resolve_policy(policy, client=client, **kwargs)
    assert client.asked == []


def test_not_a_client_refused():
    with pytest.raises(TypeError, match=r"client must be a coordinator_client\.Client"):
        resolve_policy("orders", client=object())  # type: ignore[arg-type]
