"""The Cape Flight service: datasets served through their policy; transformation as a service.

A ``pyarrow.flight`` server with two jobs. **Serving datasets**: each
configured dataset (a CSV/Parquet file or directory, read as ``cape apply``
reads it) is protected by one policy label; ``list_flights`` and
``get_flight_info`` describe it (the schema is the policy's *output* schema)
and ``do_get`` streams its batches through the core on the way out.
**Transformation as a service**: ``do_exchange`` on the descriptor path
``[label]`` takes the caller's own batches and streams them back protected,
so a worker that must not hold keys sends its data here instead.

Every call carries ``authorization: Bearer <token>``; :mod:`.access` decides
per stream what it may read (with a coordinator: a pipeline token for the
label; the policy is used only once its signature verified). Each ``do_get``
and ``do_exchange`` is one audited run (``engine: flight``) with counts of
the batches it produced, ``run.failed`` if the stream breaks. Memory per
stream is bounded: a batch is read, transformed and handed to gRPC, which
pulls the next only when the client has taken the previous one (flow
control), so a slow client holds one batch in the server, not the dataset.

With ``lineage=`` each of those runs also sends its OpenLineage events (START,
COMPLETE/FAIL with the column lineage): a ``do_get`` reads the dataset's files and
writes the Flight stream ``<scheme>://host:port`` / ``<dataset>``; a ``do_exchange``
reads and writes the caller's stream, ``exchange/<label>/input`` and ``/output``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from ..core import Counters, apply_batch
from ..errors import CapeError, PlanError
from ..inputs import CsvOptions, InputSet, open_inputs
from ..lineage import DatasetRef, Lineage, LineageOption, lineage_option
from ..plan import Plan
from ..risk_run import StreamRisk
from ..seam import Binding, Run, bind
from .access import Access, Grant, flight_error

ENGINE = "flight"
DEFAULT_BATCH_ROWS = 65_536
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    """A served dataset: its Flight name, its files, and the policy label that protects it."""

    name: str
    path: Path
    label: str
    csv: CsvOptions = field(default_factory=CsvOptions)

    def inputs(self) -> InputSet:
        return open_inputs(self.path, csv_options=self.csv)


class _BearerMiddleware(flight.ServerMiddleware):
    def __init__(self, token: str | None) -> None:
        self.token = token


class _BearerFactory(flight.ServerMiddlewareFactory):
    """Takes the bearer token from the ``authorization`` header (checked later, per stream)."""

    def start_call(self, info: Any, headers: Mapping[str, list[str]]) -> _BearerMiddleware:
        values = headers.get("authorization") or headers.get("Authorization") or []
        token = None
        for value in values:
            scheme, _, rest = value.partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                token = rest.strip()
        return _BearerMiddleware(token)


def ticket_for(dataset: str) -> flight.Ticket:
    """The ``do_get`` ticket of a dataset (what ``get_flight_info`` hands out)."""
    return flight.Ticket(json.dumps({"dataset": dataset}).encode("utf-8"))


class CapeFlightServer(flight.FlightServerBase):
    """Serves ``datasets`` through their policies; ``do_exchange`` protects callers' batches.

    ``location``: ``grpc://127.0.0.1:0`` picks a free port (see :attr:`port`);
    ``grpc+tls://...`` with ``tls_certificates`` (PEM ``(cert, key)`` pairs)
    serves TLS. ``batch_rows`` bounds each batch read from a file and each
    slice of a caller's batch that is transformed at once. ``lineage``: OpenLineage
    run events per stream (True, a client config mapping or a
    :class:`~cape_pipelines.lineage.Lineage`, whose datasets are added to the stream's).
    """

    def __init__(
        self,
        location: str,
        datasets: Mapping[str, Dataset] | list[Dataset],
        access: Access,
        *,
        tls_certificates: list[tuple[bytes, bytes]] | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        lineage: LineageOption = None,
    ) -> None:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        # Checked before the port is taken: a bad option is an error, not a silent server.
        self.lineage: Lineage | None = lineage_option(lineage)
        certs = [flight.CertKeyPair(cert=c, key=k) for c, k in (tls_certificates or [])]
        super().__init__(
            location,
            tls_certificates=certs or None,
            middleware={"bearer": _BearerFactory()},
        )
        items = datasets.values() if isinstance(datasets, Mapping) else datasets
        self.datasets = {d.name: d for d in items}
        self.access = access
        self.batch_rows = batch_rows
        self.scheme = "grpc+tls" if certs else "grpc+tcp"
        self.host = location.split("://", 1)[-1].rsplit(":", 1)[0] or "127.0.0.1"

    def __repr__(self) -> str:
        return f"CapeFlightServer(port={self.port}, datasets={sorted(self.datasets)})"

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _token(context: flight.ServerCallContext) -> str | None:
        mw = context.get_middleware("bearer")
        return mw.token if mw is not None else None

    def _dataset(self, name: str) -> Dataset:
        found = self.datasets.get(name)
        if found is None:
            served = ", ".join(sorted(self.datasets)) or "none"
            raise flight.FlightServerError(f"cape: unknown dataset {name!r}; served: {served}")
        return found

    def _grant(self, context: flight.ServerCallContext, label: str) -> Grant:
        try:
            return self.access.grant(self._token(context), label)
        except (CapeError, flight.FlightError) as exc:
            raise flight_error(exc, label) from None

    def _stream(self, name: str) -> DatasetRef:
        """The lineage dataset of one of this server's Flight streams."""
        return DatasetRef(f"{self.scheme}://{self.host}:{self.port}", name)

    def _bind(
        self,
        grant: Grant,
        inputs: list[DatasetRef | Path] | None = None,
        outputs: list[DatasetRef] | None = None,
    ) -> Binding:
        # The grant's policy is verified already; the seam only carries it into the run.
        lineage = None
        if self.lineage is not None and inputs is not None:
            lineage = self.lineage.with_datasets(inputs, outputs or [])
        return bind(
            grant.policy,
            engine=ENGINE,
            source=grant.source,
            resolver=grant.resolver,
            audit=grant.audit,
            lineage=lineage,
        )

    def _plan(self, binding: Binding, schema: pa.Schema, label: str) -> Plan:
        # Built without a record, as before: a stream that cannot be planned never started.
        try:
            return binding.build(schema)
        except CapeError as exc:
            raise flight_error(exc, label) from None

    def _dataset_plan(
        self, context: flight.ServerCallContext, name: str
    ) -> tuple[Dataset, Binding, InputSet, Plan]:
        ds = self._dataset(name)
        binding = self._bind(self._grant(context, ds.label), [ds.path], [self._stream(ds.name)])
        try:
            inputs = ds.inputs()
            schema = inputs.schema
        except CapeError as exc:
            raise flight.FlightServerError(
                f"cape: dataset {name!r} cannot be read: {exc}"
            ) from None
        return ds, binding, inputs, self._plan(binding, schema, ds.label)

    def _info(self, ds: Dataset, inputs: InputSet, plan: Plan) -> flight.FlightInfo:
        endpoint = flight.FlightEndpoint(
            ticket_for(ds.name), [flight.Location(f"{self.scheme}://{self.host}:{self.port}")]
        )
        total = inputs.total_rows() if not plan.filters_rows else None
        return flight.FlightInfo(
            plan.output_schema,
            flight.FlightDescriptor.for_path(ds.name),
            [endpoint],
            total if total is not None else -1,
            -1,
        )

    def _slices(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        for start in range(0, batch.num_rows, self.batch_rows):
            yield batch.slice(start, self.batch_rows)

    # -- Flight methods ---------------------------------------------------------------------

    def list_flights(
        self, context: flight.ServerCallContext, criteria: bytes
    ) -> Iterator[flight.FlightInfo]:
        """Every dataset this caller may read (others are left out, not reported)."""
        for name in sorted(self.datasets):
            try:
                ds, _, inputs, plan = self._dataset_plan(context, name)
            except (flight.FlightUnauthorizedError, flight.FlightServerError):
                continue
            yield self._info(ds, inputs, plan)

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        name = _descriptor_name(descriptor)
        ds, _, inputs, plan = self._dataset_plan(context, name)
        return self._info(ds, inputs, plan)

    def get_schema(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.SchemaResult:
        return flight.SchemaResult(self.get_flight_info(context, descriptor).schema)

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> Any:
        try:
            name = json.loads(ticket.ticket.decode("utf-8"))["dataset"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise flight.FlightServerError(
                'cape: a ticket is what get_flight_info returned: JSON {"dataset": NAME}'
            ) from None
        _, binding, inputs, plan = self._dataset_plan(context, str(name))
        _refuse_suppress(binding, plan)
        run = binding.run(plan, counters=Counters.empty_for(plan))
        return flight.GeneratorStream(plan.output_schema, self._serve(run, plan, inputs))

    def _serve(self, run: Run, plan: Plan, inputs: InputSet) -> Iterator[pa.RecordBatch]:
        """The stream's batches, in one audited run (``run.failed`` if the client leaves)."""
        closed = ConnectionAbortedError("the client closed the stream early")
        try:
            with run:
                risk = StreamRisk(plan)
                try:
                    for _, batch in inputs.batches(self.batch_rows):
                        out, c, _ = apply_batch(plan, batch)
                        run.add(c)
                        risk.add(out)
                        if out.num_rows:
                            yield out
                    risk.finish(run.counters)
                except GeneratorExit:
                    # Recorded by the run as the client's doing; the generator then just ends.
                    raise closed from None
        except Exception as exc:
            if exc is closed:
                return
            raise flight.FlightServerError(f"cape: stream failed: {exc}") from None

    def do_exchange(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        """Protect the caller's batches with ``label``'s policy (descriptor path ``[label]``)."""
        label = _descriptor_name(descriptor)
        stream = f"exchange/{label}"
        binding = self._bind(
            self._grant(context, label),
            [self._stream(f"{stream}/input")],
            [self._stream(f"{stream}/output")],
        )
        plan = self._plan(binding, reader.schema, label)
        _refuse_suppress(binding, plan)
        try:
            with binding.run(plan, counters=Counters.empty_for(plan)) as run:
                risk = StreamRisk(plan)
                writer.begin(plan.output_schema)
                for chunk in reader:
                    if chunk.data is None:
                        continue
                    for piece in self._slices(chunk.data):
                        out, c, _ = apply_batch(plan, piece)
                        run.add(c)
                        risk.add(out)
                        writer.write_batch(out)
                risk.finish(run.counters)
        except flight.FlightError:
            raise
        except Exception as exc:
            raise flight.FlightServerError(f"cape: exchange failed: {exc}") from None

    def shutdown(self) -> None:
        super().shutdown()
        self.access.close()


def _refuse_suppress(binding: Binding, plan: Plan) -> None:
    """A policy that suppresses cannot stream: recorded as a failed run, refused to the caller."""
    try:
        StreamRisk.refuse_suppress(plan, "an Arrow Flight stream")
    except PlanError as exc:
        binding.run(plan).record_failure(exc)
        raise flight.FlightServerError(f"cape: {exc}") from None


def _descriptor_name(descriptor: flight.FlightDescriptor) -> str:
    if descriptor.descriptor_type == flight.DescriptorType.PATH and len(descriptor.path) == 1:
        raw = descriptor.path[0]
    elif descriptor.descriptor_type == flight.DescriptorType.CMD:
        raw = descriptor.command
    else:
        raise flight.FlightServerError("cape: name the dataset or label as a one-element path")
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
