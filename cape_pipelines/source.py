"""Where a run's policy, keys and audit records come from: given directly, or a coordinator.

Every engine entry point (:func:`cape_pipelines.apply_policy`, the Dask and
Spark ``apply_policy``, Beam's ``ApplyPolicy``, ``cape apply``) calls
:func:`resolve_policy` first. Without a client it only loads the policy and
changes nothing else. With ``client=`` (a :class:`coordinator_client.Client`)
the ``policy`` argument is a label on the coordinator: the active version is
fetched and its Ed25519 signature verified against the client's pinned key
before anything else happens (so before any data is read), keys are resolved
through the coordinator (after explicit ``keys=`` and ``CAPE_KEY_<NAME>``, as
for any provider, on the driver at plan time), and unless ``audit=`` says
otherwise the run's records go to the client's durable audit sink. The run
then emits a ``policy.fetched`` record naming the coordinator, the label and
the version. The core never imports the client: any object with the
:class:`CoordinatorClient` methods works.

>>> resolved = resolve_policy({"label": "d", "rules": [
...     {"match": {"name": "ssn"}, "actions": ["drop"]}]})
>>> resolved.policy.label, resolved.source
('d', None)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

from .audit import AuditTarget, Sink, resolve_sink
from .keys import KeyProvider, KeyResolver
from .policy.load import PolicySource, load_policy
from .policy.models import Policy


@runtime_checkable
class CoordinatorClient(Protocol):
    """What the engines need from a coordinator client (``coordinator_client.Client`` has it)."""

    url: str

    def get_policy(self, label: str) -> Policy: ...

    def key_provider(self, label: str) -> tuple[str, KeyProvider]: ...

    def default_audit_sink(self) -> Sink: ...


@dataclass(frozen=True)
class ResolvedPolicy:
    """A loaded policy and where its run gets keys and sends records.

    ``resolver`` is None when the caller gave none and no client is involved
    (``build_plan`` then uses ``keys=``); ``source`` is set only for a policy
    fetched from a coordinator, and is what the run's ``policy.fetched``
    record says.
    """

    policy: Policy
    resolver: KeyResolver | None
    audit: AuditTarget
    source: str | None = None


def resolve_policy(
    policy: PolicySource,
    *,
    client: CoordinatorClient | None = None,
    keys: Mapping[str, bytes | str] | None = None,
    resolver: KeyResolver | None = None,
    audit: AuditTarget = None,
) -> ResolvedPolicy:
    """The policy of a run, its key resolver and its audit target.

    Without ``client``: ``load_policy(policy)``, with ``resolver`` and
    ``audit`` passed through unchanged. With ``client``: ``policy`` must be
    the label (a string); the coordinator's active version is returned only
    after its signature verified (``coordinator_client.SignatureError``
    otherwise), keys come from ``keys``, the environment, then the
    coordinator, and records go to ``audit`` or else to the client's sink.
    """
    if client is None:
        return ResolvedPolicy(load_policy(policy), resolver, audit)
    if not isinstance(policy, str):
        raise TypeError(
            "with client=, the policy is named by its label on the coordinator (a string), "
            f"not given as a {type(policy).__name__}"
        )
    if resolver is not None:
        raise TypeError(
            "with client=, keys come from the coordinator; pass explicit ones as keys=, "
            "not resolver="
        )
    if not isinstance(client, CoordinatorClient):
        raise TypeError(f"client must be a coordinator_client.Client, not {type(client).__name__}")
    fetched = client.get_policy(policy)
    provider = client.key_provider(policy)
    # Workers read the coordinator's keys themselves, with a worker token minted per run.
    mint = getattr(client, "worker_keys", None)
    sources = {provider[0]: partial(mint, policy)} if callable(mint) else {}
    chain = KeyResolver(keys, providers=[provider], worker_sources=sources)
    sink: AuditTarget = audit if audit is not None else client.default_audit_sink()
    where = f"coordinator {client.url} label {fetched.label} version {fetched.version}"
    served_offline = getattr(client, "served_offline", None)
    if callable(served_offline) and served_offline(policy):
        # The coordinator was down: every record of this run says so (issue 9.7).
        sink = _OfflineSink(resolve_sink(sink))
        where += " (offline: the client's cached copy)"
    return ResolvedPolicy(fetched, chain, sink, where)


class _OfflineSink:
    """Adds ``offline: true`` to each record of a run whose policy came from the client's
    cache while the coordinator was unreachable; otherwise it is the sink it wraps."""

    def __init__(self, sink: Sink):
        self.sink = sink

    def __repr__(self) -> str:
        return f"offline({self.sink!r})"

    def emit(self, record: Mapping[str, Any]) -> None:
        self.sink.emit({**record, "offline": True})

    def close(self) -> None:
        self.sink.close()

    def __getattr__(self, name: str) -> Any:
        # flush(), pending_count() and the like of the wrapped sink (a SpoolSink).
        if name == "sink":  # not set yet, as while unpickling
            raise AttributeError(name)
        return getattr(self.sink, name)


__all__ = ["CoordinatorClient", "ResolvedPolicy", "resolve_policy"]
