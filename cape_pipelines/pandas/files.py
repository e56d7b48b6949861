"""``cape apply --engine pandas``: the input's batches through the core, in this process.

The built-in file engine (the default): no engine to start, memory bounded by
one batch. Errors name the file and the rows of the batch they are about,
since a transformation only knows its position within a batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from ..core import apply_batches
from ..errors import TransformError
from ..io import FileJob


def apply_files_pandas(job: FileJob) -> Iterator[pa.RecordBatch]:
    """The ``cape_pipelines.engines`` function for ``--engine pandas``."""
    inputs, plan, progress = job.inputs, job.plan, job.progress
    for path in inputs.files:
        # Rows of this file read so far and the size of the current batch, so that an error
        # can say which rows of the file it is about (transformations count within a batch).
        where = {"start": 0, "rows": 0}

        def counted(p: Path = path, w: dict[str, int] = where) -> Iterator[pa.RecordBatch]:
            for batch in inputs.file_batches(p, job.batch_size):
                w["start"] += w["rows"]
                w["rows"] = batch.num_rows
                progress(batch.num_rows)
                yield batch

        try:
            yield from apply_batches(plan, counted(), job.counters)
        except TransformError as exc:
            first, last = where["start"] + 1, where["start"] + where["rows"]
            raise TransformError(
                f"{path}, in the batch of data rows {first}-{last}: {exc}"
            ) from None


__all__ = ["apply_files_pandas"]
