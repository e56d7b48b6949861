"""The HTTP API's request and response models (pydantic), shared by the routers.

Request models forbid unknown fields and bound every size; response models are
what the OpenAPI spec documents.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import db

MAX_INT = 2**63 - 1
IdText = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
PlainText = r"^[^\x00-\x1f\x7f]*$"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error response."""

    error: ErrorDetail


class WhoAmI(BaseModel):
    token_id: str
    name: str
    role: str
    labels: list[str]


class SigningKey(BaseModel):
    algorithm: Literal["Ed25519"] = "Ed25519"
    public_key: str = Field(description="raw 32-byte public key, URL-safe base64 without padding")


class TokenCreate(_In):
    name: str = Field(min_length=1, max_length=128, pattern=PlainText)
    role: Literal["admin", "author", "reviewer", "pipeline", "auditor", "requester"]
    labels: list[Annotated[str, Field(max_length=128, pattern=PlainText)]] = Field(
        default_factory=list, max_length=100
    )
    expires_in: int | None = Field(default=None, ge=1, le=10 * 365 * 86400, description="seconds")


class WorkerTokenCreate(_In):
    expires_in: int = Field(
        default=3600, ge=1, le=24 * 3600, description="seconds (never past the pipeline token)"
    )


class TokenInfo(BaseModel):
    id: str
    name: str
    role: str
    labels: list[str]
    created_at: str
    created_by: str
    expires_at: str | None
    revoked_at: str | None


class TokenCreated(TokenInfo):
    token: str = Field(description="the bearer token; shown once, stored only hashed")


class PolicyPush(_In):
    document: dict[str, Any] = Field(description="the policy document (POLICY.md) as JSON")


class PolicyInfo(BaseModel):
    label: str
    version: int
    state: Literal["draft", "in_review", "returned", "rejected", "active", "superseded"]
    sha256: str
    author: str
    created_at: str
    submitted_at: str | None
    reviewed_by: str | None
    reviewed_at: str | None
    reason: str | None
    activated_at: str | None


class PolicyVersion(PolicyInfo):
    document: dict[str, Any]


class LabelInfo(BaseModel):
    label: str
    latest: int
    active: int | None


class Reject(_In):
    reason: str = Field(min_length=1, max_length=2000)


class PolicyDiff(BaseModel):
    label: str
    from_version: int
    to_version: int
    diff: str


class KeyCreate(_In):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    labels: list[Annotated[str, Field(max_length=128, pattern=PlainText)]] = Field(
        min_length=1, max_length=100
    )


class KeyVersionInfo(BaseModel):
    version: int
    created_at: str


class KeyInfo(BaseModel):
    name: str
    labels: list[str]
    current: int
    versions: list[KeyVersionInfo]


class KeyMaterial(BaseModel):
    current: int
    versions: dict[str, str] = Field(description="version -> key bytes, URL-safe base64")


class LabelKeys(BaseModel):
    label: str
    keys: dict[str, KeyMaterial]


class PolicyRef(BaseModel):
    model_config = ConfigDict(extra="allow")

    label: str | None = Field(default=None, max_length=128)
    version: int | None = Field(default=None, ge=0, le=MAX_INT)
    sha256: str | None = Field(default=None, max_length=128)


class RunRecord(BaseModel):
    """One run record (cape_pipelines.audit); fields beyond these are kept as sent."""

    model_config = ConfigDict(extra="allow")

    record_id: IdText
    run_id: IdText
    event: Literal["run.started", "policy.fetched", "run.completed", "run.failed"]
    time: str = Field(max_length=64, description="RFC 3339")
    engine: str | None = Field(default=None, max_length=64)
    engine_version: str | None = Field(default=None, max_length=64)
    principal: str | None = Field(default=None, max_length=128)
    policy: PolicyRef | None = None
    rows_in: int | None = Field(default=None, ge=0, le=MAX_INT)
    rows_out: int | None = Field(default=None, ge=0, le=MAX_INT)
    rows_redacted: int | None = Field(default=None, ge=-MAX_INT, le=MAX_INT)

    @field_validator("time")
    @classmethod
    def _rfc3339(cls, value: str) -> str:
        try:
            moment = db.parse_time(value)
        except ValueError:
            raise ValueError("time must be RFC 3339") from None
        if not 1 <= moment.year <= 9998:
            raise ValueError("time is out of range")
        return value


class AuditBatch(_In):
    records: list[RunRecord] = Field(min_length=1, max_length=1000)


class AuditAccepted(BaseModel):
    accepted: int
    duplicates: int


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    seq: int
    prev_hash: str
    hash: str
    kind: str
    source: str
    received_at: str
    record: dict[str, Any]


class AuditAnchor(BaseModel):
    count: int = Field(description="entries in the chain")
    hash: str = Field(description="the last entry's hash")
    signature: str = Field(
        description="Ed25519 over b'cape-audit-anchor\\x00' + f'{count}:{hash}', base64url"
    )


class VerifyOut(BaseModel):
    intact: bool
    count: int
    last_hash: str
    problems: list[str]


class RunApp(BaseModel):
    """An orchestrator application a run is linked to (docs/orchestrators.md)."""

    endpoint: str
    kind: str
    app_id: str
    name: str | None
    state: str
    ended: bool
    final_status: str | None
    started_at: str | None
    ended_at: str | None
    duration_ms: int | None
    executors: int | None
    cores: int | None
    summary: str


class RunInfo(BaseModel):
    run_id: str
    status: Literal["running", "succeeded", "failed", "lost"]
    engine: str | None
    engine_version: str | None
    label: str | None
    version: int | None
    principal: str | None
    started_at: str | None
    ended_at: str | None
    last_seen: str
    rows_in: int | None
    rows_out: int | None
    rows_redacted: int | None
    error_type: str | None
    records: int
    client_started_at: str | None = Field(
        default=None, description="the pipeline's own start time (started_at is the receipt)"
    )
    client_ended_at: str | None = None
    orchestrator: list[RunApp] = Field(
        default_factory=list, description="the orchestrator applications linked to the run"
    )
    running_on: str | None = Field(
        default=None, description='e.g. "running on Spark app X (RUNNING, 2m 03s, 2 executors)"'
    )
