"""SQL functions for the column transformations: ``cape_tokenize(email, 'email-key')`` and kin.

Each function is an Arrow-batched Spark UDF (``arrow_udf``) that builds the
same core :class:`~cape_pipelines.transforms.base.Transformation` a policy
would (from the registry, with the call's parameters) and applies it to the
batch's Arrow array, so a value equals the policy path's byte for byte.

Keys are referenced by name. The names are resolved on the driver, when
:func:`register_udfs` runs, from ``keys=`` and the driver's ``CAPE_KEY_*``
environment variables; the resolved bytes travel inside the UDF closure to
the executors. Key material is never a SQL literal. A name no provider had is
an error naming the key when the function runs.

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
from decimal import Decimal
from typing import Any

import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import types as T

from ..errors import TransformError
from ..keys import KeyResolver, env_var_name, parse_key_ref
from ..policy.load import build_transformation
from ..transforms.base import ColumnContext, Transformation
from .types import to_arrow, wire_type

Params = Callable[[list[Any]], dict[str, Any]]


@dataclass(frozen=True)
class UdfSpec:
    """One SQL function: its name, transformation type, argument names and return type."""

    name: str
    type_name: str
    args: tuple[str, ...]
    required: int
    returns: T.DataType
    params: Params
    keyed: bool = True
    column_arg: bool = False

    @property
    def signature(self) -> str:
        """``name(col, arg, [opt])`` for error messages and docs."""
        parts = ["col", *self.args[: self.required]]
        parts += [f"[{a}]" for a in self.args[self.required :]]
        return f"{self.name}({', '.join(parts)})"


def _number(value: Any) -> int | float:
    """A SQL numeric literal as a Python number (SQL's ``-2.5`` arrives as a Decimal)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _tokenize(a: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if len(a) > 1 and a[1] is not None:
        out["max_token_len"] = int(a[1])
    if len(a) > 2 and a[2] is not None:
        out["algorithm"] = a[2]
    return out


def _perturb_number(a: list[Any]) -> dict[str, Any]:
    return {"min": _number(a[1]), "max": _number(a[2])}


def _perturb_date(a: list[Any]) -> dict[str, Any]:
    return {"frequency": a[1], "min": _number(a[2]), "max": _number(a[3])}


def _specs() -> list[UdfSpec]:
    date, ts = T.DateType(), T.TimestampType()
    truncate: Params = lambda a: {"frequency": a[0]}  # noqa: E731
    rnd: Params = lambda a: {"precision": int(a[0])}  # noqa: E731
    none: Params = lambda a: {}  # noqa: E731
    return [
        UdfSpec(
            "cape_tokenize",
            "tokenizer",
            ("key", "max_len", "algorithm"),
            1,
            T.StringType(),
            _tokenize,
        ),
        UdfSpec(
            "cape_tokenize_reversible", "reversible-tokenizer", ("key",), 1, T.StringType(), none
        ),
        UdfSpec("cape_reveal", "token-reverser", ("key",), 1, T.StringType(), none),
        UdfSpec(
            "cape_round", "numeric-rounding", ("precision",), 1, T.DoubleType(), rnd, keyed=False
        ),
        UdfSpec(
            "cape_round_long", "numeric-rounding", ("precision",), 1, T.LongType(), rnd, keyed=False
        ),
        UdfSpec(
            "cape_truncate_date", "date-truncation", ("frequency",), 1, date, truncate, keyed=False
        ),
        UdfSpec(
            "cape_truncate_timestamp",
            "date-truncation",
            ("frequency",),
            1,
            ts,
            truncate,
            keyed=False,
        ),
        UdfSpec(
            "cape_perturb_number",
            "numeric-perturbation",
            ("key", "min", "max", "column"),
            3,
            T.DoubleType(),
            _perturb_number,
            column_arg=True,
        ),
        UdfSpec(
            "cape_perturb_number_long",
            "numeric-perturbation",
            ("key", "min", "max", "column"),
            3,
            T.LongType(),
            _perturb_number,
            column_arg=True,
        ),
        UdfSpec(
            "cape_perturb_date",
            "date-perturbation",
            ("key", "frequency", "min", "max", "column"),
            4,
            date,
            _perturb_date,
            column_arg=True,
        ),
        UdfSpec(
            "cape_perturb_timestamp",
            "date-perturbation",
            ("key", "frequency", "min", "max", "column"),
            4,
            ts,
            _perturb_date,
            column_arg=True,
        ),
    ]


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

    ``resolver`` holds the keys resolved on the driver; ``tz`` is the session
    time zone (timestamps are transformed in it, as on the policy path). The
    built transformation and its memo are kept per distinct argument tuple,
    per Python worker.
    """

    def __init__(self, spec: UdfSpec, resolver: KeyResolver, tz: str):
        self.spec = spec
        self.resolver = resolver
        self.tz = tz
        self.out_type = wire_type(to_arrow(spec.returns, tz, spec.name))
        self._built: dict[tuple[Any, ...], tuple[Transformation, bytes | None, str, dict]] = {}

    def __repr__(self) -> str:
        return f"UdfFunction({self.spec.name})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_built": {}}

    def _build(self, args: list[Any]) -> tuple[Transformation, bytes | None, str, dict]:
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
        params = spec.params(list(args))
        secret: bytes | None = None
        if spec.keyed:
            ref = parse_key_ref({"secret": str(args[0])})
            secret = self.resolver.resolve(ref)
            params["key"] = ref
        transform = build_transformation(spec.type_name, params, spec.signature)
        built = (transform, secret, column, {})
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
    resolver = KeyResolver(keys, environ=environ)
    tz = spark.conf.get("spark.sql.session.timeZone") or "UTC"
    names = []
    for spec in SPECS.values():
        name = prefix + spec.name.removeprefix("cape_")
        fn = _as_function(UdfFunction(spec, resolver, tz))
        spark.udf.register(name, arrow_udf(fn, returnType=spec.returns))
        names.append(name)
    return names
