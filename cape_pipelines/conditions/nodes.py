"""The row-condition AST and its compiler to pyarrow expressions (see the package docstring).

The nodes are frozen dataclasses, so a parsed condition pickles into a plan;
each node's ``compile`` checks its literals against the column's type (a
:class:`~cape_pipelines.errors.PlanError` otherwise) and builds the Arrow
expression with SQL's three-valued logic. The parser that builds these nodes is
:mod:`.parser`; the column quoting of ``str(node)`` shares its keywords.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import PlanError

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


_KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false"}


_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Literal:
    """A typed constant: ``kind`` is int, decimal, string, bool, date or timestamp."""

    kind: str
    value: Any

    def __str__(self) -> str:
        if self.kind == "string":
            return "'" + str(self.value).replace("'", "''") + "'"
        if self.kind == "bool":
            return "true" if self.value else "false"
        if self.kind in ("date", "timestamp"):
            return f"{self.kind}'{self.value.isoformat()}'"
        return str(self.value)


class Node:
    """Base of the condition AST."""

    def columns(self) -> set[str]:
        """The columns this node reads."""
        raise NotImplementedError

    def compile(self, schema: pa.Schema) -> pc.Expression:
        """This node as a boolean pyarrow expression over ``schema``."""
        raise NotImplementedError


_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


@dataclass(frozen=True)
class Compare(Node):
    """``column op literal`` (a literal on the left is flipped to the right at parse time)."""

    column: str
    op: str
    literal: Literal

    def columns(self) -> set[str]:
        return {self.column}

    def __str__(self) -> str:
        return f"{_quote_column(self.column)} {self.op} {self.literal}"

    def compile(self, schema: pa.Schema) -> pc.Expression:
        field_type = _column_type(schema, self.column)
        exact = _integer_compare(self.column, field_type, self.op, self.literal)
        if exact is not None:
            return exact
        left, values = _coerce(self.column, field_type, [self.literal])
        right = values[0]
        return _nan_is_unknown(field_type, left, _OPS[self.op](left, right))


# The comparison operators a condition may use, as expressions.
_OPS: dict[str, Callable[[pc.Expression, Any], pc.Expression]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _nan_is_unknown(
    field_type: pa.DataType, left: pc.Expression, result: pc.Expression
) -> pc.Expression:
    """``result``, but null where a float column holds NaN.

    IEEE comparisons make NaN false under both ``x < 1000`` and ``x >= 1000``,
    so a NaN row would survive every range condition. NaN is an unknown value,
    like null, so the comparison is unknown and ``row-redact`` removes the row.
    """
    if pa.types.is_dictionary(field_type):
        field_type = field_type.value_type
    if not pa.types.is_floating(field_type):
        return result
    return pc.if_else(pc.is_nan(left), pa.scalar(None, pa.bool_()), result)


@dataclass(frozen=True)
class InList(Node):
    """``column [not] in (literal, ...)``; null when the column is null (SQL semantics)."""

    column: str
    values: tuple[Literal, ...]
    negated: bool = False

    def columns(self) -> set[str]:
        return {self.column}

    def __str__(self) -> str:
        items = ", ".join(str(v) for v in self.values)
        return f"{_quote_column(self.column)} {'not in' if self.negated else 'in'} ({items})"

    def compile(self, schema: pa.Schema) -> pc.Expression:
        field_type = _column_type(schema, self.column)
        exact = _integer_in(self.column, field_type, self.values, self.negated)
        if exact is not None:
            return exact
        left, scalars = _coerce(self.column, field_type, list(self.values))
        value_set = pa.array([s.as_py() for s in scalars], type=scalars[0].type)
        found = pc.is_in(left, value_set=value_set)
        if self.negated:
            found = ~found
        # is_in says false for a null input; SQL (and fail-closed redaction) wants null.
        found = pc.if_else(left.is_valid(), found, pa.scalar(None, pa.bool_()))
        return _nan_is_unknown(field_type, left, found)


@dataclass(frozen=True)
class IsNull(Node):
    """``column is [not] null``; never null itself."""

    column: str
    negated: bool = False

    def columns(self) -> set[str]:
        return {self.column}

    def __str__(self) -> str:
        return f"{_quote_column(self.column)} is {'not ' if self.negated else ''}null"

    def compile(self, schema: pa.Schema) -> pc.Expression:
        _column_type(schema, self.column)
        f = pc.field(self.column)
        return f.is_valid() if self.negated else f.is_null()


def _balanced(exprs: list[pc.Expression], combine: Any) -> pc.Expression:
    """Combine ``exprs`` pairwise, so a 10,000-term condition is an expression of depth 14."""
    while len(exprs) > 1:
        paired = [combine(exprs[i], exprs[i + 1]) for i in range(0, len(exprs) - 1, 2)]
        if len(exprs) % 2:
            paired.append(exprs[-1])
        exprs = paired
    return exprs[0]


@dataclass(frozen=True, init=False)
class And(Node):
    """Kleene conjunction of two or more operands: false wins over null.

    The parser flattens ``a and b and c`` into one node with three operands, so
    a long flat condition neither nests the AST nor the compiled expression
    (both would otherwise be as deep as the condition is long).
    """

    operands: tuple[Node, ...]

    def __init__(self, *operands: Node):
        if len(operands) < 2:
            raise ValueError("and takes at least two operands")
        object.__setattr__(self, "operands", tuple(operands))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.operands)

    def columns(self) -> set[str]:
        return set().union(*(op.columns() for op in self.operands))

    def __str__(self) -> str:
        return "(" + " and ".join(str(op) for op in self.operands) + ")"

    def compile(self, schema: pa.Schema) -> pc.Expression:
        return _balanced([op.compile(schema) for op in self.operands], lambda a, b: a & b)


@dataclass(frozen=True, init=False)
class Or(Node):
    """Kleene disjunction of two or more operands: true wins over null (flattened like And)."""

    operands: tuple[Node, ...]

    def __init__(self, *operands: Node):
        if len(operands) < 2:
            raise ValueError("or takes at least two operands")
        object.__setattr__(self, "operands", tuple(operands))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.operands)

    def columns(self) -> set[str]:
        return set().union(*(op.columns() for op in self.operands))

    def __str__(self) -> str:
        return "(" + " or ".join(str(op) for op in self.operands) + ")"

    def compile(self, schema: pa.Schema) -> pc.Expression:
        return _balanced([op.compile(schema) for op in self.operands], lambda a, b: a | b)


@dataclass(frozen=True)
class Not(Node):
    """Negation; ``not null`` is null."""

    operand: Node

    def columns(self) -> set[str]:
        return self.operand.columns()

    def __str__(self) -> str:
        return f"(not {self.operand})"

    def compile(self, schema: pa.Schema) -> pc.Expression:
        return ~self.operand.compile(schema)


@dataclass(frozen=True)
class Condition:
    """A parsed condition: its source ``text`` and AST ``root``. Build with :func:`parse_condition`.

    >>> import pyarrow as pa
    >>> c = parse_condition("age < 18 or `home country` in ('XX', 'YY')")
    >>> sorted(c.columns())
    ['age', 'home country']
    >>> expr = c.to_expression(pa.schema([("age", pa.int32()), ("home country", pa.string())]))
    """

    text: str
    root: Node

    def columns(self) -> set[str]:
        """Every column the condition reads."""
        return self.root.columns()

    def to_expression(self, schema: pa.Schema) -> pc.Expression:
        """The condition as a boolean expression over ``schema``.

        Raises :class:`~cape_pipelines.errors.PlanError` for an unknown column
        or a literal that cannot be compared with its column's type.
        """
        try:
            return self.root.compile(schema)
        except PlanError as exc:
            raise PlanError(f"condition {self.text!r}: {exc}") from None

    def __str__(self) -> str:
        return str(self.root)


# -- typing literals against columns ---------------------------------------------------


def _quote_column(name: str) -> str:
    if _IDENT_RE.fullmatch(name) and name.lower() not in _KEYWORDS:
        return name
    return "`" + name.replace("`", "``") + "`"


def _column_type(schema: pa.Schema, name: str) -> pa.DataType:
    idx = schema.get_field_index(name)
    if idx < 0:
        known = ", ".join(repr(n) for n in schema.names) or "none"
        raise PlanError(f"unknown column {name!r} (columns: {known})")
    return schema.field(idx).type


def _mismatch(column: str, col_type: pa.DataType, lit: Literal) -> PlanError:
    article = "an" if lit.kind[0] in "aeiou" else "a"
    return PlanError(
        f"column {column!r} is {col_type}, which cannot be compared with {article} "
        f"{lit.kind} literal {lit}"
    )


def _natural_type(lits: Sequence[Literal]) -> pa.DataType:
    """The Arrow type literals have on their own (for a column of Arrow's null type)."""
    kinds = {lit.kind for lit in lits}
    if kinds <= {"int"}:
        return pa.int64()
    if kinds <= {"int", "decimal"}:
        return pa.float64()
    if len(kinds) == 1:
        kind = next(iter(kinds))
        if kind == "timestamp":
            aware = {lit.value.tzinfo is not None for lit in lits}
            return pa.timestamp("us", tz="UTC" if aware == {True} else None)
        return {"string": pa.string(), "bool": pa.bool_(), "date": pa.date32()}[kind]
    raise PlanError("an 'in' list mixes literals of different kinds")


def _exact_number(lit: Literal) -> Fraction | None:
    """A numeric literal as an exact rational (``None`` for other kinds)."""
    if lit.kind == "int":
        return Fraction(lit.value)
    if lit.kind == "decimal" and lit.value.is_finite():
        return Fraction(lit.value)
    return None


def _int_range(t: pa.DataType) -> tuple[int, int]:
    bits = t.bit_width
    if pa.types.is_unsigned_integer(t):
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _known(field: pc.Expression, value: bool) -> pc.Expression:
    """``value`` for every row, but null where the column is null (SQL's unknown)."""
    return pc.if_else(field.is_valid(), pa.scalar(value), pa.scalar(None, pa.bool_()))


def _integer_field(column: str, col_type: pa.DataType) -> tuple[pc.Expression, pa.DataType] | None:
    t = col_type.value_type if pa.types.is_dictionary(col_type) else col_type
    if not pa.types.is_integer(t):
        return None
    field = pc.field(column)
    return (field.cast(t) if t is not col_type else field), t


def _integer_compare(
    column: str, col_type: pa.DataType, op: str, lit: Literal
) -> pc.Expression | None:
    """An integer column against a number, compared exactly in the column's own type.

    Casting to float64 (what a non-integral or out-of-range literal would need) loses
    integers beyond 2**53, and Arrow refuses such a cast, so a policy that validated
    would fail to apply. For integer ``i`` and any number ``x``: ``i < x`` is
    ``i <= floor(x)`` when ``x`` is not whole, and a bound beyond the type's range
    makes the answer the same for every non-null row. ``None``: not this case.
    """
    found = _integer_field(column, col_type)
    x = _exact_number(lit)
    if found is None or x is None:
        return None
    field, t = found
    if x.denominator != 1:
        if op in ("==", "!="):
            return _known(field, op == "!=")
        op, x = (
            ("<=", Fraction(math.floor(x))) if op in ("<", "<=") else (">=", Fraction(math.ceil(x)))
        )
    v = int(x)
    lo, hi = _int_range(t)
    if v < lo:
        return _known(field, op in (">", ">=", "!="))
    if v > hi:
        return _known(field, op in ("<", "<=", "!="))
    right = pa.scalar(v, t)
    return _OPS[op](field, right)


def _integer_in(
    column: str, col_type: pa.DataType, lits: Sequence[Literal], negated: bool
) -> pc.Expression | None:
    """``column [not] in (...)`` for an integer column, exactly: a value that is not a
    whole number, or lies beyond the column type's range, can never be equal."""
    found = _integer_field(column, col_type)
    if found is None:
        return None
    numbers = [_exact_number(lit) for lit in lits]
    if any(x is None for x in numbers):
        return None
    field, t = found
    lo, hi = _int_range(t)
    kept = sorted(
        {int(x) for x in numbers if x is not None and x.denominator == 1 and lo <= x <= hi}
    )
    if not kept:
        return _known(field, negated)
    hit = pc.is_in(field, value_set=pa.array(kept, type=t))
    if negated:
        hit = ~hit
    return pc.if_else(field.is_valid(), hit, pa.scalar(None, pa.bool_()))


def _fits(values: Sequence[Any], typ: pa.DataType) -> bool:
    try:
        arr = pa.array(values, type=typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
        return False
    return arr.to_pylist() == list(values)


def _coerce(
    column: str, col_type: pa.DataType, lits: Sequence[Literal]
) -> tuple[pc.Expression, list[pa.Scalar]]:
    """The column expression (cast if needed) and the literals as scalars of its type."""
    field = pc.field(column)
    t = col_type
    if pa.types.is_dictionary(t):
        field = field.cast(t.value_type)
        t = t.value_type
    if pa.types.is_null(t):
        target = _natural_type(lits)
        if pa.types.is_timestamp(target):
            lits = [_timestamp_literal(lit, target, column, t) for lit in lits]  # type: ignore[misc]
        return field.cast(target), [pa.scalar(_py(lit), type=target) for lit in lits]

    kinds = {lit.kind for lit in lits}

    def refuse() -> PlanError:
        bad = next(
            (lit for lit in lits if lit.kind not in _ACCEPTS.get(_family(t) or "", ())), lits[0]
        )
        return _mismatch(column, col_type, bad)

    family = _family(t)
    if family is None or not kinds <= set(_ACCEPTS[family]):
        raise refuse()

    if family == "integer":
        values: list[Any] = []
        integral = True
        for lit in lits:
            v = lit.value
            if lit.kind == "decimal":
                if v != v.to_integral_value() or not v.is_finite():
                    integral = False
                    break
                v = int(v)
            values.append(v)
        if not integral:
            target = pa.float64()
            return field.cast(target), [pa.scalar(_float(lit.value), target) for lit in lits]
        if _fits(values, t):
            return field, [pa.scalar(v, t) for v in values]
        if all(_INT64_MIN <= v <= _INT64_MAX for v in values) and not pa.types.is_uint64(t):
            return field.cast(pa.int64()), [pa.scalar(v, pa.int64()) for v in values]
        target = pa.float64()
        return field.cast(target), [pa.scalar(_float(v), target) for v in values]
    if family == "float":
        target = pa.float64()
        if not t.equals(target):
            field = field.cast(target)
        return field, [pa.scalar(_float(lit.value), target) for lit in lits]
    if family == "decimal":
        decs = [Decimal(lit.value) for lit in lits]
        if _fits(decs, t):
            return field, [pa.scalar(d, t) for d in decs]
        target = pa.float64()
        return field.cast(target), [pa.scalar(_float(d), target) for d in decs]
    if family == "string":
        if pa.types.is_string_view(t):
            # Acero has no kernels for string_view yet; large_string holds the same values.
            field = field.cast(pa.large_string())
            t = pa.large_string()
        return field, [pa.scalar(lit.value, t) for lit in lits]
    if family == "bool":
        return field, [pa.scalar(lit.value, t) for lit in lits]
    if family == "date":
        return field, [pa.scalar(lit.value, t) for lit in lits]
    # timestamp: literals at microsecond precision (Python's), column upcast if coarser.
    target = t if t.unit in ("us", "ns") else pa.timestamp("us", tz=t.tz)
    if not target.equals(t):
        field = field.cast(target)
    stamps = [_timestamp_literal(lit, target, column, col_type) for lit in lits]
    return field, [pa.scalar(v, target) for v in stamps]


_ACCEPTS: dict[str, tuple[str, ...]] = {
    "integer": ("int", "decimal"),
    "float": ("int", "decimal"),
    "decimal": ("int", "decimal"),
    "string": ("string",),
    "bool": ("bool",),
    "date": ("date",),
    "timestamp": ("date", "timestamp"),
}


def _family(t: pa.DataType) -> str | None:
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_decimal(t):
        return "decimal"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamp"
    return None


def _float(value: int | Decimal) -> float:
    """``value`` as the nearest float; beyond float64's range, an infinity (never OverflowError).

    ``x < 1e400`` is then true for every finite ``x``, as it is for the exact number.
    """
    return float(Decimal(value))


def _py(lit: Literal | dt.datetime) -> Any:
    if isinstance(lit, dt.datetime):
        return lit
    if lit.kind == "decimal":
        return _float(lit.value)
    return lit.value


def _timestamp_literal(
    lit: Literal, target: pa.DataType, column: str, col_type: pa.DataType
) -> dt.datetime:
    """A date or timestamp literal as the datetime to compare with a timestamp column."""
    value = lit.value
    if lit.kind == "date":
        value = dt.datetime(value.year, value.month, value.day)
    aware_column = target.tz is not None
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC) if aware_column else value
    if not aware_column:
        raise PlanError(
            f"column {column!r} is {col_type} (no time zone), so the literal {lit} "
            "must not carry a UTC offset"
        )
    return value.astimezone(dt.UTC)
