"""The one seam between the core and every engine: bind a policy, then run it as one audited run.

Every entry point (pandas, ``cape apply``, Beam, Dask, Spark) does the same
two things and nothing else about policies, keys or audit records:

1. :func:`bind` resolves the policy (a document, a file, or a label on a
   coordinator), the key resolver and the audit target once, on the driver.
   :meth:`Binding.plan` then builds the :class:`~cape_pipelines.plan.Plan` for
   the engine's schema; a plan that cannot be built is recorded as a failed
   run (``run.started``, ``run.failed``) and the error re-raised.
2. :meth:`Binding.run` opens a :class:`Run`, used as a context manager:
   entering emits ``run.started`` (and ``policy.fetched`` for a policy from a
   coordinator); leaving emits ``run.completed`` with the merged
   :class:`~cape_pipelines.core.Counters`, or ``run.failed`` with the error,
   whatever it was (KeyboardInterrupt included), and lets it propagate.

The seam is the only place that catches ``BaseException`` for audit: adapters
write no audit records by hand. Adapters whose result is lazy (Dask, Spark)
remember which binding and plan made a frame with :class:`Tracked`, keyed by
the frame object itself. Beam cannot hold driver state at run time, so its
stages carry a :class:`RemoteRun`, whose records the workers emit (see
docs/architecture.md).

Keys: the binding owns the resolver, and the plan holds the resolved bytes
on the driver. A plan built for an engine's workers (``workers=`` given to
:meth:`Binding.plan`) ships key *references* by default, never key material:
each key goes by a provider matching where the driver found it (see
:meth:`Binding.ship` and docs/keys.md); ``worker_keys="inline"`` is the
explicit opt-in to ship the bytes, for quick local runs.

Lineage: a binding with ``lineage=`` sends an OpenLineage event as each :class:`Run`
starts and ends (see :mod:`cape_pipelines.lineage`).
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Generic, Literal, TypedDict, TypeVar

import pyarrow as pa
from typing_extensions import Unpack

from .audit import AuditTarget, NullSink, RunContext, Sink, error_info
from .core import Counters
from .keys import (
    INLINE,
    KeyRef,
    KeyResolver,
    KeyShippingError,
    RunSecrets,
    WorkerKeyProvider,
    Workers,
    reference_for,
    shipping_fix,
)
from .lineage import Lineage, LineageOption, RemoteRunInfo, lineage_option
from .orchestrator import started_fields
from .plan import ColumnStep, Plan, build_plan
from .policy.load import PolicySource
from .policy.models import Policy
from .source import CoordinatorClient, resolve_policy
from .transforms.base import seed_key

log = logging.getLogger(__name__)


class DerivedKeys(WorkerKeyProvider):
    """A perturbation's key derived again from its ``seed`` (public: the seed is in the policy)."""

    def __repr__(self) -> str:
        return "DerivedKeys()"

    def identity(self) -> str:
        return "seed"

    def describe(self) -> str:
        return "derived from the policy's seed"

    def fetch(self, name: str) -> bytes | None:
        return seed_key(int(name))


WorkerKeysSetting = WorkerKeyProvider | Literal["inline"] | None
"""``worker_keys=``: None (the default: references chosen per key), ``"inline"`` (ship the
bytes: the opt-in for quick local runs), or one provider for every named key."""


@dataclass
class Binding:
    """A policy resolved for one job: where its keys come from and where its records go.

    ``source`` is set for a policy fetched from a coordinator (the run's
    ``policy.fetched`` record says it); ``engine`` names the engine in records.
    """

    policy: Policy
    resolver: KeyResolver
    audit: AuditTarget
    engine: str
    column_tags: Mapping[str, Sequence[str]] = field(default_factory=dict)
    source: str | None = None
    # None: plans for workers ship a reference per key (see ship); "inline": the bytes
    # (opt-in); a provider: that provider for every named key.
    worker_keys: WorkerKeysSetting = None
    # Set: each run also sends OpenLineage START and COMPLETE/FAIL events (never fails it).
    lineage: Lineage | None = None
    # False: plans leave the policy's risk: section out (the job measures it itself).
    measure_risk: bool = True
    # Providers made once per binding (a coordinator's worker token, minted once per run).
    _minted: dict[str, WorkerKeyProvider] = field(default_factory=dict, repr=False)
    _run_secrets: list[RunSecrets] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return (
            f"Binding(policy={self.policy.label!r}, version={self.policy.version}, "
            f"engine={self.engine!r})"
        )

    def build(self, schema: pa.Schema, *, workers: Workers | None = None) -> Plan:
        """The plan for ``schema``, with nothing recorded if it cannot be built.

        Keys are resolved here either way (a missing key fails now, on the
        driver). With ``workers`` (the plan is shipped to an engine's worker
        processes) it then carries references instead of key bytes
        (:meth:`ship`).
        """
        plan = build_plan(self.policy, schema, resolver=self.resolver, column_tags=self.column_tags)
        if not self.measure_risk:
            plan.risk = None
        return plan if workers is None else self.ship(plan, workers)

    def ship(self, plan: Plan, workers: Workers) -> Plan:
        """``plan`` as it may be shipped to ``workers``: key references, never key bytes.

        Per key, by where the driver found it: a mounted secret directory ->
        :class:`~cape_pipelines.keys.SecretFileKeys`; a coordinator ->
        :class:`~cape_pipelines.keys.CoordinatorKeys` with a worker token minted
        for this run (that label's keys only, read-only, expiring); a seed ->
        derived again on the worker. On remote workers a key from the
        environment -> :class:`~cape_pipelines.keys.EnvKeys` (each worker
        needs ``CAPE_KEY_<NAME>``). Keys that exist only here (``keys=``
        bytes, inline in the policy, a run's random key), and environment keys
        on local workers (which may have started before the variable was set),
        go through a private per-run directory for local workers
        (:class:`~cape_pipelines.keys.RunSecrets`) and raise
        :class:`~cape_pipelines.keys.KeyShippingError` naming the fix for
        remote ones. ``worker_keys="inline"`` ships the bytes as they are.
        """
        if self.worker_keys == INLINE:
            if not workers.local:
                log.warning("worker_keys='inline': key bytes ship in the job to %s", workers.where)
            return plan
        explicit = self.worker_keys if isinstance(self.worker_keys, WorkerKeyProvider) else None
        refs: dict[str, tuple[WorkerKeyProvider, str]] = {}
        steps = list(plan.steps)
        for i, step in enumerate(steps):
            if not isinstance(step, ColumnStep) or step.key_id is None:
                continue
            ref = getattr(step.transform, "key", None)
            if step.key_id not in refs:
                refs[step.key_id] = self._reference(plan, step, ref, explicit, workers)
            if isinstance(ref, KeyRef) and ref.inline is not None:
                # The policy's own copy of an inline key would ship inside the step.
                hidden = KeyRef(secret=f"<inline key of {step.location}>")
                steps[i] = replace(
                    step, transform=step.transform.model_copy(update={"key": hidden})
                )
        if not refs:
            return plan
        return replace(plan, steps=steps, keys=plan.keys.referencing(refs))

    def _reference(
        self,
        plan: Plan,
        step: ColumnStep,
        ref: Any,
        explicit: WorkerKeyProvider | None,
        workers: Workers,
    ) -> tuple[WorkerKeyProvider, str]:
        """The (provider, name) workers resolve ``step``'s key through."""
        assert step.key_id is not None
        if isinstance(ref, KeyRef) and ref.secret is not None:
            name = ref.secret
            if explicit is not None:
                return explicit, name
            origin = self.resolver.origins.get(name, "explicit")
            if origin == "env" and workers.local:
                origin = "explicit"
            try:
                provider = reference_for(origin, self.resolver, self._minted)
            except Exception as exc:
                if not workers.local:
                    raise KeyShippingError(
                        f"{step.location}: key {name!r} for workers at {workers.where}: "
                        f"cannot get a worker provider from {origin[len('provider:') :]} "
                        f"({type(exc).__name__}: {exc})"
                    ) from None
                log.warning(
                    "no worker provider from %s (%s); local workers get key %r through the "
                    "run's private key directory",
                    origin,
                    type(exc).__name__,
                    name,
                )
                provider = None
            if provider is not None:
                return provider, name
            kind, what = "explicit", f"key {name!r} (given to this process as bytes)"
        elif ref is None and getattr(step.transform, "seed", None) is not None:
            return DerivedKeys(), str(step.transform.seed)  # type: ignore[attr-defined]
        elif isinstance(ref, KeyRef):
            kind, what = "inline", "the key written inline in the policy"
        else:
            kind, what = "run", "the run's random key (a perturbation with neither seed nor key)"
        if not workers.local:
            raise KeyShippingError(
                f"{step.location}: {what} exists only in this process, and {workers.engine}'s "
                f"workers at {workers.where} are not on this host: {shipping_fix(kind)}; or pass "
                "worker_keys='inline' (cape apply --inline-keys) to ship the key bytes in the "
                "job, which anyone who can read the job can then read"
            )
        if not self._run_secrets:
            self._run_secrets.append(RunSecrets())
        secrets = self._run_secrets[0]
        return secrets, secrets.add(plan.keys[step.key_id])

    def close_run_secrets(self) -> None:
        """Remove this binding's per-run key directory now (its workers are done)."""
        for secrets in self._run_secrets:
            secrets.close()
        self._run_secrets.clear()

    def plan(
        self,
        schema: pa.Schema | Callable[[], pa.Schema],
        *,
        run_id: str | None = None,
        workers: Workers | None = None,
    ) -> Plan:
        """The plan for ``schema`` (or for the schema a callable reads); a failure is a run.

        An error here (a missing column or key, a type a transformation
        cannot take, an unreadable input) emits ``run.started`` and
        ``run.failed`` before it propagates, so a job that never started is
        still on the audit trail.
        """
        try:
            return self.build(schema() if callable(schema) else schema, workers=workers)
        except BaseException as exc:
            self.run(run_id=run_id).record_failure(exc)
            raise

    def run(
        self,
        plan: Plan | None = None,
        *,
        run_id: str | None = None,
        counters: Counters | None = None,
    ) -> Run:
        """A new :class:`Run` of this binding (of ``plan``, once it is known)."""
        return Run(self, plan, run_id=run_id, counters=counters)

    def silent(self) -> Binding:
        """This binding with its records switched off: for an engine's adapter run inside a
        job that records the run itself (``cape apply --engine dask``), which also measures
        the policy's ``risk:`` section itself, over everything the engine produced."""
        return replace(self, audit=NullSink(), source=None, lineage=None, measure_risk=False)

    def context(self, *, run_id: str | None = None, principal: str | None = None) -> RunContext:
        """The record builder for one run of this binding (the policy named in every record)."""
        ctx = RunContext(engine=self.engine, sink=self.audit, run_id=run_id, principal=principal)
        ctx.set_policy(self.policy.label, self.policy.version, self.policy.sha256)
        return ctx


class BindOptions(TypedDict, total=False):
    """The keyword arguments every entry point takes, passed on to :func:`bind`.

    ``keys``: key bytes (or hex / ``base64:...`` text) by name, before
    ``CAPE_KEY_<NAME>`` and any coordinator; ``audit``: a :class:`Sink`, a
    JSONL path, or None (``CAPE_AUDIT_FILE``, else the logger);
    ``column_tags``: column -> tags, for rules that match by tag;
    ``resolver``: a ready :class:`~cape_pipelines.keys.KeyResolver`;
    ``client``: a ``coordinator_client.Client`` (``policy`` is then a label);
    ``worker_keys``: how plans shipped to workers carry keys: None (default:
    a reference per key, see :meth:`Binding.ship`), ``"inline"`` (the bytes;
    the opt-in for quick local runs) or one worker-side provider for every
    named key; ``lineage``: OpenLineage run events (True, a client config mapping or a
    :class:`~cape_pipelines.lineage.Lineage`).
    """

    keys: Mapping[str, bytes | str] | None
    audit: AuditTarget
    column_tags: Mapping[str, Sequence[str]] | None
    resolver: KeyResolver | None
    client: CoordinatorClient | None
    worker_keys: WorkerKeysSetting
    lineage: LineageOption


def bind(
    policy: PolicySource | Binding,
    *,
    engine: str,
    source: str | None = None,
    record_failure: bool = False,
    run_id: str | None = None,
    **options: Unpack[BindOptions],
) -> Binding:
    """Resolve ``policy`` for one job on ``engine`` (see :mod:`cape_pipelines.source`).

    With ``client=``, ``policy`` is a label on the coordinator: the signed
    active version, keys through the coordinator, records to its spool.
    ``source`` names where a policy given directly came from, for jobs that
    record ``policy.fetched`` for every policy (``cape apply``). With
    ``record_failure``, a policy that does not resolve is itself a failed run
    (``run.started``, ``run.failed``, under ``run_id``); with ``client=`` its records
    name the label that was asked for (a coordinator takes no record without one).

    A :class:`Binding` given as ``policy`` is used as it is (an engine run
    inside a job that bound the policy already); it takes no other options.
    """
    if isinstance(policy, Binding):
        if options:
            raise TypeError(f"a Binding takes no other options ({', '.join(sorted(options))})")
        return policy
    keys = options.get("keys")
    audit = options.get("audit")
    setting = options.get("worker_keys")
    if not (setting is None or setting == INLINE or isinstance(setting, WorkerKeyProvider)):
        raise TypeError(
            "worker_keys must be None (key references, the default), 'inline' (ship key "
            f"bytes), or a worker key provider, not {setting!r}"
        )
    try:
        src = resolve_policy(
            policy,
            client=options.get("client"),
            keys=keys,
            resolver=options.get("resolver"),
            audit=audit,
        )
    except BaseException as exc:
        if record_failure:
            ctx = RunContext(engine=engine, sink=audit, run_id=run_id)
            if options.get("client") is not None and isinstance(policy, str):
                # The label asked for is known even though no version of it resolved.
                ctx.policy = {"label": policy}
            ctx.started()
            ctx.failed(exc)
        raise
    return Binding(
        policy=src.policy,
        resolver=src.resolver or KeyResolver(keys),
        audit=src.audit,
        engine=engine,
        column_tags=dict(options.get("column_tags") or {}),
        source=src.source if src.source is not None else source,
        worker_keys=options.get("worker_keys"),
        lineage=lineage_option(options.get("lineage")),
    )


def key_names(plan: Plan) -> dict[str, str]:
    """Key id -> key name for every step whose key is a named secret (``{secret: NAME}``)."""
    names: dict[str, str] = {}
    for step in plan.steps:
        if isinstance(step, ColumnStep) and step.key_id is not None:
            ref = getattr(step.transform, "key", None)
            if isinstance(ref, KeyRef) and ref.secret is not None:
                names[step.key_id] = ref.secret
    return names


class Run:
    """One audited run of a binding, as a context manager.

    ``with binding.run(plan) as run:`` emits ``run.started`` (and
    ``policy.fetched``) on entry. Inside, the engine adds each produced
    batch's counts with :meth:`add` (or sets :attr:`counters` to totals it
    measured). On a clean exit ``run.completed`` carries the merged counters;
    on any exception ``run.failed`` carries the error and the counts so far,
    if any, and the exception propagates.
    """

    def __init__(
        self,
        binding: Binding,
        plan: Plan | None = None,
        *,
        run_id: str | None = None,
        counters: Counters | None = None,
        principal: str | None = None,
    ):
        self.binding = binding
        self.plan = plan
        self.context = binding.context(run_id=run_id, principal=principal)
        self.counters: Counters | None = counters

    def __repr__(self) -> str:
        return f"Run(run_id={self.run_id!r}, binding={self.binding!r})"

    @property
    def run_id(self) -> str:
        """This run's id (in every record, and in a Parquet output's metadata)."""
        return self.context.run_id

    def add(self, counters: Counters) -> None:
        """Merge one batch's (or partition's) counters into the run's totals."""
        if self.counters is None:
            self.counters = Counters.empty_for(self.plan) if self.plan is not None else Counters()
        self.counters.merge(counters)

    def record_failure(self, exc: BaseException) -> None:
        """Record a run that failed before it could start its work: started, then failed."""
        self.__enter__()
        self.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> Run:
        self.context.emit("run.started", **started_fields())
        if self.binding.source is not None:
            self.context.policy_fetched(self.binding.source)
        if self.binding.lineage is not None:
            self.binding.lineage.started(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.context.failed(exc, self.counters)
            self._lineage_finished(exc)
            return
        if self.counters is None:
            self.counters = Counters.empty_for(self.plan) if self.plan is not None else Counters()
        self.context.completed(self.counters)
        self._lineage_finished(None)

    def _lineage_finished(self, exc: BaseException | None) -> None:
        # After the audit record: lineage is a side channel and never fails the run.
        if self.binding.lineage is not None:
            self.binding.lineage.finished(self, exc)


# Record ids derived from the run id make a record emitted twice (a retried
# bundle) the same record, which the coordinator stores once.
_RECORD_NAMESPACE = uuid.UUID("4f1e0c52-7d3b-4d0e-9a57-5a7c2b8e1d10")


def record_id(run_id: str, event: str) -> str:
    """The deterministic id of ``event``'s record in run ``run_id`` (for :class:`RemoteRun`)."""
    return str(uuid.uuid5(_RECORD_NAMESPACE, f"{run_id}/{event}"))


class RemoteRun:
    """A run whose records are written by workers: for engines with no driver at run time.

    Beam holds no driver state while a pipeline runs, so its run is delimited
    by pipeline stages; they carry this object (picklable: the sink, the
    policy's identity, the principal, where the policy came from, never a key)
    and call :meth:`started`, :meth:`completed` or :meth:`failed` with the run
    id the first stage made. Record ids are derived from the run id, so a
    record emitted twice by a retried bundle is one record.

    With ``lineage=``, each of those stages also sends the run's OpenLineage event
    (START, COMPLETE, FAIL) from the worker, after its audit record; the
    :class:`~cape_pipelines.lineage.Lineage` travels with this object (its configuration,
    never a client object).
    """

    def __init__(self, binding: Binding, sink: Sink, principal: str):
        self.engine = binding.engine
        self.sink = sink
        self.label = binding.policy.label
        self.version = binding.policy.version
        self.sha256 = binding.policy.sha256
        self.principal = principal
        self.source = binding.source
        # Read on the driver, where the job's orchestrator is visible; workers only carry it.
        self.orchestrator = started_fields()
        self.lineage = binding.lineage

    def __repr__(self) -> str:
        return f"RemoteRun(policy={self.label!r}, engine={self.engine!r})"

    def _context(self, run_id: str) -> RunContext:
        ctx = RunContext(
            engine=self.engine, sink=self.sink, principal=self.principal, run_id=run_id
        )
        ctx.set_policy(self.label, self.version, self.sha256)
        return ctx

    def started(self, run_id: str) -> None:
        """Emit ``run.started`` (and ``policy.fetched`` for a policy from a coordinator)."""
        ctx = self._context(run_id)
        ctx.emit("run.started", record_id=record_id(run_id, "run.started"), **self.orchestrator)
        if self.source is not None:
            ctx.emit(
                "policy.fetched",
                record_id=record_id(run_id, "policy.fetched"),
                source=self.source,
            )
        self._lineage(run_id, "START")

    def completed(
        self, run_id: str, counters: Counters, plan: Plan | None = None
    ) -> dict[str, Any]:
        """Emit ``run.completed`` with the run's merged counters; returns the record.
        ``plan``: the run's plan, for the schemas and column lineage of its lineage event."""
        ctx = self._context(run_id)
        record = ctx.emit(
            "run.completed", record_id=record_id(run_id, "run.completed"), **counters.to_dict()
        )
        self._lineage(run_id, "COMPLETE", plan=plan, counters=counters)
        return record

    def failed(self, run_id: str, exc: BaseException, plan: Plan | None = None) -> None:
        """Emit ``run.failed`` naming the error (never values or keys)."""
        ctx = self._context(run_id)
        ctx.emit("run.failed", record_id=record_id(run_id, "run.failed"), error=error_info(exc))
        self._lineage(run_id, "FAIL", exc, plan=plan)

    def _lineage(
        self,
        run_id: str,
        state: str,
        exc: BaseException | None = None,
        *,
        plan: Plan | None = None,
        counters: Counters | None = None,
    ) -> None:
        # After the audit record: lineage is a side channel and never fails the stage.
        if self.lineage is None:
            return
        info = RemoteRunInfo(
            run_id=run_id,
            engine=self.engine,
            label=self.label,
            version=self.version,
            sha256=self.sha256,
            plan=plan,
            counters=counters,
        )
        self.lineage.send_remote(info, state, exc)


T = TypeVar("T")


class Tracked(Generic[T]):
    """What a lazy adapter remembers about each result it returned, keyed by the object itself.

    An entry lives as long as the object does (a weak reference), so no frame
    is kept alive by being remembered, and nothing needs the object to be
    hashable. ``unknown`` is the error message for an object it never saw.
    """

    def __init__(self, unknown: str):
        self.unknown = unknown
        self._items: dict[int, tuple[weakref.ref[Any], T]] = {}

    def remember(self, obj: Any, value: T) -> None:
        """Attach ``value`` to ``obj`` until ``obj`` is garbage-collected."""
        key = id(obj)
        self._items[key] = (weakref.ref(obj), value)
        weakref.finalize(obj, self._items.pop, key, None)

    def get(self, obj: Any) -> T | None:
        """The value attached to ``obj``, or None."""
        found = self._items.get(id(obj))
        if found is None or found[0]() is not obj:
            return None
        return found[1]

    def __getitem__(self, obj: Any) -> T:
        value = self.get(obj)
        if value is None:
            raise TypeError(self.unknown)
        return value


__all__ = ["BindOptions", "Binding", "RemoteRun", "Run", "Tracked", "bind", "record_id"]
