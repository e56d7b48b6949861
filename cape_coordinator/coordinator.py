"""The coordinator assembled: one database, its keys unsealed in memory, and the services.

:class:`Coordinator` opens (or initialises) the database, upgrades its schema
through the migrations, unseals the signing key, and wires the services that
each do one job: :class:`~.services.tokens.TokenService` (tokens and
authentication), :class:`~.services.policies.PolicyService` (policies and
review), :class:`~.services.secrets.SecretService` (keys),
:class:`~.services.chain.AuditChain` (the hash chain every write extends),
:class:`~.services.ingest.AuditIngest` (run records, group commit),
:class:`~.services.runs.RunService` (the runs view),
:class:`~.services.workflow.WorkflowService` (requests, reviewers, approvals,
comments) and :class:`~.services.delivery.DeliveryService` (the audit sinks'
dispatchers). The HTTP routers and the offline CLI reach the services through it; its
few methods of its own are the set-up, the shutdown, and short forms the CLI and
tests use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from sqlalchemy import Engine, insert, inspect, select

from . import db, migrate
from .config import Paths, Settings, resolve_sinks, save_settings
from .crypto import (
    CoordinatorSetupError,
    MasterKey,
    b64d,
    b64e,
    create_master_key_file,
    load_master_key,
    new_signing_key,
    public_key_text,
    signing_key_from_raw,
)
from .services.base import Principal
from .services.catalog import CatalogService
from .services.chain import GENESIS, AuditChain, Copies, VerifyResult, anchor_message
from .services.delivery import DeliveryService
from .services.ingest import AuditIngest
from .services.orchestrators import OrchestratorService
from .services.policies import PolicyService
from .services.runs import RunService
from .services.secrets import SecretService
from .services.tokens import TokenService
from .services.workflow import WorkflowService

SCHEMA_VERSION = "1"


class Coordinator:
    """The coordinator's state behind one database, with its keys unsealed in memory."""

    def __init__(self, engine: Engine, master: MasterKey, settings: Settings):
        self.engine = engine
        self.settings = settings
        with engine.connect() as conn:
            values = dict(conn.execute(select(db.settings.c.name, db.settings.c.value)).all())
        if values.get("schema_version") != SCHEMA_VERSION or "signing_key" not in values:
            raise CoordinatorSetupError("database is not an initialised Cape coordinator")
        raw = master.open(b64d(values["signing_key"]), "signing-key:1")
        signer = signing_key_from_raw(raw)
        self.public_key = signer.public_key()
        self.public_key_text = public_key_text(self.public_key)
        self.chain = AuditChain(engine, signer, Copies(settings.audit_jsonl, settings.audit_stdout))
        self.tokens = TokenService(self.chain)
        self.policies = PolicyService(self.chain, signer)
        self.secrets = SecretService(self.chain, master)
        self.runs = RunService(engine, settings.lost_after_seconds)
        self.ingest = AuditIngest(self.chain, self.runs)
        self.workflow = WorkflowService(self.chain, self.policies)
        self.catalog = CatalogService(self.chain)
        self.orchestrators = OrchestratorService(engine, self.chain, list(settings.orchestrators))
        self.policies.review_gate = self._with_coverage(self.policies.review_gate)
        self.workflow.coverage = self.catalog.label_coverage
        # Audit sinks: their dispatchers start with the app (create_app's lifespan), and
        # every chain commit wakes them.
        self.delivery = DeliveryService(
            engine, resolve_sinks(settings), write_lock=self.chain.write_lock
        )
        self.chain.listeners.append(self.delivery.notify)

    def _with_coverage(self, gate: Any) -> Any:
        """The approval gate preceded by the catalog's coverage check (a refusal stores
        nothing: it raises inside the approving transaction)."""

        def gated(conn: Any, appended: list[dict[str, Any]], actor: Principal, row: Any) -> bool:
            self.catalog.coverage_gate(conn, row["label"], json.loads(row["document"]))
            return gate is None or bool(gate(conn, appended, actor, row))

        return gated

    def __repr__(self) -> str:
        return f"Coordinator({self.engine.url.render_as_string(hide_password=True)!r})"

    # ---- set-up -------------------------------------------------------------------------

    @classmethod
    def open(
        cls, paths: Paths, settings: Settings, *, upgrade: bool = False, **engine_kwargs: Any
    ) -> Coordinator:
        """Open an initialised coordinator database; with ``upgrade``, migrate its schema to
        the newest revision first, else refuse a database that is not at it."""
        if paths.sqlite_file is not None and not paths.sqlite_file.exists():
            raise CoordinatorSetupError(
                f"no coordinator database at {paths.sqlite_file}; run `cape coordinator init`"
            )
        master = load_master_key(paths.key_file)
        sync = str(settings.sqlite_synchronous).upper()
        if sync not in db.SYNCHRONOUS:
            raise CoordinatorSetupError(
                f"sqlite_synchronous must be one of {', '.join(db.SYNCHRONOUS)}"
            )
        engine = db.make_engine(paths.url, sqlite_synchronous=sync, **engine_kwargs)
        if not inspect(engine).has_table("settings"):
            raise CoordinatorSetupError("database is not an initialised Cape coordinator")
        if upgrade:
            migrate.upgrade(engine)
        else:
            have, want = migrate.current(engine), migrate.head()
            if have != want:
                engine.dispose()
                raise CoordinatorSetupError(
                    f"database schema is at revision {have}, this coordinator needs {want};"
                    " run `cape coordinator upgrade` (or `serve`, which upgrades)"
                )
        return cls(engine, master, settings)

    @classmethod
    def initialize(cls, paths: Paths, settings: Settings) -> tuple[Coordinator, str]:
        """Create the schema (migrations), master key, signing key and config; return the
        first admin token."""
        if paths.sqlite_file is not None:
            paths.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        engine = db.make_engine(paths.url)
        if inspect(engine).has_table("settings"):
            raise CoordinatorSetupError("database is already initialised; refusing to overwrite")
        if os.environ.get("CAPE_COORDINATOR_MASTER_KEY"):
            master = load_master_key(None)
        else:
            if paths.key_file is None:
                raise CoordinatorSetupError(
                    "a database URL needs --key-file or CAPE_COORDINATOR_MASTER_KEY"
                )
            master = MasterKey(create_master_key_file(paths.key_file))
        migrate.upgrade(engine)
        if paths.sqlite_file is not None:
            # Sealed secrets and the audit trail: nobody else needs to read the file.
            os.chmod(paths.sqlite_file, 0o600)
        signer, raw = new_signing_key()
        anchor = {
            "count": 0,
            "hash": GENESIS,
            "signature": b64e(signer.sign(anchor_message(0, GENESIS))),
        }
        with engine.begin() as conn:
            conn.execute(
                insert(db.settings),
                [
                    {"name": "schema_version", "value": SCHEMA_VERSION},
                    {"name": "signing_key", "value": b64e(master.seal(raw, "signing-key:1"))},
                    {"name": "public_key", "value": public_key_text(signer)},
                    {"name": "audit_anchor", "value": json.dumps(anchor)},
                ],
            )
        if paths.config_file is not None:
            save_settings(paths.config_file, settings)
        coord = cls(engine, master, settings)
        system = Principal(token_id="-", name="coordinator-init", role="admin")  # noqa: S106
        _, token = coord.create_token(system, name="admin", role="admin")
        return coord, token

    def close(self) -> None:
        """Stop the orchestrator poller, commit queued audit batches, stop the audit writer
        and the sinks' dispatchers, and release connections."""
        self.orchestrators.stop()
        self.ingest.close()
        self.delivery.stop()
        self.chain.checkpoint()
        self.engine.dispose()

    # ---- short forms (CLI, tests) ---------------------------------------------------------

    def create_token(
        self,
        actor: Principal,
        *,
        name: str,
        role: str,
        labels: Sequence[str] = (),
        expires_in: int | None = None,
    ) -> tuple[dict[str, Any], str]:
        """See :meth:`TokenService.create`."""
        return self.tokens.create(actor, name=name, role=role, labels=labels, expires_in=expires_in)

    def post_audit(self, actor: Principal, records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """See :meth:`AuditIngest.post`."""
        return self.ingest.post(actor, records)

    def submit_audit(
        self, actor: Principal, records: Sequence[Mapping[str, Any]]
    ) -> Future[dict[str, int]]:
        """See :meth:`AuditIngest.submit`."""
        return self.ingest.submit(actor, records)

    def list_audit(self, **filters: Any) -> list[dict[str, Any]]:
        """See :meth:`AuditIngest.list`."""
        return self.ingest.list(**filters)

    def audit_count(self) -> int:
        """How many entries the chain holds."""
        return self.chain.count()

    def verify_audit(self, expect: tuple[int, str] | None = None) -> VerifyResult:
        """Walk the whole chain; see :func:`~.services.chain.verify_chain`."""
        return self.chain.verify(self.public_key, expect)
