"""``apply_policy`` for PyFlink Tables and DataStreams, the audited ``collect``, SQL functions.

The plan is built once, on the client, from the Table's schema (converted to
Arrow): a bad column, type or key fails when :func:`apply_policy` is called.
Rows then go through the one core in a vectorised (pandas) ``Table.map``: PyFlink
hands the function a batch as a pandas DataFrame, the batch becomes Arrow with
the plan's input types, goes through ``apply_batch``, and comes back as a
DataFrame. A ``map`` keeps the row count, so a row removed by ``row-redact``
comes back as a row of nulls with a false ``__cape_keep`` flag, and the
returned Table filters on that flag (in Flink, before any sink).

A run on Flink is one job. :func:`collect` is the audited action: it emits
``run.started``, runs the job on the *unfiltered* mapped table, so it reads
both how many rows went in and which were kept, filters on the client, and
emits ``run.completed`` with counts of the table it returns (or
``run.failed``). Like Spark's closure, the plan (keys included) is pickled
into the UDF that Flink ships to its Python workers.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pyflink.table import DataTypes, Table
from pyflink.table.expressions import call, col, if_then_else
from pyflink.table.types import DataType
from pyflink.table.udf import udf

from ..audit import AuditTarget
from ..core import ColumnCounter, Counters, apply_batch
from ..errors import PlanError, TransformError
from ..keys import KeyResolver, Workers
from ..lineage import LineageOption
from ..plan import Plan
from ..policy.load import PolicySource
from ..seam import Binding, WorkerKeysSetting, bind

ENGINE = "flink"
KEEP = "__cape_keep"


# -- types ----------------------------------------------------------------------------------


# Fractional-second digits of each Arrow unit, and the Arrow unit of a Flink precision.
DIGITS = {"s": 0, "ms": 3, "us": 6, "ns": 9}


def unit_of(precision: int) -> str:
    """The Arrow unit that holds a Flink ``TIMESTAMP(p)`` exactly (p 1-2 widen to ms, ...)."""
    if precision == 0:
        return "s"
    return "ms" if precision <= 3 else "us" if precision <= 6 else "ns"


def to_flink(t: pa.DataType, column: str = "?") -> DataType:
    """The Flink SQL type for an Arrow type (the types Flink's pandas UDFs carry exactly).

    A naive timestamp is ``TIMESTAMP(p)``, a zoned one ``TIMESTAMP_LTZ(p)`` (an
    instant; Flink keeps no zone name per column, only the session's zone).
    """
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return DataTypes.STRING()
    if pa.types.is_timestamp(t):
        p = DIGITS[t.unit]
        return DataTypes.TIMESTAMP_LTZ(p) if t.tz is not None else DataTypes.TIMESTAMP(p)
    simple = {
        pa.int8(): DataTypes.TINYINT(),
        pa.int16(): DataTypes.SMALLINT(),
        pa.int32(): DataTypes.INT(),
        pa.int64(): DataTypes.BIGINT(),
        pa.float32(): DataTypes.FLOAT(),
        pa.float64(): DataTypes.DOUBLE(),
        pa.bool_(): DataTypes.BOOLEAN(),
        pa.date32(): DataTypes.DATE(),
    }
    if t in simple:
        return simple[t]
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return DataTypes.BYTES()
    if pa.types.is_decimal128(t):
        return DataTypes.DECIMAL(t.precision, t.scale)
    raise PlanError(f"column {column!r}: type {t} has no exact Flink pandas-UDF type here")


def to_arrow(t: DataType, column: str = "?") -> pa.DataType:
    """The Arrow type for a Flink SQL type (inverse of :func:`to_flink`)."""
    name = type(t).__name__
    simple = {
        "VarCharType": pa.string(),
        "CharType": pa.string(),
        "TinyIntType": pa.int8(),
        "SmallIntType": pa.int16(),
        "IntType": pa.int32(),
        "BigIntType": pa.int64(),
        "FloatType": pa.float32(),
        "DoubleType": pa.float64(),
        "BooleanType": pa.bool_(),
        "DateType": pa.date32(),
        "VarBinaryType": pa.binary(),
        "BinaryType": pa.binary(),
    }
    if name in simple:
        return simple[name]
    if name == "DecimalType":
        return pa.decimal128(t.precision, t.scale)
    raise PlanError(f"column {column!r}: Flink type {t} is not supported by cape on Flink")


def session_zone(table: Table) -> str:
    """The session time zone as an Arrow zone name, if it has a fixed offset.

    A ``TIMESTAMP_LTZ`` value crosses PyFlink's pandas boundary as the session's
    wall-clock time and is re-localised there (``tz_localize``), which cannot
    tell the two instants of a repeated autumn hour apart (and fails on them):
    only a zone without daylight saving carries every instant exactly.
    """
    from pyflink.java_gateway import get_gateway

    zone = str(table._t_env.get_config().get_local_timezone())
    rules = get_gateway().jvm.java.time.ZoneId.of(zone).getRules()
    if not rules.isFixedOffset():
        raise PlanError(
            f"TIMESTAMP_LTZ columns need a session time zone without daylight saving "
            f"(table.local-time-zone is {zone!r}; set it to 'UTC' or a fixed offset such as "
            f"'GMT+02:00'): PyFlink carries these values as the session's wall-clock time"
        )
    if zone in ("Z", "UTC", "GMT", "UT"):
        return "UTC"
    for prefix in ("UTC", "GMT", "UT"):
        if zone.startswith(prefix) and zone[len(prefix) : len(prefix) + 1] in ("+", "-"):
            return zone[len(prefix) :]
    return zone


def schema_to_arrow(table: Table) -> pa.Schema:
    """The Arrow schema a plan sees for ``table``.

    Timestamp precision is read from the Java schema (PyFlink's Python-side
    type conversion reports every ``TIMESTAMP`` as precision 3). A
    ``TIMESTAMP_LTZ(p)`` becomes ``timestamp[unit, tz=<session zone>]``, as
    Spark's ``TIMESTAMP`` does.
    """
    s = table.get_schema()
    java_columns = list(table._j_table.getResolvedSchema().getColumns())
    fields = []
    zone: str | None = None
    for n, t, jc in zip(s.get_field_names(), s.get_field_data_types(), java_columns, strict=True):
        logical = jc.getDataType().getLogicalType()
        root = str(logical.getTypeRoot().toString())
        if root == "TIMESTAMP_WITHOUT_TIME_ZONE":
            fields.append(pa.field(n, pa.timestamp(unit_of(int(logical.getPrecision())))))
        elif root == "TIMESTAMP_WITH_LOCAL_TIME_ZONE":
            if zone is None:
                try:
                    zone = session_zone(table)
                except PlanError as exc:
                    raise PlanError(f"column {n!r}: {exc}") from None
            fields.append(pa.field(n, pa.timestamp(unit_of(int(logical.getPrecision())), zone)))
        else:
            fields.append(pa.field(n, to_arrow(t, n)))
    return pa.schema(fields)


def row_type(schema: pa.Schema) -> DataType:
    return DataTypes.ROW([DataTypes.FIELD(f.name, to_flink(f.type, f.name)) for f in schema])


# -- the mapped function -------------------------------------------------------------------


def wire_type(t: pa.DataType, column: str = "?") -> DataType:
    """The Flink type a column has in the UDF's result row.

    A ``TIMESTAMP_LTZ`` cannot be a field of a pandas UDF's result row in
    PyFlink, so a zoned timestamp leaves the UDF as ``BIGINT`` epoch units and
    becomes ``TIMESTAMP_LTZ(p)`` again in Flink (``TO_TIMESTAMP_LTZ``), exactly.
    """
    if pa.types.is_timestamp(t) and t.tz is not None:
        return DataTypes.BIGINT()
    return to_flink(t, column)


def _sub_milli_before_1970(arr: pa.Array) -> int | None:
    """The first value Flink 2.3 cannot read back from Python, if any.

    Flink's Arrow reader (``ArrowTimestampColumnVector``) splits a micro- or
    nanosecond value into milliseconds and a remainder with truncating
    division, so a value before 1970 with a sub-millisecond part makes a
    negative remainder and fails deep in the job. Checked here, where the
    column can be named.
    """
    per_milli = {"us": 1_000, "ns": 1_000_000}.get(arr.type.unit)  # type: ignore[attr-defined]
    if per_milli is None or arr.null_count == len(arr):
        return None
    ints = arr.cast(pa.int64()).drop_null().to_numpy()
    bad = ints[(ints < 0) & (ints % per_milli != 0)]
    return int(bad[0]) if len(bad) else None


class PolicyMapper:
    """The pandas UDF body: one batch through the core, same length out, plus the keep flag."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __repr__(self) -> str:
        return f"PolicyMapper({self.plan!r})"

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        n = len(df)
        # By position: PyFlink names the frame's columns after the map's input row,
        # which for a SQL query source need not be the table's column names.
        df = df.reset_index(drop=True)
        df.columns = self.plan.input_schema.names
        batch = pa.RecordBatch.from_pandas(df, schema=self.plan.input_schema, preserve_index=False)
        out, _, kept = apply_batch(self.plan, batch, with_indices=True)
        keep = np.zeros(n, dtype=bool)
        if kept is None:
            keep[:] = True
            positions = None
        else:
            idx = kept.to_numpy(zero_copy_only=False).astype(np.int64)
            keep[idx] = True
            where = np.full(n, -1, dtype=np.int64)
            where[idx] = np.arange(len(idx), dtype=np.int64)
            positions = pa.array(where, mask=where < 0)
        columns = {}
        for field in self.plan.output_schema:
            arr = out.column(field.name)
            if positions is not None:
                arr = arr.take(positions)
            columns[field.name] = self._to_wire(field.name, arr)
        columns[KEEP] = keep
        return pd.DataFrame(columns)

    @staticmethod
    def _to_wire(name: str, arr: pa.Array) -> pd.Series:
        """One output column as PyFlink's pandas-to-Arrow conversion takes it."""
        if pa.types.is_timestamp(arr.type):
            if arr.type.tz is not None:
                # Epoch units as Python ints (object): PyFlink's conversion takes no
                # pandas extension dtypes, and float64 would round nanoseconds.
                ints = arr.cast(pa.int64())
                values = ints.fill_null(0).to_numpy().astype(object)
                values[ints.is_null().to_numpy(zero_copy_only=False)] = None
                return pd.Series(values, dtype=object)
            bad = _sub_milli_before_1970(arr)
            if bad is not None:
                raise TransformError(
                    f"column {name!r}: timestamp {pa.scalar(bad, pa.int64()).cast(arr.type)} "
                    "is before 1970 with a sub-millisecond part, which Flink 2.3 cannot read "
                    "back from a Python function (its Arrow reader divides with truncation); "
                    "truncate such values to milliseconds first"
                )
        # Plain numpy/object columns: PyFlink's conversion back to Arrow takes no
        # pandas extension dtypes; it casts to the declared Flink type itself.
        return arr.to_pandas()


def flink_workers(t_env: Any) -> Workers:
    """Where the job's Python workers run: on this host for the embedded mini-cluster
    (``execution.target`` unset or ``local``), elsewhere for any other target."""
    target = str(t_env.get_config().get("execution.target", "local") or "local")
    return Workers("flink", f"execution.target {target}", local=target == "local")


@dataclass
class _Bound:
    binding: Binding
    plan: Plan
    mapped: Table
    t_env: Any
    function: Any = None


def _from_wire(mapped: Table, plan: Plan) -> Table:
    """``mapped`` with zoned timestamps turned back from epoch units into ``TIMESTAMP_LTZ``."""
    zoned = [
        f for f in plan.output_schema if pa.types.is_timestamp(f.type) and f.type.tz is not None
    ]
    if not zoned:
        return mapped
    exprs = []
    for f in plan.output_schema:
        e = col(f.name)
        if f in zoned:
            p = DIGITS[f.type.unit]
            e = call("TO_TIMESTAMP_LTZ", e, p)
            if p < 3:
                # TO_TIMESTAMP_LTZ returns precision 3 for p 0-3: back to the column's own.
                e = e.cast(DataTypes.TIMESTAMP_LTZ(p))
            e = e.alias(f.name)
        exprs.append(e)
    exprs.append(col(KEEP))
    return mapped.select(*exprs)


def apply_policy(
    table: Table,
    policy: PolicySource,
    *,
    keys: Mapping[str, bytes | str] | None = None,
    audit: AuditTarget = None,
    column_tags: Mapping[str, Sequence[str]] | None = None,
    resolver: KeyResolver | None = None,
    client: Any = None,
    worker_keys: WorkerKeysSetting = None,
    lineage: LineageOption = None,
) -> Table:
    """Apply ``policy`` to a PyFlink Table; a Table comes back (lazy, like every Flink Table).

    Run it with :func:`collect` or :func:`execute_insert` for an audited run.
    With ``client=`` the policy is a label on the coordinator (see
    :mod:`cape_pipelines.source`). The UDF Flink ships to its Python workers
    carries key references, never key bytes (``worker_keys="inline"`` is the
    opt-in to ship the bytes; see docs/keys.md). ``lineage``: OpenLineage events
    for the run :func:`collect` or :func:`execute_insert` makes, sent from the
    driver (see docs/lineage.md).
    """
    if not isinstance(table, Table):
        raise TypeError(
            f"cape_pipelines.flink.apply_policy takes a pyflink Table, not {type(table).__name__}"
        )
    binding = bind(
        policy,
        engine=ENGINE,
        keys=keys,
        audit=audit,
        column_tags=column_tags,
        resolver=resolver,
        client=client,
        worker_keys=worker_keys,
        lineage=lineage,
    )
    # Built without a record, as before: the job has not started until collect().
    plan = binding.build(schema_to_arrow(table), workers=flink_workers(table._t_env))
    out_type = DataTypes.ROW(
        [DataTypes.FIELD(f.name, wire_type(f.type, f.name)) for f in plan.output_schema]
        + [DataTypes.FIELD(KEEP, DataTypes.BOOLEAN())]
    )
    mapper = udf(PolicyMapper(plan), result_type=out_type, func_type="pandas")
    mapped = _from_wire(table.map(mapper), plan)
    out = mapped.filter(col(KEEP)).drop_columns(col(KEEP))
    bound = _Bound(binding, plan, mapped, table._t_env, mapper)
    out._cape_binding = bound  # type: ignore[attr-defined]
    return out


def counters_from_table(plan: Plan, table: pa.Table, rows_in: int) -> Counters:
    counters = Counters(rows_in=rows_in, rows_out=table.num_rows)
    for name, types in plan.transformed_columns.items():
        nulls = table.column(name).null_count
        counters.columns[name] = ColumnCounter(types, table.num_rows - nulls, nulls)
    return counters


def collect(out: Any) -> pa.Table:
    """Run the job and return the protected rows as Arrow: one audited run.

    ``out`` is a Table from :func:`apply_policy` or a DataStream from
    :func:`apply_to_stream` (a bounded one: the run completes when its job does).
    """
    bound: _Bound | None = getattr(out, "_cape_binding", None)
    if bound is None:
        raise TypeError(
            "collect() takes the Table returned by cape_pipelines.flink.apply_policy "
            "or the DataStream returned by apply_to_stream"
        )
    schema = bound.plan.output_schema
    with bound.binding.run(bound.plan) as run:
        flagged = getattr(out, "_cape_flagged", None)
        if flagged is not None:
            # The stream's own job, flag included: rows in and rows kept from one run.
            rows = [r.as_dict() for r in flagged.execute_and_collect()]
            rows_in = len(rows)
            kept_rows = [{k: r[k] for k in schema.names} for r in rows if r[KEEP]]
            table = pa.Table.from_pylist(kept_rows, schema=schema)
        else:
            df = bound.mapped.to_pandas()
            rows_in = len(df)
            kept = df[df[KEEP].astype(bool)].drop(columns=[KEEP]).reset_index(drop=True)
            table = pa.Table.from_pandas(kept, schema=schema, preserve_index=False)
        counters = counters_from_table(bound.plan, table, rows_in)
        if bound.plan.risk is not None:
            # The policy's risk: section over the whole output, here on the client, where
            # collect holds it: measured, small classes suppressed if asked.
            from ..risk_run import finish_table

            table, counters = finish_table(bound.plan, table, counters)
        run.counters = counters
    return table


def _read_counts(directory: str) -> list[int]:
    """The one counts row the job wrote (CSV part files; a parallel sink may leave empties)."""
    rows = []
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            rows += [line for line in path.read_text().splitlines() if line.strip()]
    if len(rows) != 1:
        raise RuntimeError(f"the audit counts sink holds {len(rows)} rows, not 1")
    return [int(v) for v in rows[0].split(",")]


def _insert_statements(out: Table, bound: _Bound, target: str, counts: str, overwrite: bool) -> Any:
    """The one job of :func:`execute_insert`: the rows into ``target``, the counts into
    ``counts`` (rows in, rows kept, then per transformed column the kept non-null values),
    both over the same mapped table, which Flink plans once (a reused sub-plan)."""
    keep = col(KEEP)
    bigint = DataTypes.BIGINT()
    aggregates = [
        keep.count.cast(bigint),
        if_then_else(keep, 1, 0).sum0.cast(bigint),
        *(
            if_then_else(keep & col(c).is_not_null, 1, 0).sum0.cast(bigint)
            for c in bound.plan.transformed_columns
        ),
    ]
    statements = bound.t_env.create_statement_set()
    statements.add_insert(target, out, overwrite)
    statements.add_insert(
        counts, bound.mapped.select(*(e.alias(f"c{i}") for i, e in enumerate(aggregates)))
    )
    return statements


def execute_insert(out: Table, target: str, *, overwrite: bool = False) -> Counters:
    """Write the protected rows into the registered table ``target``: one audited run.

    The write and the run's counts are one Flink job (a statement set with two
    inserts over the same mapped table, so the policy runs once per row): the
    counts (rows in, rows kept, per transformed column non-null values among
    the kept rows) go to a temporary one-row CSV table, read once the job has
    finished; ``run.completed`` carries them. A failed job emits ``run.failed``
    and raises. Batch mode only: in streaming mode an aggregate is an updating
    result, and an unbounded job never finishes (docs/engines/flink.md).
    """
    bound: _Bound | None = getattr(out, "_cape_binding", None)
    if bound is None:
        raise TypeError(
            "execute_insert() takes the Table returned by cape_pipelines.flink.apply_policy"
        )
    if bound.plan.risk is not None:
        raise PlanError(
            "a policy with a risk: section runs on Flink through collect() only: the "
            "suppression needs the whole output's class counts before any row is written, "
            "which a Flink sink write does not give (see docs/engines/flink.md)"
        )
    t_env = bound.t_env
    mode = t_env.get_config().get("execution.runtime-mode", "batch")
    if str(mode).lower() != "batch":
        raise PlanError(
            "cape_pipelines.flink.execute_insert audits bounded batch jobs; this "
            f"TableEnvironment runs in {mode!r} mode (see docs/engines/flink.md, streams)"
        )
    columns = list(bound.plan.transformed_columns)
    counts = f"cape_counts_{uuid.uuid4().hex}"
    with bound.binding.run(bound.plan) as run, tempfile.TemporaryDirectory() as tmp:
        fields = ", ".join(f"c{i} BIGINT" for i in range(2 + len(columns)))
        t_env.execute_sql(
            f"CREATE TEMPORARY TABLE {counts} ({fields}) WITH "
            f"('connector' = 'filesystem', 'path' = '{Path(tmp).as_uri()}', 'format' = 'csv')"
        )
        try:
            statements = _insert_statements(out, bound, target, counts, overwrite)
            statements.execute().wait()
            values = _read_counts(tmp)
        finally:
            t_env.drop_temporary_table(counts)
        counters = Counters(rows_in=values[0], rows_out=values[1])
        for name, n in zip(columns, values[2:], strict=True):
            types = bound.plan.transformed_columns[name]
            counters.columns[name] = ColumnCounter(types, n, values[1] - n)
        run.counters = counters
    return counters


def apply_to_stream(t_env: Any, stream: Any, policy: PolicySource, **kwargs: Any) -> Any:
    """A DataStream helper: ``stream`` as a Table (``t_env`` a StreamTableEnvironment),
    :func:`apply_policy`, and back to a DataStream of Rows (keep flag filtered in Flink).

    :func:`collect` on the returned stream is its audited run (a bounded stream:
    the run completes when the job does; see docs/engines/flink.md for unbounded ones).
    """
    out = apply_policy(t_env.from_data_stream(stream), policy, **kwargs)
    bound: _Bound = out._cape_binding  # type: ignore[attr-defined]
    result = t_env.to_data_stream(out)
    result._cape_binding = bound
    result._cape_flagged = t_env.to_data_stream(bound.mapped)
    return result
