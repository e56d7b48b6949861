"""Audit sinks: where the coordinator copies its audit chain besides the database.

The database stays the store of record; each configured sink (a JSONL file with
rotation, syslog, a signed webhook, OpenTelemetry logs) is fed by its own
dispatcher in :mod:`cape_coordinator.services.delivery`, which reads the chain
after the sink's cursor and advances the cursor only once the sink has taken the
batch. Every delivered record carries its chain ``seq`` and ``record_id`` so a
receiver can drop the duplicates at-least-once delivery may bring.
"""

from __future__ import annotations

from .base import DeliveryError, Sink, open_sink, record_document
from .config import JsonlSink, OtlpSink, SinkConfig, SyslogSink, WebhookSink

__all__ = [
    "DeliveryError",
    "JsonlSink",
    "OtlpSink",
    "Sink",
    "SinkConfig",
    "SyslogSink",
    "WebhookSink",
    "open_sink",
    "record_document",
]
