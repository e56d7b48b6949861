"""OpenLineage run events for Cape runs: what went in, what came out, and what the policy
did to each column.

A run started with ``lineage=`` (``cape apply --lineage``) sends a ``START`` event when
it starts and ``COMPLETE`` or ``FAIL`` when it ends, through the ``openlineage-python``
client (the ``lineage`` extra), configured the standard OpenLineage way: an
``openlineage.yml`` (``OPENLINEAGE_CONFIG``, the working directory, ``~/.openlineage``),
``OPENLINEAGE__TRANSPORT__*`` variables or ``OPENLINEAGE_URL``; or a client
configuration given directly (``lineage={"transport": {"type": "file", ...}}``).

The final event carries the input and output datasets with their schemas (Arrow types),
output row counts, and a column-lineage facet saying, for each output column, which
input column it came from and which transformations (tokenize, perturb, round, ...)
the policy applied to it under which label and version; row filters are dataset-level
``INDIRECT``/``FILTER`` lineage; dropped columns, which have no output field, are listed
in a ``capePrivacy`` dataset facet beside the treatment of every column.

Lineage is a side channel: a failure to build or send an event is logged (a warning
naming the run and the error type) and counted in :attr:`Lineage.failures`, and never
fails or delays the run beyond the transport's own timeout. The audit record is not
changed (it records what was done to the data; lineage delivery is observability).
No key, value or row ever enters an event: only names, types, counts and the policy's
identity. See ``docs/lineage.md``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pyarrow as pa

if TYPE_CHECKING:
    from .core import Counters
    from .plan import Plan
    from .seam import Run

log = logging.getLogger("cape_pipelines.lineage")

PRODUCER = "https://pypi.org/project/cape-pipelines/"
# The JSON schemas of Cape's own facets ship in the package (cape_pipelines/data/
# lineage_facets.json, documented in docs/lineage.md); these URLs name their definitions.
FACETS_SCHEMA = "https://pypi.org/project/cape-pipelines/lineage_facets.json"
PRIVACY_FACET_SCHEMA = f"{FACETS_SCHEMA}#/$defs/CapePrivacyDatasetFacet"
RUN_FACET_SCHEMA = f"{FACETS_SCHEMA}#/$defs/CapeRunFacet"
DEFAULT_NAMESPACE = "cape"
CATALOG_NAMESPACE = "cape-catalog"
# Run ids that are not UUIDs map to a stable UUID (OpenLineage's runId must be one).
_RUN_NAMESPACE = uuid.UUID("b1d7c1f2-5b1e-4b7e-8a53-0c6e3f1a9d24")


class LineageError(ValueError):
    """A ``lineage=`` option that cannot be used (raised when the job is bound)."""


@dataclass(frozen=True)
class DatasetRef:
    """An OpenLineage dataset identity: ``namespace`` (where) and ``name`` (what)."""

    namespace: str
    name: str
    # Other names of the same data, e.g. its catalog dataset (the symlinks facet).
    aliases: tuple[tuple[str, str, str], ...] = ()


def dataset_ref(value: str | os.PathLike[str] | DatasetRef) -> DatasetRef:
    """The dataset a path, URI or ``catalog:NAME`` names, by OpenLineage's naming rules:
    a local path is namespace ``file`` and its absolute path; ``s3://bucket/key`` is
    namespace ``s3://bucket`` and ``/key``; ``catalog:NAME`` is a dataset of Cape's catalog."""
    if isinstance(value, DatasetRef):
        return value
    text = os.fspath(value)
    if text.startswith("catalog:"):
        name = text.split(":", 1)[1]
        if not name:
            raise LineageError("catalog:NAME needs a dataset name")
        return DatasetRef(CATALOG_NAMESPACE, name)
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme == "file":
            return DatasetRef("file", parts.path)
        if not parts.netloc:
            raise LineageError(f"dataset URI {text!r} has no host or bucket")
        return DatasetRef(f"{parts.scheme}://{parts.netloc}", parts.path or "/")
    return DatasetRef("file", str(Path(text).expanduser().resolve()))


@dataclass(frozen=True)
class RemoteRunInfo:
    """What a worker knows of a run it reports (engines whose runs end on workers, Beam):
    the Cape run id, the engine, the policy's identity, and the plan and counters when the
    stage that reports has them. Stands in for the driver's ``seam.Run`` in an event."""

    run_id: str
    engine: str
    label: str
    version: int
    sha256: str
    plan: Plan | None = None
    counters: Counters | None = None


@dataclass
class Lineage:
    """Where a job's OpenLineage events go, and what they name.

    ``client``: an ``openlineage.client.OpenLineageClient`` (default: one configured from
    ``config``, else the standard OpenLineage files and variables); ``namespace`` and
    ``job_name``: the job (default ``$OPENLINEAGE_NAMESPACE`` or ``cape``, and
    ``cape.<policy label>``); ``inputs``/``outputs``: the datasets, as paths, URIs,
    ``catalog:NAME`` or :class:`DatasetRef`; ``catalog_dataset``: the Cape catalog dataset
    the inputs are (``cape apply --dataset``), named in their ``symlinks`` facet.
    """

    client: Any = None
    config: Mapping[str, Any] | None = None
    namespace: str | None = None
    job_name: str | None = None
    inputs: Sequence[str | os.PathLike[str] | DatasetRef] = ()
    outputs: Sequence[str | os.PathLike[str] | DatasetRef] = ()
    catalog_dataset: str | None = None
    # (run id, event type, error type) of every event that could not be sent.
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # The client made from the configuration, shared with the copies with_datasets makes
    # (so closing this one closes theirs).
    _made: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Checked now, so a bad dataset name is an error at bind time, not a lost event.
        alias = (
            ((CATALOG_NAMESPACE, self.catalog_dataset, "DATASET"),) if self.catalog_dataset else ()
        )
        self._inputs = [
            replace(ref, aliases=ref.aliases + alias) for ref in map(dataset_ref, self.inputs)
        ]
        self._outputs = [dataset_ref(d) for d in self.outputs]

    def __getstate__(self) -> dict[str, Any]:
        # A binding may travel to workers with a plan; the client (sockets, files) does not.
        state = dict(self.__dict__)
        state["client"] = None
        state["_lock"] = None
        state["_made"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def with_datasets(
        self,
        inputs: Iterable[str | os.PathLike[str] | DatasetRef] = (),
        outputs: Iterable[str | os.PathLike[str] | DatasetRef] = (),
    ) -> Lineage:
        """This lineage with ``inputs``/``outputs`` added to those it names (the same client)."""
        return replace(
            self,
            inputs=[*self.inputs, *inputs],
            outputs=[*self.outputs, *outputs],
            failures=self.failures,
            _lock=self._lock,
            _made=self._made,
        )

    # ---- events (called by seam.Run) ------------------------------------------------

    def started(self, run: Run) -> None:
        """Send ``START`` for ``run`` (never raises)."""
        with self._lock:
            self._made["runs"] = self._made.get("runs", 0) + 1
        self._send(run, "START", None)

    def finished(self, run: Run, exc: BaseException | None) -> None:
        """Send ``COMPLETE``, or ``FAIL`` naming ``exc``'s type (never raises). When no other
        run of this lineage is under way, the client made from the configuration is closed,
        so an asynchronous transport has delivered (or given up on) the run's events before
        the job goes on; the next run makes a new one."""
        self._send(run, "FAIL" if exc is not None else "COMPLETE", exc)
        with self._lock:
            self._made["runs"] = max(0, self._made.get("runs", 0) - 1)
            last = self._made["runs"] == 0
        if last:
            self.close()

    def send_remote(self, run: RemoteRunInfo, state: str, exc: BaseException | None = None) -> None:
        """Send ``state`` (START, COMPLETE, FAIL) for a run reported by a worker stage, then
        close the client made from the configuration: a worker stage sends one event and
        keeps no state between stages (never raises). A failure is logged on the worker and
        counted in the worker's copy of :attr:`failures`."""
        self._send(run, state, exc)
        self.close()

    def _send(self, run: Run | RemoteRunInfo, state: str, exc: BaseException | None) -> None:
        try:
            event = build_event(self, run, state, exc)
            self._client().emit(event)
        except Exception as err:
            # A side channel: the run goes on. The message can name the transport's URL.
            log.warning(
                "OpenLineage %s event of run %s not sent: %s: %s",
                state,
                run.run_id,
                type(err).__name__,
                str(err).splitlines()[0][:300] if str(err) else "",
            )
            self.failures.append((run.run_id, state, type(err).__name__))

    def _client(self) -> Any:
        if self.client is not None:
            return self.client
        with self._lock:
            if "client" not in self._made:
                from openlineage.client import OpenLineageClient

                config = dict(self.config) if self.config is not None else None
                self._made["client"] = OpenLineageClient(config=config)
            return self._made["client"]

    def close(self, timeout: float = 10.0) -> None:
        """Flush and close the transport of the client made from the configuration (a
        client given as ``client=`` is its owner's to close); never raises."""
        with self._lock:
            made = self._made.pop("client", None)
        if made is not None:
            try:
                made.close(timeout)
            except Exception as err:
                log.warning("OpenLineage client did not close: %s", type(err).__name__)


LineageOption = bool | Mapping[str, Any] | Lineage | None


def lineage_option(value: LineageOption) -> Lineage | None:
    """``lineage=``: True (the standard OpenLineage configuration), a client configuration
    mapping (``{"transport": {...}}``), a :class:`Lineage`, or None/False (no events)."""
    if value is None or value is False:
        return None
    if value is True:
        _require_client()
        return Lineage()
    if isinstance(value, Lineage):
        return value
    if isinstance(value, Mapping):
        _require_client()
        return Lineage(config=value)
    raise LineageError(
        f"lineage= takes True, an OpenLineage client config mapping or a Lineage, "
        f"not {type(value).__name__}"
    )


def file_lineage(
    value: LineageOption, src: str | os.PathLike[str], dst: str | os.PathLike[str]
) -> Lineage | None:
    """``lineage=`` of a file job (``apply_files``): the option, naming ``src`` and ``dst``."""
    found = lineage_option(value)
    return found.with_datasets([src], [dst]) if found is not None else None


def _require_client() -> None:
    try:
        import openlineage.client  # noqa: F401
    except ImportError:
        raise LineageError(
            "lineage needs the openlineage-python client: pip install 'cape-pipelines[lineage]'"
        ) from None


# ---- building events ----------------------------------------------------------------


def openlineage_run_id(run_id: str) -> str:
    """``run_id`` if it is a UUID, else a UUID derived from it (always the same one)."""
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        return str(uuid.uuid5(_RUN_NAMESPACE, run_id))


def _schema_facet(schema: pa.Schema) -> Any:
    from openlineage.client.facet_v2 import schema_dataset

    def fields(s: Iterable[pa.Field]) -> list[Any]:
        out = []
        for i, f in enumerate(s, 1):
            nested = fields(list(f.type)) if pa.types.is_struct(f.type) else []
            out.append(
                schema_dataset.SchemaDatasetFacetFields(
                    name=f.name, type=str(f.type), ordinal_position=i, fields=nested
                )
            )
        return out

    return schema_dataset.SchemaDatasetFacet(fields=fields(schema), producer=PRODUCER)


def column_treatment(plan: Plan) -> dict[str, dict[str, Any]]:
    """Input column -> ``{"treatment": ..., "actions": [...]}``: ``dropped``,
    ``transformed`` (``transformations`` lists the types in order) or ``untouched``."""
    from .plan import ColumnStep

    kinds: dict[str, list[str]] = {}
    for step in plan.steps:
        if isinstance(step, ColumnStep):
            kinds.setdefault(step.column, []).append(step.transform.type_name)
    out: dict[str, dict[str, Any]] = {}
    for f in plan.input_schema:
        name = f.name
        if name in plan.dropped:
            treatment = "dropped"
        elif name in kinds:
            treatment = "transformed"
        else:
            treatment = "untouched"
        entry: dict[str, Any] = {
            "treatment": treatment,
            "actions": list(plan.column_actions.get(name, [])),
        }
        if name in kinds:
            entry["transformations"] = kinds[name]
        out[name] = entry
    return out


def _column_lineage(plan: Plan, inputs: Sequence[DatasetRef]) -> Any:
    from openlineage.client.facet_v2 import column_lineage_dataset as cl

    from .plan import ColumnStep, FilterStep

    under = f"under policy {plan.label} v{plan.version}"
    steps: dict[str, list[ColumnStep]] = {}
    for step in plan.steps:
        if isinstance(step, ColumnStep):
            steps.setdefault(step.column, []).append(step)
    fields: dict[str, Any] = {}
    for name in plan.output_schema.names:
        applied = steps.get(name, [])
        if applied:
            transformations = [
                cl.Transformation(
                    type="DIRECT",
                    subtype="TRANSFORMATION",
                    description=f"{s.transform.type_name} ({s.location}) {under}",
                    masking=True,
                )
                for s in applied
            ]
            description = " then ".join(s.transform.type_name for s in applied) + f" {under}"
            kind = "MASKED"
        else:
            transformations = [cl.Transformation(type="DIRECT", subtype="IDENTITY", masking=False)]
            description, kind = f"unchanged {under}", "IDENTITY"
        fields[name] = cl.Fields(
            inputFields=[
                cl.InputField(
                    namespace=d.namespace, name=d.name, field=name, transformations=transformations
                )
                for d in inputs
            ],
            transformationDescription=description,
            transformationType=kind,
        )
    dataset = [
        cl.InputField(
            namespace=d.namespace,
            name=d.name,
            field=col,
            transformations=[
                cl.Transformation(
                    type="INDIRECT",
                    subtype="FILTER",
                    description=f"row-redact where {s.condition} ({s.location}) {under}",
                    masking=True,
                )
            ],
        )
        for s in plan.steps
        if isinstance(s, FilterStep)
        for col in s.columns
        for d in inputs
    ]
    return cl.ColumnLineageDatasetFacet(fields=fields, dataset=dataset, producer=PRODUCER)


@functools.cache
def _facet_classes() -> tuple[Any, Any]:
    """Cape's two facet classes (built on first use: the client is an optional extra)."""
    import attr
    from openlineage.client.facet_v2 import DatasetFacet, RunFacet

    @attr.define
    class CapePrivacyDatasetFacet(DatasetFacet):
        policy: dict[str, Any]
        columns: dict[str, Any]
        rowFilters: list[dict[str, Any]]

        @staticmethod
        def _get_schema() -> str:
            return PRIVACY_FACET_SCHEMA

    @attr.define
    class CapeRunFacet(RunFacet):
        runId: str
        engine: str
        policy: dict[str, Any]

        @staticmethod
        def _get_schema() -> str:
            return RUN_FACET_SCHEMA

    return CapePrivacyDatasetFacet, CapeRunFacet


def _privacy_facet(plan: Plan) -> Any:
    from .plan import FilterStep

    privacy, _ = _facet_classes()
    return privacy(
        policy={"label": plan.label, "version": plan.version, "sha256": plan.sha256},
        columns=column_treatment(plan),
        rowFilters=[
            {"condition": s.condition, "location": s.location}
            for s in plan.steps
            if isinstance(s, FilterStep)
        ],
        producer=PRODUCER,
    )


def _cape_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cape-pipelines")
    except PackageNotFoundError:
        return "0+unknown"


def build_event(
    lineage: Lineage, run: Run | RemoteRunInfo, state: str, exc: BaseException | None
) -> Any:
    """The OpenLineage ``RunEvent`` of ``run`` in ``state`` (START, COMPLETE, FAIL)."""
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, RunEvent, RunState
    from openlineage.client.event_v2 import Run as OLRun
    from openlineage.client.facet_v2 import (
        error_message_run,
        job_type_job,
        output_statistics_output_dataset,
        processing_engine_run,
        symlinks_dataset,
    )

    if isinstance(run, RemoteRunInfo):
        engine, label, version, sha256 = run.engine, run.label, run.version, run.sha256
    else:
        policy = run.binding.policy
        engine, label, version, sha256 = (
            run.binding.engine,
            policy.label,
            policy.version,
            policy.sha256,
        )
    plan = run.plan
    namespace = lineage.namespace or os.environ.get("OPENLINEAGE_NAMESPACE") or DEFAULT_NAMESPACE
    job_name = lineage.job_name or f"cape.{label}"
    _, cape_run = _facet_classes()
    run_facets: dict[str, Any] = {
        "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=_cape_version(), name="cape-pipelines", producer=PRODUCER
        ),
        "cape": cape_run(
            runId=run.run_id,
            engine=engine,
            policy={"label": label, "version": version, "sha256": sha256},
            producer=PRODUCER,
        ),
    }
    if exc is not None:
        from .audit import error_info

        info = error_info(exc)
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=f"{info['type']}: {info['message']}",
            programmingLanguage="python",
            producer=PRODUCER,
        )

    def with_aliases(d: DatasetRef, facets: dict[str, Any]) -> dict[str, Any]:
        if d.aliases:
            facets["symlinks"] = symlinks_dataset.SymlinksDatasetFacet(
                identifiers=[
                    symlinks_dataset.Identifier(namespace=ns, name=n, type=t)
                    for ns, n, t in d.aliases
                ],
                producer=PRODUCER,
            )
        return facets

    inputs = []
    for d in lineage._inputs:
        facets: dict[str, Any] = {}
        if plan is not None:
            facets["schema"] = _schema_facet(plan.input_schema)
        inputs.append(
            InputDataset(namespace=d.namespace, name=d.name, facets=with_aliases(d, facets))
        )
    outputs = []
    for d in lineage._outputs:
        facets = {}
        out_facets: dict[str, Any] = {}
        if plan is not None:
            facets["schema"] = _schema_facet(plan.output_schema)
            facets["columnLineage"] = _column_lineage(plan, lineage._inputs)
            facets["capePrivacy"] = _privacy_facet(plan)
            if state == "COMPLETE" and run.counters is not None:
                out_facets["outputStatistics"] = (
                    output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                        rowCount=int(run.counters.rows_out), producer=PRODUCER
                    )
                )
        outputs.append(
            OutputDataset(
                namespace=d.namespace,
                name=d.name,
                facets=with_aliases(d, facets),
                outputFacets=out_facets,
            )
        )
    return RunEvent(
        eventType=RunState(state),
        eventTime=datetime.now(UTC).isoformat(),
        run=OLRun(runId=openlineage_run_id(run.run_id), facets=run_facets),
        job=Job(
            namespace=namespace,
            name=job_name,
            facets={
                "jobType": job_type_job.JobTypeJobFacet(
                    processingType="BATCH", integration="CAPE", jobType="JOB", producer=PRODUCER
                )
            },
        ),
        inputs=inputs,
        outputs=outputs,
        producer=PRODUCER,
    )


__all__ = [
    "DatasetRef",
    "Lineage",
    "LineageError",
    "LineageOption",
    "RemoteRunInfo",
    "build_event",
    "column_treatment",
    "dataset_ref",
    "file_lineage",
    "lineage_option",
    "openlineage_run_id",
]
