"""``ApplyPolicy``: a composite Beam PTransform applying a privacy policy to a PCollection.

The policy is bound to the input's Arrow schema (and every key resolved) when
the transform is applied to its PCollection, on the machine that builds the
pipeline: a missing column or key fails there, not in a worker hours later.
``expand`` only wires labelled stages; the data work is one DoFn calling the
core on Arrow batches, and the audit run is delimited by two small stages (see
``docs/engines/beam.md``).
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.internal import pickler
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadFromParquetBatched
from apache_beam.pvalue import AsList, AsSingleton, PCollection
from apache_beam.transforms.window import GlobalWindows
from typing_extensions import Unpack

from .._workers import beam_workers
from ..audit import AuditTarget, MemorySink, Sink, resolve_sink
from ..core import Counters
from ..errors import PlanError
from ..lineage import LineageError
from ..plan import Plan
from ..policy.load import PolicySource
from ..seam import Binding, BindOptions, RemoteRun, bind
from ..source import _OfflineSink
from . import coders
from .convert import arrow_schema_from_row_type, row_type_from_arrow_schema, row_type_of
from .dofns import (
    COUNTERS_TAG,
    ApplyPlanFn,
    FinishRunFn,
    MergeClassesFn,
    StartRunFn,
    SuppressFn,
    element_weight,
)

DEFAULT_BATCH_SIZE = 10_000

coders.register()


def _worker_sink(audit: AuditTarget) -> Sink:
    """The audit sink, checked to survive the trip to Beam's workers."""
    if isinstance(audit, MemorySink):
        raise TypeError(
            "MemorySink cannot audit a Beam pipeline: each worker gets its own copy of the "
            "sink, so the records never reach yours; pass a JSONL file path or a LoggingSink"
        )
    sink = resolve_sink(audit)
    try:
        pickler.dumps(sink)
    except Exception as exc:
        raise TypeError(
            f"the audit sink {sink!r} cannot be pickled ({type(exc).__name__}), and Beam must "
            "ship it to the workers; pass a JSONL file path or a LoggingSink"
        ) from None
    return sink


def _workers_audit(binding: Binding, options: BindOptions) -> AuditTarget:
    """Where Beam's workers send the run's records.

    By label (``client=``) with no ``audit=``, the client's own sink would ship
    its pipeline token, which can read the label's keys, inside every
    DoFn; the workers get a sink posting with an audit-writer token minted
    for this pipeline instead (it can post this label's records and nothing
    else). Any other target is shipped as given.
    """
    client = options.get("client")
    mint = getattr(client, "worker_audit_sink", None)
    if client is None or options.get("audit") is not None or not callable(mint):
        return binding.audit
    sink: Sink = mint(binding.policy.label)
    if isinstance(binding.audit, _OfflineSink):
        sink = _OfflineSink(sink)
    return sink


def _read_by_parquet_batched(pcoll: PCollection) -> bool:
    """Whether ``pcoll`` is the output of ``ReadFromParquetBatched``, which yields only
    ``pa.Table`` but declares ``Any``: the output of ApplyPolicy is then typed ``pa.Table``,
    so it gets the :class:`~cape_pipelines.beam.coders.ArrowCoder`."""
    applied = pcoll.producer
    while applied is not None:
        if isinstance(applied.transform, ReadFromParquetBatched):
            return True
        applied = applied.parent
    return False


class ApplyPolicy(beam.PTransform):
    """Apply a privacy policy to a PCollection of dicts, schema'd Beam Rows, or Arrow tables.

    Output elements have the input's form: dicts give dicts, Rows give Rows of
    a Row type derived from the plan's output schema, and ``pyarrow.Table`` /
    ``RecordBatch`` elements (as ``ReadFromParquetBatched`` yields) give tables,
    so a Parquet-to-Parquet pipeline runs no per-row Python. Rows removed by
    ``row-redact`` are not emitted.

    The input's Arrow schema comes from ``schema=``, or from the PCollection's
    Row type; for tables read from Parquet use :meth:`from_parquet_schema`.

    With ``client=`` (a ``coordinator_client.Client``), ``policy`` is a label:
    policy and keys come from the coordinator here, on the machine building the
    pipeline, and the workers send the run's records to it through a spool
    sink holding an audit-writer token minted for this pipeline (it can post
    the label's records and nothing else; the pipeline token never ships;
    see docs/keys.md).

    >>> import apache_beam as beam, pyarrow as pa
    >>> from cape_pipelines.beam import ApplyPolicy
    >>> policy = {"label": "demo", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
    >>> step = ApplyPolicy(policy, schema=pa.schema([("name", pa.string()), ("ssn", pa.string())]),
    ...                    audit="/tmp/cape-audit.jsonl")
    >>> step.output_schema.names
    ['name']
    """

    def __init__(
        self,
        policy: PolicySource | Binding,
        *,
        schema: pa.Schema | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        label: str | None = None,
        _carry_column: str | None = None,
        **options: Unpack[BindOptions],
    ):
        super().__init__(label)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        binding = bind(policy, engine="beam", **options)
        if binding.lineage is not None and binding.lineage.client is not None:
            # Beam's stages send the lineage events from the workers, which get a pickled
            # copy of the Lineage without its client: refuse rather than send elsewhere.
            raise LineageError(
                "lineage= on Beam takes True, a client config mapping or a Lineage with "
                "config=, not a Lineage with client=: the workers send the events and "
                "build their own client from the configuration"
            )
        self._policy = binding.policy
        sink = _worker_sink(_workers_audit(binding, options))
        self._audit = RemoteRun(binding, sink, binding.context().principal)
        # expand() knows the runner: the plan its DoFns carry is shipped with key
        # references for that runner's workers (Binding.ship). The transform itself is
        # not serialized into the pipeline (only its name is).
        self._binding: Binding | None = binding
        self._batch_size = batch_size
        # A column outside the policy, carried through unchanged; for the test
        # harness to restore input order, never a way round the policy.
        self._carry = _carry_column
        self._plan: Plan | None = None
        if schema is not None:
            self._plan = self._build(schema)

    def __repr__(self) -> str:
        return f"ApplyPolicy(policy={self._policy.label!r}, version={self._policy.version})"

    @classmethod
    def from_parquet_schema(cls, path: str, policy: PolicySource, **kwargs: Any) -> ApplyPolicy:
        """An ApplyPolicy bound to the schema of the Parquet file ``path`` (or a glob's first file).

        Any Beam filesystem works (local, ``gs://``, ``s3://``); only the file's
        footer is read.
        """
        matches = FileSystems.match([path])[0].metadata_list
        if not matches:
            raise FileNotFoundError(f"no Parquet file matches {path!r}")
        first = sorted(m.path for m in matches)[0]
        with FileSystems.open(first) as fh:
            schema = pq.read_schema(fh)
        return cls(policy, schema=schema, **kwargs)

    @property
    def plan(self) -> Plan:
        """The plan this step runs (known once a schema is; see ``output_schema``)."""
        if self._plan is None:
            raise PlanError(
                "the input schema is not known yet: pass schema= or apply the transform "
                "to a PCollection of Rows first"
            )
        return self._plan

    @property
    def output_schema(self) -> pa.Schema:
        """The Arrow schema of the output (e.g. for ``WriteToParquetBatched``)."""
        schema = self.plan.output_schema
        if self._carry is not None:
            schema = schema.append(pa.field(self._carry, pa.int64()))
        return schema

    def _build(self, schema: pa.Schema) -> Plan:
        if self._binding is None or self._plan is not None:
            raise PlanError("ApplyPolicy's plan was already built")
        return self._binding.build(schema)

    def _shipped(self, plan: Plan, pcoll: PCollection) -> Plan:
        """``plan`` with key references for the workers of ``pcoll``'s runner."""
        assert self._binding is not None
        return self._binding.ship(plan, beam_workers(pcoll.pipeline))

    def _bind(self, pcoll: PCollection) -> tuple[Plan, Any]:
        """The plan for ``pcoll`` and its output element type."""
        element_type = pcoll.element_type
        row_type = row_type_of(element_type)
        if self._plan is None:
            if row_type is None:
                raise PlanError(
                    f"ApplyPolicy needs the input's Arrow schema and cannot infer it from "
                    f"element type {element_type}: pass schema=pyarrow.schema(...), use "
                    "ApplyPolicy.from_parquet_schema(path, policy) for ReadFromParquetBatched "
                    "input, or give the PCollection a Row type"
                )
            self._plan = self._build(arrow_schema_from_row_type(row_type))
        plan = self._plan
        if row_type is not None:
            named = [n for n, _ in row_type._fields]
            missing = [c for c in plan.input_schema.names if c not in named]
            if missing:
                raise PlanError(
                    f"the PCollection's Row type has no field(s) {', '.join(map(repr, missing))} "
                    f"(fields: {', '.join(named)})"
                )
            # A field outside the schema= the plan was checked on would vanish
            # from the output unnoticed; refuse it instead.
            extra = [n for n in named if n not in plan.input_schema.names]
            if extra:
                raise PlanError(
                    f"the PCollection's Row type has field(s) {', '.join(map(repr, extra))} that "
                    f"are not in the schema ApplyPolicy was built with "
                    f"({', '.join(plan.input_schema.names)})"
                )
            return plan, row_type_from_arrow_schema(plan.output_schema)
        if element_type in (pa.Table, pa.RecordBatch):
            return plan, element_type
        if _read_by_parquet_batched(pcoll):
            return plan, pa.Table
        return plan, Any

    def expand(self, pcoll: PCollection) -> PCollection:
        plan, output_type = self._bind(pcoll)
        plan = self._shipped(plan, pcoll)
        audit = self._audit
        run_id = (
            pcoll.pipeline
            | "Impulse" >> beam.Impulse()
            | "StartRun" >> beam.ParDo(StartRunFn(audit)).with_output_types(str)
        )
        batches = pcoll
        if output_type not in (pa.Table, pa.RecordBatch):
            # Tables known as such skip this step; it batches dicts and Rows (a
            # table in an untyped PCollection becomes a batch of its own).
            batches = pcoll | "Batch" >> beam.BatchElements(
                min_batch_size=self._batch_size,
                max_batch_size=self._batch_size,
                element_size_fn=element_weight,
                record_metrics=False,
            )
        results = batches | "Apply" >> beam.ParDo(
            ApplyPlanFn(plan, audit, self._carry), AsSingleton(run_id)
        ).with_output_types(output_type).with_outputs(COUNTERS_TAG, main="data")
        counts = results[COUNTERS_TAG]
        if not isinstance(counts.windowing.windowfn, GlobalWindows):
            counts = counts | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
        empty = Counters.empty_for(plan).to_dict()
        data = results.data
        side = [AsList(counts)]
        if plan.risk is not None and plan.risk.suppress:
            # The global class counts, complete before SuppressFn sees any row (a singleton).
            classes = counts | "RiskClasses" >> beam.CombineGlobally(MergeClassesFn(plan))
            suppressed = data | "Suppress" >> beam.ParDo(
                SuppressFn(plan), AsSingleton(classes)
            ).with_output_types(output_type).with_outputs(COUNTERS_TAG, main="data")
            removed = suppressed[COUNTERS_TAG]
            if not isinstance(removed.windowing.windowfn, GlobalWindows):
                removed = removed | "RemovedGlobalWindow" >> beam.WindowInto(GlobalWindows())
            side.append(AsList(removed))
            data = suppressed.data
        _ = run_id | "FinishRun" >> beam.ParDo(FinishRunFn(audit, empty, plan), *side)
        return data


__all__ = ["DEFAULT_BATCH_SIZE", "ApplyPolicy"]
