"""Where the coordinator keeps its state, and its settings.

``--db`` is a SQLite file path (the default deployment) or any SQLAlchemy URL
(``postgresql+psycopg://...`` for a shared one). Beside a SQLite file ``cape.db``
live ``cape.db.key`` (the master key, mode 0600) and ``cape.db.config.json``
(these settings); with a URL both paths are given explicitly (``--key-file``,
``--config``) or the master key comes from ``CAPE_COORDINATOR_MASTER_KEY``.
Audit sinks (:mod:`cape_coordinator.sinks`) are configured in the settings
(``audit_sinks``), in a JSON or YAML file they name (``audit_sinks_file``) and in
the ``CAPE_COORDINATOR_AUDIT_SINKS`` environment variable (a JSON list); see
:func:`resolve_sinks` and ``docs/monitoring/sinks.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .crypto import CoordinatorSetupError
from .services.orchestrator_apis import Endpoint
from .sinks.config import SinkConfig, parse_sinks


class Settings(BaseModel):
    """Run-time settings, written by ``init`` and overridable by ``serve`` flags.

    A pydantic model: types and ranges are checked when the config file is loaded
    (and on assignment), and an unknown name is refused, so a typo in the file is
    an error naming the setting rather than a silent default. ``sqlite_synchronous``
    is checked when a database is opened (its error names the allowed values)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    audit_jsonl: str | None = None
    audit_stdout: bool = False
    lost_after_seconds: int = Field(default=3600, ge=1)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_batch_records: int = Field(default=1000, ge=1, le=100_000)
    # FULL: an acknowledged audit record survives power loss; NORMAL trades that for speed.
    sqlite_synchronous: str = "FULL"
    # Console sessions end after this long without a request, and this long in all.
    console_idle_seconds: int = Field(default=30 * 60, ge=60)
    console_absolute_seconds: int = Field(default=12 * 3600, ge=60)
    # /docs, /redoc and /openapi.json: off unless asked for (they map the whole API).
    api_docs: bool = False
    # Where the audit trail is copied to besides the database (docs/monitoring/sinks.md).
    audit_sinks: list[SinkConfig] = Field(default_factory=list)
    audit_sinks_file: str | None = None
    # GET /metrics: the SHA-256 (hex) of the metrics bearer token (the token itself is
    # never stored; CAPE_COORDINATOR_METRICS_TOKEN may give it instead), and/or HOST:PORT of
    # a separate listener serving /metrics alone. Neither set: /metrics answers 404.
    metrics_token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    metrics_bind: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")
    # Spark, YARN and Airflow endpoints polled for the runs' jobs (docs/orchestrators.md).
    orchestrators: list[Endpoint] = Field(default_factory=list, max_length=100)

    @field_validator("orchestrators")
    @classmethod
    def _unique_endpoints(cls, value: list[Endpoint]) -> list[Endpoint]:
        names = [ep.name for ep in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"endpoint names must be unique: {', '.join(twice)}")
        return value

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Validated settings from a mapping; a bad or unknown one is a setup error naming it."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: "
                + ("unknown setting" if err["type"] == "extra_forbidden" else err["msg"])
                for err in exc.errors()
            )
            raise CoordinatorSetupError(f"invalid config: {problems}") from None


@dataclass
class Paths:
    """The database URL and the files beside it."""

    url: str
    key_file: Path | None
    config_file: Path | None
    sqlite_file: Path | None = field(default=None)

    @classmethod
    def resolve(cls, db: str, key_file: str | None = None, config_file: str | None = None) -> Paths:
        """Paths for ``--db`` (a file or a URL) and optional explicit key/config files."""
        if "://" in db:
            return cls(
                url=db,
                key_file=Path(key_file) if key_file else None,
                config_file=Path(config_file) if config_file else None,
                sqlite_file=Path(db.split(":///", 1)[1]) if db.startswith("sqlite:///") else None,
            )
        path = Path(db).expanduser().resolve()
        return cls(
            url=f"sqlite:///{path}",
            key_file=Path(key_file) if key_file else path.with_name(path.name + ".key"),
            config_file=(
                Path(config_file) if config_file else path.with_name(path.name + ".config.json")
            ),
            sqlite_file=path,
        )


def load_settings(path: Path | None) -> Settings:
    """Settings from the config file, or the defaults when there is none."""
    if path is None or not path.exists():
        return Settings()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CoordinatorSetupError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CoordinatorSetupError(f"config {path} must hold a JSON object")
    return Settings.from_dict(data)


def save_settings(path: Path, settings: Settings) -> None:
    """Write the config file (mode 0600: it names file paths of the deployment, and a
    webhook sink may hold its secret inline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(
            settings.model_dump(mode="json", context={"reveal": True}), fh, indent=2, sort_keys=True
        )
        fh.write("\n")


SINKS_ENV = "CAPE_COORDINATOR_AUDIT_SINKS"
SINKS_FILE_ENV = "CAPE_COORDINATOR_AUDIT_SINKS_FILE"


def resolve_sinks(settings: Settings, environ: Mapping[str, str] | None = None) -> list[SinkConfig]:
    """Every configured audit sink: the settings' ``audit_sinks``, then those of the file
    ``audit_sinks_file`` (or ``$CAPE_COORDINATOR_AUDIT_SINKS_FILE``) names, then those of
    ``$CAPE_COORDINATOR_AUDIT_SINKS``. Names must be unique across all three; an invalid
    entry is a setup error naming where it came from and which field is wrong."""
    env = os.environ if environ is None else environ
    sinks = list(settings.audit_sinks)
    sources = ["config"] * len(sinks)
    file_name = settings.audit_sinks_file or env.get(SINKS_FILE_ENV)
    if file_name:
        path = Path(file_name)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CoordinatorSetupError(
                f"cannot read audit sinks file {path}: {exc.strerror}"
            ) from None
        found = parse_sinks(
            text, f"audit sinks file {path}", yaml_ok=path.suffix in (".yaml", ".yml")
        )
        sinks += found
        sources += [str(path)] * len(found)
    if env.get(SINKS_ENV):
        found = parse_sinks(env[SINKS_ENV], f"${SINKS_ENV}", yaml_ok=False)
        sinks += found
        sources += [f"${SINKS_ENV}"] * len(found)
    seen: dict[str, str] = {}
    for sink, source in zip(sinks, sources, strict=True):
        if sink.name in seen:
            raise CoordinatorSetupError(
                f"audit sink name {sink.name!r} is used twice ({seen[sink.name]} and {source})"
            )
        seen[sink.name] = source
    return sinks
