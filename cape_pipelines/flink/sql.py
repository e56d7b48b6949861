"""Flink SQL functions for the column transformations: ``cape_tokenize(email, 'k')`` and kin.

The same table as Spark's (``cape_pipelines.spark.udfs``): every registered
column transformation's declared :class:`~cape_pipelines.transforms.base.SqlFunction`
becomes a Flink pandas UDF of that name, so PyFlink hands it a batch (a pandas
Series per argument; a literal argument as one Python value). The batch becomes
an Arrow array, goes through the core transformation built from the registry
with the call's literal parameters, and comes back cast to the function's
declared type, so a value equals the policy path's byte for byte.

Keys are referenced by name, resolved when :func:`register_functions` runs
(``keys=`` first, then the ``CAPE_KEY_*`` environment). What travels inside the
pickled UDF to Flink's Python workers is a reference per key, never its bytes
(:class:`ShippedKeys`): on the embedded mini-cluster each key is written to the
run's private key directory on this host (docs/keys.md); for a remote target,
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

from ..errors import KeyMissingError, TransformError
from ..keys import (
    INLINE,
    EnvKeys,
    KeyRef,
    KeyResolver,
    KeyShippingError,
    RunSecrets,
    WorkerKeyProvider,
    Workers,
    decode_key_text,
    env_var_name,
    parse_key_ref,
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


class ShippedKeys:
    """The SQL functions' keys as shipped to workers: a reference per key, never its bytes.

    ``named``: a ``keys=`` name -> (provider, entry); ``by_env``: a ``CAPE_KEY_*``
    variable -> (provider, entry), looked up after ``named``, as the driver's
    resolver does. ``env_on_workers``: remote workers read ``CAPE_KEY_*`` from
    their own environment. Resolved keys are cached per worker process.
    """

    def __init__(
        self,
        named: dict[str, tuple[WorkerKeyProvider, str]],
        by_env: dict[str, tuple[WorkerKeyProvider, str]],
        env_on_workers: bool,
    ):
        self.named = named
        self.by_env = by_env
        self.env_on_workers = env_on_workers
        self._cache: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"ShippedKeys({sorted(self.named)}, {sorted(self.by_env)})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def resolve(self, ref: KeyRef) -> bytes:
        """The key bytes for a named ``ref``, read where the reference says."""
        name = str(ref.secret)
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        var = env_var_name(name)
        found = self.named.get(name) or self.by_env.get(var)
        value: bytes | None = None
        if found is not None:
            provider, entry = found
            value = provider.fetch(entry)
        elif self.env_on_workers:
            value = EnvKeys().fetch(name)
        if value is None:
            raise KeyMissingError(name, ["keys=", var])
        self._cache[name] = value
        return value


def ship_keys(
    keys: Mapping[str, bytes | str] | None,
    environ: Mapping[str, str],
    workers: Workers,
    worker_keys: WorkerKeysSetting,
) -> KeyResolver | ShippedKeys:
    """What the SQL functions carry to ``workers`` to find their keys (see the module doc)."""
    resolver = KeyResolver(keys, environ=environ)
    if worker_keys == INLINE:
        return resolver
    if worker_keys is not None:
        raise TypeError("register_functions takes worker_keys=None or 'inline'")
    secrets: RunSecrets | None = None

    def on_this_host(value: bytes, what: str) -> tuple[WorkerKeyProvider, str]:
        nonlocal secrets
        if not workers.local:
            raise KeyShippingError(
                f"{what} exists only in this process, and Flink's workers ({workers.where}) "
                "are not on this host: give the workers the key as CAPE_KEY_<NAME> or a "
                "mounted secret directory, or pass worker_keys='inline' to ship the key "
                "bytes in the job, which anyone who can read the job can then read"
            )
        if secrets is None:
            secrets = RunSecrets()
        return secrets, secrets.add(value)

    named = {
        name: on_this_host(resolver.resolve(parse_key_ref({"secret": name})), f"key {name!r}")
        for name in (keys or {})
    }
    by_env: dict[str, tuple[WorkerKeyProvider, str]] = {}
    if workers.local:
        # Local workers may have started before a variable was set here: ship a reference.
        for var, text in environ.items():
            by_env[var] = on_this_host(decode_key_text(text, f"environment variable {var}"), var)
    return ShippedKeys(named, by_env, env_on_workers=not workers.local)


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
    shipped = ship_keys(keys, environ, flink_workers(t_env), worker_keys)
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
