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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pyflink.table import DataTypes, Table, TableEnvironment
from pyflink.table.expressions import col
from pyflink.table.types import DataType
from pyflink.table.udf import udf

from ..audit import AuditTarget
from ..core import ColumnCounter, Counters, apply_batch
from ..errors import PlanError
from ..keys import KeyResolver
from ..plan import Plan, build_plan
from ..policy.load import PolicySource
from ..seam import Binding, bind

ENGINE = "flink"
KEEP = "__cape_keep"


# -- types ----------------------------------------------------------------------------------


def to_flink(t: pa.DataType, column: str = "?") -> DataType:
    """The Flink SQL type for an Arrow type (the types Flink's pandas UDFs carry exactly)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return DataTypes.STRING()
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


def schema_to_arrow(table: Table) -> pa.Schema:
    s = table.get_schema()
    return pa.schema(
        [
            pa.field(n, to_arrow(t, n))
            for n, t in zip(s.get_field_names(), s.get_field_data_types(), strict=True)
        ]
    )


def row_type(schema: pa.Schema) -> DataType:
    return DataTypes.ROW([DataTypes.FIELD(f.name, to_flink(f.type, f.name)) for f in schema])


# -- the mapped function -------------------------------------------------------------------


class PolicyMapper:
    """The pandas UDF body: one batch through the core, same length out, plus the keep flag."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __repr__(self) -> str:
        return f"PolicyMapper({self.plan!r})"

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        n = len(df)
        batch = pa.RecordBatch.from_pandas(
            df.reset_index(drop=True), schema=self.plan.input_schema, preserve_index=False
        )
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
            # Plain numpy/object columns: PyFlink's conversion back to Arrow takes no
            # pandas extension dtypes; it casts to the declared Flink type itself.
            columns[field.name] = arr.to_pandas()
        columns[KEEP] = keep
        return pd.DataFrame(columns)


@dataclass
class _Bound:
    binding: Binding
    plan: Plan
    mapped: Table


def apply_policy(
    table: Table,
    policy: PolicySource,
    *,
    keys: Mapping[str, bytes | str] | None = None,
    audit: AuditTarget = None,
    column_tags: Mapping[str, Sequence[str]] | None = None,
    resolver: KeyResolver | None = None,
    client: Any = None,
) -> Table:
    """Apply ``policy`` to a PyFlink Table; a Table comes back (lazy, like every Flink Table).

    Collect it with :func:`collect` for an audited run. With ``client=`` the
    policy is a label on the coordinator (see :mod:`cape_pipelines.source`).
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
    )
    # Built without a record, as before: the job has not started until collect().
    plan = binding.build(schema_to_arrow(table))
    out_type = DataTypes.ROW(
        [DataTypes.FIELD(f.name, to_flink(f.type, f.name)) for f in plan.output_schema]
        + [DataTypes.FIELD(KEEP, DataTypes.BOOLEAN())]
    )
    mapper = udf(PolicyMapper(plan), result_type=out_type, func_type="pandas")
    mapped = table.map(mapper)
    out = mapped.filter(col(KEEP)).drop_columns(col(KEEP))
    out._cape_binding = _Bound(binding, plan, mapped)  # type: ignore[attr-defined]
    return out


def counters_from_table(plan: Plan, table: pa.Table, rows_in: int) -> Counters:
    counters = Counters(rows_in=rows_in, rows_out=table.num_rows)
    for name, types in plan.transformed_columns.items():
        nulls = table.column(name).null_count
        counters.columns[name] = ColumnCounter(types, table.num_rows - nulls, nulls)
    return counters


def collect(out: Table) -> pa.Table:
    """Run the job and return the protected rows as Arrow: one audited run."""
    bound: _Bound | None = getattr(out, "_cape_binding", None)
    if bound is None:
        raise TypeError("collect() takes the Table returned by cape_pipelines.flink.apply_policy")
    with bound.binding.run(bound.plan) as run:
        df = bound.mapped.to_pandas()
        rows_in = len(df)
        kept = df[df[KEEP].astype(bool)].drop(columns=[KEEP]).reset_index(drop=True)
        table = pa.Table.from_pandas(kept, schema=bound.plan.output_schema, preserve_index=False)
        run.counters = counters_from_table(bound.plan, table, rows_in)
    return table


def apply_to_stream(t_env: Any, stream: Any, policy: PolicySource, **kwargs: Any) -> Any:
    """A DataStream helper: ``stream`` as a Table (``t_env`` a StreamTableEnvironment),
    :func:`apply_policy`, and back to a DataStream of Rows (keep flag filtered in Flink)."""
    return t_env.to_data_stream(apply_policy(t_env.from_data_stream(stream), policy, **kwargs))


# -- SQL functions ---------------------------------------------------------------------------


class _TokenizeFn:
    """``cape_tokenize(value, key_name)``: the tokenizer transformation, batch by batch."""

    def __init__(self, keys: Mapping[str, bytes | str]):
        self.keys = dict(keys)
        self._plans: dict[str, Plan] = {}

    def __repr__(self) -> str:
        return f"_TokenizeFn(keys={sorted(self.keys)})"

    def __getstate__(self) -> dict[str, Any]:
        return {"keys": self.keys, "_plans": {}}

    def _plan(self, key: str) -> Plan:
        plan = self._plans.get(key)
        if plan is None:
            policy = {
                "label": "cape-sql",
                "rules": [
                    {
                        "match": {"name": "v"},
                        "actions": [{"transform": {"type": "tokenizer", "key": {"secret": key}}}],
                    }
                ],
            }
            plan = build_plan(policy, pa.schema([("v", pa.string())]), keys=self.keys)
            self._plans[key] = plan
        return plan

    def __call__(self, values: pd.Series, key_names: pd.Series | str) -> pd.Series:
        # A literal argument arrives as a scalar, a column reference as a Series.
        if not isinstance(key_names, pd.Series):
            key_names = pd.Series([key_names] * len(values))
        result = pd.Series([None] * len(values), dtype=object)
        for key in pd.unique(key_names):
            mask = (key_names == key).to_numpy()
            batch = pa.record_batch([pa.array(values[mask].tolist(), pa.string())], names=["v"])
            out, _, _ = apply_batch(self._plan(str(key)), batch)
            result[mask] = out.column(0).to_pylist()
        return result


def register_functions(t_env: TableEnvironment, keys: Mapping[str, bytes | str]) -> list[str]:
    """Register cape's SQL functions on ``t_env`` (keys given here are shipped with them)."""
    fn = udf(
        _TokenizeFn(keys),
        result_type=DataTypes.STRING(),
        func_type="pandas",
    )
    t_env.create_temporary_system_function("cape_tokenize", fn)
    return ["cape_tokenize"]
