"""The audit sinks' settings: one pydantic model per kind, told apart by ``kind``.

Each sink has a ``name`` (its delivery cursor is kept under it, so renaming a sink
starts it again from ``start_at``), a ``kind`` with that kind's options, an
``events`` filter (shell-style patterns over the event name, such as ``run.*``),
and the delivery knobs every kind shares (batch size, retries, dead-letter file).
Unknown fields are refused, so a typo is an error naming it. The webhook's secret
is a :class:`~pydantic.SecretStr` (or the name of an environment variable or file
holding it): it never appears in a repr, a log line or an error.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from ..crypto import CoordinatorSetupError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_EVENT_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,64}$")


class SinkBase(BaseModel):
    """What every kind of sink has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    # Shell-style patterns over the event name (`run.*`, `policy.*`); a record goes to
    # the sink when any pattern matches. The default sends everything.
    events: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    # Where a new sink's cursor starts: the first record of the chain, or its end now.
    start_at: Literal["first", "latest"] = "first"
    batch_size: int = Field(default=100, ge=1, le=10_000)
    # Idle wait between looks at the chain (a commit wakes the dispatcher sooner).
    poll_seconds: float = Field(default=1.0, gt=0, le=300)
    # After a batch that was not full, wait this long before the next look, so that
    # under steady ingest records go out in fewer, fuller batches (each batch costs a
    # cursor commit beside ingest's); 0 sends each commit's records at once.
    linger_seconds: float = Field(default=0.2, ge=0, le=60)
    # Retries of one batch: exponential backoff from retry_base_seconds, capped at
    # retry_max_seconds, with full jitter. After max_attempts failed attempts the batch
    # goes to dead_letter when one is configured; without one it is retried until it
    # is delivered (nothing is dropped).
    max_attempts: int = Field(default=8, ge=1, le=1000)
    retry_base_seconds: float = Field(default=0.5, gt=0, le=60)
    retry_max_seconds: float = Field(default=60.0, gt=0, le=3600)
    dead_letter: str | None = None

    @field_validator("events")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not _EVENT_PATTERN.fullmatch(pattern):
                raise ValueError(f"event pattern {pattern!r} is not a valid pattern")
        return value

    def matches(self, event: str) -> bool:
        """Whether a record with this event name goes to the sink."""
        return any(fnmatch.fnmatchcase(event, pattern) for pattern in self.events)


class JsonlSink(SinkBase):
    """One JSON object per line in ``path``, rotated by size and/or age."""

    kind: Literal["jsonl"]
    path: str
    # Rotate before a batch would take the file over this size (a single batch larger
    # than it still goes whole into a fresh file: a record is never split).
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    # Rotate once the current file is this old (None: by size only).
    rotate_seconds: float | None = Field(default=None, gt=0)
    # Rotated files kept beside the current one (path.1 the newest ... path.keep).
    keep: int = Field(default=7, ge=1, le=1000)
    fsync: bool = True


class SyslogSink(SinkBase):
    """RFC 5424 messages over UDP, TCP (RFC 6587 octet counting) or a unix socket."""

    kind: Literal["syslog"]
    transport: Literal["udp", "tcp", "unix"] = "udp"
    host: str = "127.0.0.1"
    port: int = Field(default=514, ge=1, le=65535)
    # The unix socket's path, and whether it is a datagram (/dev/log) or stream socket.
    socket_path: str | None = None
    socket_type: Literal["dgram", "stream"] = "dgram"
    # 13: "log audit" (RFC 5424 table 1).
    facility: int = Field(default=13, ge=0, le=23)
    app_name: str = Field(default="cape-coordinator", pattern=r"^[!-~]{1,48}$")
    hostname: str | None = Field(default=None, pattern=r"^[!-~]{1,255}$")
    # The structured-data id: NAME@PEN. 32473 is the enterprise number RFC 5612 sets
    # aside for documentation; an organisation with its own number puts it here.
    sd_id: str = Field(default="cape@32473", pattern=r"^[!#-<>-\\\^-~]{1,32}$")
    # UDP datagrams carry at most this many bytes; a longer message's text is cut (the
    # structured data, with the ids, is kept) and says so.
    max_datagram_bytes: int = Field(default=8192, ge=480, le=65000)
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _unix_path(self) -> SyslogSink:
        if self.transport == "unix" and not self.socket_path:
            raise ValueError("a unix syslog sink needs socket_path")
        return self


class WebhookSink(SinkBase):
    """JSON batches POSTed to ``url``, signed with HMAC-SHA256 over timestamp and body."""

    kind: Literal["webhook"]
    url: str = Field(pattern=r"^https?://")
    secret: SecretStr | None = None
    secret_env: str | None = None
    secret_file: str | None = None
    # May carry credentials (Authorization): kept out of reprs.
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # A CA bundle for an https URL signed by a private CA (else the system's CAs).
    ca_file: str | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookSink:
        given = [x for x in (self.secret, self.secret_env, self.secret_file) if x]
        if len(given) != 1:
            raise ValueError("a webhook sink needs exactly one of secret, secret_env, secret_file")
        return self

    @field_serializer("secret", when_used="json")
    def _hide(self, value: SecretStr | None, info: SerializationInfo) -> str | None:
        if value is None:
            return None
        context = info.context or {}
        return value.get_secret_value() if context.get("reveal") else str(value)

    def secret_bytes(self) -> bytes:
        """The HMAC key, read from where the settings say (errors never quote it)."""
        if self.secret is not None:
            raw = self.secret.get_secret_value()
        elif self.secret_env:
            raw = os.environ.get(self.secret_env, "")
            if not raw:
                raise CoordinatorSetupError(
                    f"webhook sink {self.name!r}: environment variable {self.secret_env} is empty"
                )
        else:
            try:
                raw = Path(str(self.secret_file)).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise CoordinatorSetupError(
                    f"webhook sink {self.name!r}: cannot read secret_file: {exc.strerror}"
                ) from None
        if len(raw.encode("utf-8")) < 16:
            raise CoordinatorSetupError(
                f"webhook sink {self.name!r}: the secret must be at least 16 bytes"
            )
        return raw.encode("utf-8")


class OtlpSink(SinkBase):
    """OpenTelemetry log records over OTLP/HTTP (protobuf), through the OpenTelemetry SDK."""

    kind: Literal["otlp"]
    # The logs endpoint, signal path included: http://collector:4318/v1/logs
    endpoint: str = Field(pattern=r"^https?://")
    # May carry credentials (Authorization): kept out of reprs.
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Resource attributes besides service.name.
    resource: dict[str, str] = Field(default_factory=dict)
    service_name: str = "cape-coordinator"
    # A CA bundle for an https endpoint signed by a private CA (else the system's CAs).
    ca_file: str | None = None


SinkConfig = Annotated[JsonlSink | SyslogSink | WebhookSink | OtlpSink, Field(discriminator="kind")]
_SINKS: TypeAdapter[list[Any]] = TypeAdapter(list[SinkConfig])


def parse_sinks(text: str, source: str, *, yaml_ok: bool) -> list[Any]:
    """Sinks from a JSON (or YAML) list; a bad one is a setup error naming ``source``, the
    entry and the field (never the value, which may be a secret)."""
    try:
        data = yaml.safe_load(text) if yaml_ok else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "YAML" if yaml_ok else "JSON"
        raise CoordinatorSetupError(f"{source} is not valid {kind}: {type(exc).__name__}") from None
    if not isinstance(data, list):
        raise CoordinatorSetupError(f"{source} must hold a list of sinks")
    try:
        return list(_SINKS.validate_python(data))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'sinks'}: "
            + ("unknown setting" if err["type"] == "extra_forbidden" else err["msg"])
            for err in exc.errors()
        )
        raise CoordinatorSetupError(f"invalid {source}: {problems}") from None
