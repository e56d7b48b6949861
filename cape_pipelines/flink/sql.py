"""Flink SQL functions for the column transformations: ``cape_tokenize(email, 'k')`` and kin.

The same table as Spark's (``cape_pipelines.spark.udfs``): every registered
column transformation's declared :class:`~cape_pipelines.transforms.base.SqlFunction`
becomes a Flink pandas UDF of that name, so PyFlink hands it a batch (a pandas
Series per argument; a literal argument as one Python value). The batch becomes
an Arrow array, goes through the core transformation built from the registry
with the call's literal parameters, and comes back cast to the function's
declared type, so a value equals the policy path's byte for byte.

Keys are referenced by name, resolved when :func:`register_functions` runs
(``keys=`` first, then the ``CAPE_KEY_*`` environment). What travels inside
the pickled UDF to Flink's Python workers is a reference per key, never its
bytes (:func:`cape_pipelines.keys.shipped_keys`, as for Spark's SQL
functions): on the embedded mini-cluster each key is written to the run's
private key directory on this host (docs/keys.md); for a remote target,
environment keys are read from each worker's own ``CAPE_KEY_*`` and keys given
as bytes are refused with the fix named. ``worker_keys="inline"`` is the
explicit opt-in to ship the bytes. A key name no provider had is an error
naming the key when the function runs.

Two things PyFlink decides before the function sees a value: a nullable integer
column arrives as pandas ``float64`` (NaN for null), so the ``*_long`` functions
(integer in, integer out) read a float64 batch back as int64, and a function
whose result depends on the input type (``cape_tokenize``...) needs such a
column cast in SQL (``CAST(age AS STRING)``); and ``TIMESTAMP_LTZ`` values
cross as the session zone's wall-clock time, exact only in a zone without
daylight saving (docs/engines/flink.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pyflink.table import TableEnvironment
from pyflink.table.types import DataType
from pyflink.table.udf import udf

from ..errors import TransformError
from ..keys import (
    INLINE,
    KEYS_DIR_ENV,
    KeyResolver,
    ShippedKeys,
    env_var_name,
    parse_key_ref,
    shipped_keys,
)
from ..policy.load import build_transformation
from ..seam import WorkerKeysSetting
from ..transforms.base import ColumnContext, ColumnTransformation, SqlFunction
from ..transforms.registry import registered

# A built transformation, its key bytes, the column name it sees, and its memo.
Built = tuple[ColumnTransformation, "bytes | None", str, dict[str, Any]]


@dataclass(frozen=True)
class FunctionSpec:
    """One SQL function: a transformation's declared :class:`SqlFunction`."""

    name: str
    type_name: str
    function: SqlFunction

    @property
    def args(self) -> tuple[str, ...]:
        """The argument names after the column."""
        return tuple(a.name for a in self.function.args)

    @property
    def required(self) -> int:
        """How many arguments after the column must be given."""
        return sum(1 for a in self.function.args if a.required)

    @property
    def column_arg(self) -> bool:
        """Whether the last argument names the column the transformation sees."""
        return any(a.role == "column" for a in self.function.args)

    @property
    def signature(self) -> str:
        """``name(col, arg, [opt])`` for error messages and docs."""
        parts = ["col", *self.args[: self.required]]
        parts += [f"[{a}]" for a in self.args[self.required :]]
        return f"{self.name}({', '.join(parts)})"


def specs() -> dict[str, FunctionSpec]:
    """The table, derived from what each registered transformation declares."""
    out = {}
    for cls in registered():
        if not issubclass(cls, ColumnTransformation):
            continue
        for fn in cls.sql_functions:
            out["cape_" + fn.name] = FunctionSpec("cape_" + fn.name, cls.type_name, fn)
    return out


def result_type(t: pa.DataType, name: str) -> DataType:
    """The Flink type a function returns (a zoned timestamp is a ``TIMESTAMP_LTZ``)."""
    from .apply import to_flink

    return to_flink(t, name)


def to_arrow_array(values: pd.Series, integral: bool) -> pa.Array:
    """A batch argument as Arrow. ``integral``: a float64 batch is a nullable integer column."""
    if integral and values.dtype == np.float64:
        finite = values.dropna()
        if not (finite == np.floor(finite)).all():
            raise TransformError("an integer function got a column with fractional values")
        mask = values.isna().to_numpy()
        return pa.array(values.fillna(0).to_numpy().astype(np.int64), mask=mask)
    return pa.Array.from_pandas(values)


def to_series(arr: pa.Array) -> pd.Series:
    """A result as the pandas Series PyFlink converts back to the declared Flink type."""
    if pa.types.is_integer(arr.type) and arr.null_count:
        # Python ints (object): float64 would round large values, and PyFlink's
        # conversion takes no pandas extension dtypes.
        values = arr.fill_null(0).to_numpy().astype(object)
        values[arr.is_null().to_numpy(zero_copy_only=False)] = None
        return pd.Series(values, dtype=object)
    if pa.types.is_date(arr.type):
        return pd.Series(arr.to_pylist(), dtype=object)
    return arr.to_pandas()


class FlinkFunction:
    """The Python side of one SQL function: literal arguments -> a core transformation.

    ``resolver`` holds the keys resolved at registration. The built
    transformation and its memo are kept per distinct argument tuple, per
    Python worker (never pickled).
    """

    def __init__(self, spec: FunctionSpec, resolver: KeyResolver | ShippedKeys):
        self.spec = spec
        self.resolver = resolver
        self._built: dict[tuple[Any, ...], Built] = {}

    def __repr__(self) -> str:
        return f"FlinkFunction({self.spec.name})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_built": {}}

    def _literal(self, index: int, value: Any) -> Any:
        """A literal argument's one value; a column reference that varies is an error."""
        if not isinstance(value, pd.Series):
            return value
        distinct = pd.unique(value)
        if len(distinct) > 1:
            raise TransformError(
                f"{self.spec.signature}: argument {self.spec.args[index]!r} must be a literal"
            )
        if not len(distinct) or pd.isna(distinct[0]):
            return None
        one = distinct[0]
        return one.item() if isinstance(one, np.generic) else one

    def _build(self, args: list[Any]) -> Built:
        key = tuple(args)
        found = self._built.get(key)
        if found is not None:
            return found
        spec = self.spec
        if len(args) < spec.required or len(args) > len(spec.args):
            raise TransformError(f"{spec.signature}: wrong number of arguments ({len(args) + 1})")
        if any(a is None for a in args[: spec.required]):
            raise TransformError(f"{spec.signature}: arguments may not be NULL")
        column = ""
        if spec.column_arg and len(args) == len(spec.args) and args[-1] is not None:
            column = str(args[-1])
        params = spec.function.params(list(args))
        secret: bytes | None = None
        for arg, value in zip(spec.function.args, args, strict=False):
            if arg.role == "key":
                ref = parse_key_ref({"secret": str(value)})
                secret = self.resolver.resolve(ref)
                params[arg.param or arg.name] = ref
        transform = build_transformation(spec.type_name, params, spec.signature)
        if not isinstance(transform, ColumnTransformation):
            raise TransformError(
                f"{spec.signature}: {spec.type_name} is not a column transformation"
            )
        built: Built = (transform, secret, column, {})
        self._built[key] = built
        return built

    def __call__(self, values: pd.Series, *args: Any) -> pd.Series:
        out_type = self.spec.function.returns
        if len(values) == 0:
            return to_series(pa.array([], out_type))
        literals = [self._literal(i, a) for i, a in enumerate(args)]
        transform, secret, column, state = self._build(literals)
        col = to_arrow_array(values.reset_index(drop=True), pa.types.is_integer(out_type))
        if pa.types.is_null(col.type):
            # An all-null batch: nulls stay null in every transformation.
            return to_series(pa.nulls(len(col), out_type))
        want = transform.output_type(col.type, column or self.spec.name)
        batch = pa.RecordBatch.from_arrays([col], names=[column or "value"])
        ctx = ColumnContext(column=column, key=secret, batch=batch, state=state)
        out = transform.apply(col, ctx)
        if not out.type.equals(want):
            out = out.cast(want)
        return to_series(out.cast(out_type))


def functions(
    t_env: TableEnvironment,
    keys: Mapping[str, bytes | str] | None = None,
    *,
    prefix: str = "cape_",
    worker_keys: WorkerKeysSetting = None,
) -> dict[str, Any]:
    """The ``cape_*`` SQL functions as PyFlink UDFs, by name (what :func:`register_functions`
    registers; each is pickled and shipped to Flink's Python workers as it is)."""
    from .apply import flink_workers

    environ = {k: v for k, v in os.environ.items() if k.startswith(env_var_name(""))}
    if os.environ.get(KEYS_DIR_ENV):
        environ[KEYS_DIR_ENV] = os.environ[KEYS_DIR_ENV]
    shipped: KeyResolver | ShippedKeys
    if worker_keys == INLINE:
        shipped = KeyResolver(keys, environ=environ)
    elif worker_keys is None:
        shipped = shipped_keys(keys, environ, flink_workers(t_env))
    else:
        raise TypeError("register_functions takes worker_keys=None or 'inline'")
    out = {}
    for spec in specs().values():
        name = prefix + spec.name.removeprefix("cape_")
        out[name] = udf(
            FlinkFunction(spec, shipped),
            result_type=result_type(spec.function.returns, name),
            func_type="pandas",
        )
    return out


def register_functions(
    t_env: TableEnvironment,
    keys: Mapping[str, bytes | str] | None = None,
    *,
    prefix: str = "cape_",
    worker_keys: WorkerKeysSetting = None,
) -> list[str]:
    """Register the ``cape_*`` SQL functions on ``t_env``; returns their names.

    >>> register_functions(t_env, keys={"email-key": b"..."})  # doctest: +SKIP
    >>> t_env.sql_query("SELECT cape_tokenize(email, 'email-key') FROM t")  # doctest: +SKIP
    """
    made = functions(t_env, keys, prefix=prefix, worker_keys=worker_keys)
    for name, fn in made.items():
        t_env.create_temporary_system_function(name, fn)
    return list(made)
