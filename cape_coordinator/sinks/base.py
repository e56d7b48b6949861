"""What every audit sink shares: the delivered document, the sink interface, the factory.

A delivered record is the chain entry as stored (its ``record`` and where it came
from) with the chain's own columns beside it: ``seq`` (unique and increasing in one
coordinator's chain: the deduplication key), ``record_id`` (the sender's id),
``hash``/``prev_hash`` (so a receiver can check the entries link up) and the
indexed fields (``event``, ``label``, ``run_id``, ``kind``), so a receiver can
route without parsing the record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .config import JsonlSink, OtlpSink, SyslogSink, WebhookSink


class DeliveryError(Exception):
    """A batch was not taken by the sink; the message names the cause, never a secret
    or the records."""


class Sink(Protocol):
    """One open sink: ``deliver`` returns once the receiver has taken the whole batch,
    or raises :class:`DeliveryError` (the batch is then retried, whole)."""

    def deliver(self, docs: Sequence[Mapping[str, Any]]) -> None: ...

    def close(self) -> None: ...


def record_document(row: Mapping[str, Any]) -> dict[str, Any]:
    """The delivered form of one audit row (``seq``, ids, hashes, indexed fields, entry)."""
    entry = json.loads(row["body"])
    return {
        "seq": int(row["seq"]),
        "record_id": row["record_id"],
        "sender": row["sender"],
        "kind": row["kind"],
        "event": row["event"],
        "label": row["label"],
        "run_id": row["run_id"],
        "time": row["time"],
        "received_at": row["received_at"],
        "hash": row["hash"],
        "prev_hash": row["prev_hash"],
        "source": entry.get("source"),
        "record": entry.get("record"),
    }


def document_json(doc: Mapping[str, Any]) -> str:
    """One document as compact JSON (keys sorted, so equal records give equal bytes)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def open_sink(config: Any) -> Sink:
    """The sink a configuration describes (its kind's module is imported only here, so an
    unused kind's dependencies need not be installed)."""
    if isinstance(config, JsonlSink):
        from .jsonl import JsonlWriter

        return JsonlWriter(config)
    if isinstance(config, SyslogSink):
        from .syslog import SyslogSender

        return SyslogSender(config)
    if isinstance(config, WebhookSink):
        from .webhook import WebhookSender

        return WebhookSender(config)
    if isinstance(config, OtlpSink):
        from .otlp import OtlpSender

        return OtlpSender(config)
    raise TypeError(f"not a sink configuration: {type(config).__name__}")
