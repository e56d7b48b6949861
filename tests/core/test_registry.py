"""The transformation registry: kinds, third-party registration, derived SQL signatures."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pytest

from cape_pipelines.plan import ColumnStep, DropStep, FilterStep, build_plan
from cape_pipelines.transforms import (
    ColumnContext,
    ColumnTransformation,
    SqlArg,
    SqlFunction,
    Transformation,
    known_types,
    register,
    registered,
)


class _NoKind(Transformation):
    type_name: ClassVar[str] = "test-no-kind"


class _Doubler(ColumnTransformation):
    type_name: ClassVar[str] = "test-doubler"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (
        SqlFunction("test_double", (SqlArg("times", convert=int, required=False),), pa.int64()),
    )
    times: int = 2

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        return pa.int64()

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        return pa.array([None if v is None else v * self.times for v in array.to_pylist()])


def test_a_class_of_no_kind_is_refused_naming_the_kinds() -> None:
    with pytest.raises(TypeError, match="ColumnTransformation, ColumnDrop, RowFilter"):
        register(_NoKind)
    assert "test-no-kind" not in known_types()


def test_every_builtin_is_registered_once_with_a_kind() -> None:
    names = [c.type_name for c in registered()]
    assert len(names) == len(set(names))
    for t in ("tokenizer", "column-redact", "row-redact", "numeric-rounding"):
        assert t in names


def test_the_plan_dispatches_on_the_kind_class() -> None:
    register(_Doubler)
    policy = {
        "label": "kinds",
        "rules": [
            {"match": {"name": "a"}, "actions": [{"transform": {"type": "test-doubler"}}]},
            {"actions": [{"transform": {"type": "row-redact", "condition": "a > 10"}}]},
            {"actions": [{"transform": {"type": "column-redact", "columns": ["b"]}}]},
        ],
    }
    plan = build_plan(policy, pa.schema([("a", pa.int64()), ("b", pa.string())]))
    assert [type(s) for s in plan.steps] == [ColumnStep, FilterStep, DropStep]


def test_spark_sql_functions_are_derived_from_the_declarations() -> None:
    pytest.importorskip("pyspark")
    register(_Doubler)
    from cape_pipelines.spark import udfs

    specs = {s.name: s for s in udfs._specs()}
    spec = specs["cape_test_double"]
    assert spec.type_name == "test-doubler"
    assert spec.signature == "cape_test_double(col, [times])"
    assert not spec.keyed
    # The built-in table is exactly what the transformations declare, in their order.
    assert list(udfs.SPECS)[:3] == ["cape_tokenize", "cape_tokenize_reversible", "cape_reveal"]
