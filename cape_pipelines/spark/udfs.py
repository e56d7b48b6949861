"""SQL functions for the column transformations: ``cape_tokenize(email, 'email-key')`` and kin.

Each function is an Arrow-batched Spark UDF (``arrow_udf``) that builds the
same core :class:`~cape_pipelines.transforms.base.Transformation` a policy
would (from the registry, with the call's parameters) and applies it to the
batch's Arrow array, so a value equals the policy path's byte for byte.

Keys are referenced by name. The keys the driver has when :func:`register_udfs`
runs (``keys=``, its ``CAPE_KEY_*`` environment variables) reach the executors
by reference, never as bytes in the UDF closure (see
:func:`cape_pipelines.keys.shipped_keys` and docs/keys.md): on a local master
through the run's private key directory; on a remote cluster each executor
reads ``CAPE_KEY_<NAME>`` from its own environment (``keys=`` is refused
there). ``CAPE_KEYS_DIR`` is read on the executors too. Key material is never
a SQL literal. A name no provider had is an error naming the key when the
function runs.

A Spark UDF has one return type, so a transformation whose output type
follows its input has one function per output type: ``cape_round`` (DOUBLE)
and ``cape_round_long`` (BIGINT); ``cape_truncate_date`` (DATE) and
``cape_truncate_timestamp`` (TIMESTAMP); and so on. The input is transformed
in its own type by the core and then cast to the function's type.

Perturbation noise depends on the column name (POLICY.md, determinism), which
a UDF cannot see: the perturbation functions take it as an optional last
argument — ``cape_perturb_number(salary, 'k', -5, 5, 'salary')`` equals a
policy's perturbation of column ``salary``; without it the name is ``''``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import types as T

from .._workers import spark_session_workers
from ..errors import TransformError
from ..keys import KEYS_DIR_ENV, ShippedKeys, env_var_name, parse_key_ref, shipped_keys
from ..policy.load import build_transformation
from ..transforms.base import ColumnContext, ColumnTransformation, SqlFunction
from ..transforms.registry import registered
from .convert import to_arrow, to_spark, wire_type

# A built transformation, its key bytes, the column name it sees, and its memo.
Built = tuple[ColumnTransformation, bytes | None, str, dict[str, Any]]


@dataclass(frozen=True)
class UdfSpec:
    """One SQL function: a transformation's declared :class:`SqlFunction`, with its Spark type."""

    name: str
    type_name: str
    function: SqlFunction
    returns: T.DataType

    @property
    def args(self) -> tuple[str, ...]:
        """The argument names after the column."""
        return tuple(a.name for a in self.function.args)

    @property
    def required(self) -> int:
        """How many arguments after the column must be given."""
        return sum(1 for a in self.function.args if a.required)

    @property
    def keyed(self) -> bool:
        """Whether the first argument names a key."""
        return any(a.role == "key" for a in self.function.args)

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


def _specs() -> list[UdfSpec]:
    """The table, derived from what each registered transformation declares."""
    specs = []
    for cls in registered():
        if not issubclass(cls, ColumnTransformation):
            continue
        for fn in cls.sql_functions:
            name = "cape_" + fn.name
            specs.append(UdfSpec(name, cls.type_name, fn, to_spark(fn.returns, name)))
    return specs


SPECS: dict[str, UdfSpec] = {s.name: s for s in _specs()}


def _literal(spec: UdfSpec, index: int, array: pa.Array) -> Any:
    """The one value of a literal argument; a varying argument is an error naming it."""
    if len(array) and array.null_count not in (0, len(array)):
        raise TransformError(f"{spec.signature}: argument {spec.args[index]!r} must be a literal")
    value = array[0].as_py()
    if len(array) > 1 and len(array.unique()) > 1:
        raise TransformError(f"{spec.signature}: argument {spec.args[index]!r} must be a literal")
    return value


class UdfFunction:
    """The Python side of one SQL function: literal arguments -> a core transformation.

    ``resolver`` holds references to the driver's keys; ``tz`` is the session
    time zone (timestamps are transformed in it, as on the policy path). The
    built transformation and its memo are kept per distinct argument tuple,
    per Python worker.
    """

    def __init__(self, spec: UdfSpec, resolver: ShippedKeys, tz: str):
        self.spec = spec
        self.resolver = resolver
        self.tz = tz
        self.out_type = wire_type(to_arrow(spec.returns, tz, spec.name))
        self._built: dict[tuple[Any, ...], Built] = {}

    def __repr__(self) -> str:
        return f"UdfFunction({self.spec.name})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_built": {}}

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

    def __call__(self, col: pa.Array, *args: pa.Array) -> pa.Array:
        if len(col) == 0:
            return pa.array([], self.out_type)
        literals = [_literal(self.spec, i, a) for i, a in enumerate(args)]
        transform, secret, column, state = self._build(literals)
        if pa.types.is_timestamp(col.type) and col.type.tz is not None:
            col = col.cast(pa.timestamp(col.type.unit, tz=self.tz))
        out_type = transform.output_type(col.type, column or self.spec.name)
        batch = pa.RecordBatch.from_arrays([col], names=[column or "value"])
        ctx = ColumnContext(column=column, key=secret, batch=batch, state=state)
        out = transform.apply(col, ctx)
        if not out.type.equals(out_type):
            out = out.cast(out_type)
        return out.cast(self.out_type)


def _as_function(call: UdfFunction) -> Callable[..., pa.Array]:
    """A plain function around ``call``: Spark reads a UDF's kind from a function's type hints."""

    def cape_udf(col: pa.Array, *args: pa.Array) -> pa.Array:
        return call(col, *args)

    cape_udf.__name__ = call.spec.name
    return cape_udf


def register_udfs(
    spark: SparkSession,
    *,
    keys: Mapping[str, bytes | str] | None = None,
    prefix: str = "cape_",
) -> list[str]:
    """Register the ``cape_*`` SQL functions on ``spark``; returns their names.

    >>> register_udfs(spark, keys={"email-key": b"..."})  # doctest: +SKIP
    >>> spark.sql("SELECT cape_tokenize(email, 'email-key') AS email FROM t")  # doctest: +SKIP
    """
    from pyspark.sql.functions import arrow_udf

    environ = {k: v for k, v in os.environ.items() if k.startswith(env_var_name(""))}
    if os.environ.get(KEYS_DIR_ENV):
        environ[KEYS_DIR_ENV] = os.environ[KEYS_DIR_ENV]
    resolver = shipped_keys(keys, environ, spark_session_workers(spark))
    tz = spark.conf.get("spark.sql.session.timeZone") or "UTC"
    names = []
    for spec in SPECS.values():
        name = prefix + spec.name.removeprefix("cape_")
        fn = _as_function(UdfFunction(spec, resolver, tz))
        spark.udf.register(name, arrow_udf(fn, returnType=spec.returns))
        names.append(name)
    return names
