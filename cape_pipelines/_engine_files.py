"""What the ``cape apply --engine beam|dask|spark`` file engines share.

Each engine reads the input with its own reader and runs the policy through
its own adapter, whose plan is built on the engine's view of the schema (a
Spark ``TIMESTAMP`` is microseconds, a Dask string column may be
``large_string``). Before its batches reach the shared writer they are put
back into the types of the plan ``cape apply`` built on the input
(:func:`conform`), and the run's counts are taken from those batches, the data
actually written (:func:`count_output`).
"""

from __future__ import annotations

import pyarrow as pa

from .core import Counters
from .errors import DataError
from .plan import Plan


def conform(plan: Plan, data: pa.Table | pa.RecordBatch) -> pa.RecordBatch:
    """``data`` as one batch of ``plan.output_schema``: columns by name, types cast exactly.

    A cast that would change a value (a fraction of a second in a column the
    input holds in whole seconds) raises :class:`DataError` naming the column.
    """
    schema = plan.output_schema
    names = data.schema.names
    missing = [n for n in schema.names if n not in names]
    if missing:
        raise DataError(f"the engine's output lacks column(s) {', '.join(map(repr, missing))}")
    arrays = []
    for f in schema:
        col = data.column(f.name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if not col.type.equals(f.type):
            try:
                col = col.cast(f.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(
                    f"column {f.name!r}: the engine's {col.type} values do not fit the "
                    f"input's type {f.type} ({type(exc).__name__})"
                ) from None
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def count_output(counters: Counters, plan: Plan, batch: pa.RecordBatch) -> None:
    """Add ``batch``'s rows and, per transformed column, its values and nulls to ``counters``
    (the rows read are counted by the engine, where it reads them)."""
    counters.merge(Counters.of_batch(plan, batch, rows_in=0))


def first_line(text: str) -> str:
    """The first non-empty line of ``text`` (engine errors carry whole stack traces)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
