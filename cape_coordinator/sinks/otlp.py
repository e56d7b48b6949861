"""The OpenTelemetry sink: each record as an OTLP log record, exported over OTLP/HTTP.

Built on the OpenTelemetry SDK's own types (``ReadableLogRecord``) and its OTLP/HTTP
protobuf exporter, called directly rather than through a batching processor: the
exporter's answer for a batch (success only on a 2xx from the collector) is what
lets the dispatcher advance the sink's cursor, so a batch is acknowledged or retried,
never dropped from a queue. Each log record has the record's time as its timestamp,
``event_name`` and severity from the event (WARN for failures, INFO otherwise), the
delivered document as its JSON body, and the ids as attributes (``cape.seq``,
``cape.record_id``, ``cape.event``, ``cape.kind`` and, when present, ``cape.label``,
``cape.run_id``, ``cape.sender``). The resource has ``service.name`` and the
configured attributes; the instrumentation scope is ``cape_coordinator.audit``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from .. import db
from .base import DeliveryError, document_json
from .config import OtlpSink
from .syslog import severity

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class OtlpSender:
    """Exports each batch once through an ``OTLPLogExporter``."""

    def __init__(self, config: OtlpSink):
        try:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        except ImportError:
            raise DeliveryError(
                "the otlp sink needs opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http"
                " (pip install 'cape-pipelines[otlp]')"
            ) from None
        self.config = config
        self._exporter = OTLPLogExporter(
            endpoint=config.endpoint,
            certificate_file=config.ca_file,
            headers=dict(config.headers),
            timeout=config.timeout_seconds,
        )
        self._resource = Resource.create({**config.resource, "service.name": config.service_name})
        self._scope = InstrumentationScope("cape_coordinator.audit")

    def _log_record(self, doc: Mapping[str, Any]) -> Any:
        from opentelemetry._logs import LogRecord, SeverityNumber
        from opentelemetry.sdk._logs import ReadableLogRecord

        event = str(doc["event"])
        warn = severity(event) == 4
        attributes: dict[str, Any] = {
            "cape.seq": int(doc["seq"]),
            "cape.record_id": str(doc["record_id"]),
            "cape.event": event,
            "cape.kind": str(doc["kind"]),
        }
        for name, key in (("label", "label"), ("run_id", "run_id"), ("sender", "sender")):
            if doc.get(key) is not None:
                attributes[f"cape.{name}"] = str(doc[key])
        moment = db.parse_time(str(doc["time"]))
        stamp = (moment - _EPOCH) // timedelta(microseconds=1) * 1000
        record = LogRecord(
            timestamp=stamp,
            observed_timestamp=time.time_ns(),
            severity_text="WARN" if warn else "INFO",
            severity_number=SeverityNumber.WARN if warn else SeverityNumber.INFO,
            body=document_json(doc),
            attributes=attributes,
            event_name=event,
        )
        return ReadableLogRecord(
            log_record=record, resource=self._resource, instrumentation_scope=self._scope
        )

    def deliver(self, docs: Sequence[Mapping[str, Any]]) -> None:
        from opentelemetry.sdk._logs.export import LogRecordExportResult

        batch = [self._log_record(doc) for doc in docs]
        if self._exporter.export(batch) is not LogRecordExportResult.SUCCESS:
            raise DeliveryError("otlp: the collector did not accept the batch")

    def close(self) -> None:
        self._exporter.shutdown()  # type: ignore[no-untyped-call]
