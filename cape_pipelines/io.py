"""``cape apply`` on files: one run from an input file or directory to one output file.

The pieces live in their own modules: :mod:`.inputs` (finding and reading the
input), :mod:`.writers` (the output file, written atomically) and
:mod:`.progress` (a plain callback engines report rows through). This module
holds the engine table and :func:`apply_files`, which ties them together.

The work itself goes through :data:`ENGINES`, a small table of engine
functions (``pandas``, the local Arrow path, built in); engine packages add
their own with :func:`register_engine`. Every engine hands its output batches,
in input order, to the same writer, which writes fixed-size row groups, so the
output file's bytes do not depend on the engine or the batch size.

>>> from cape_pipelines.io import apply_files
>>> keys = {"email-key": b"..."}
>>> apply_files("policy.yaml", "in.csv", "out.parquet", keys=keys)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from .audit import AuditTarget, RunContext
from .core import Counters, apply_batches
from .errors import CapeError, TransformError
from .inputs import (
    CSV_INFER_BLOCK,
    DEFAULT_BATCH_SIZE,
    CsvOptions,
    Format,
    InputSet,
    format_of,
    open_inputs,
    parse_arrow_type,
)
from .inputs import first_line as _first_line
from .keys import KeyResolver
from .plan import Plan, build_plan
from .policy.load import PolicySource, load_policy
from .policy.models import Policy
from .progress import Progress, ProgressFn
from .writers import (
    METADATA_KEYS,
    ROW_GROUP_SIZE,
    CsvOut,
    ParquetOut,
    TimestampUnit,
    atomic_path,
    output_format,
    read_output_metadata,
)


@dataclass(frozen=True)
class EnginePolicy:
    """What an engine adapter needs to build its own plan: the policy, the run's key
    resolver (the very one ``plan`` was built with, so every key, and a per-run random
    key, resolves to the same bytes) and the column tags."""

    policy: Policy
    resolver: KeyResolver
    column_tags: Mapping[str, Sequence[str]] = field(default_factory=dict)


class EngineFn(Protocol):
    """An engine: applies ``plan`` to every batch of ``inputs`` and yields the output batches
    in input order, adding each batch's counts into ``counters`` and reporting its input rows to the
    ``progress`` callback. The caller writes the batches (so every engine gives the same file).
    ``policy`` is for engines that run the policy through their own adapter."""

    def __call__(
        self,
        plan: Plan,
        inputs: InputSet,
        *,
        batch_size: int,
        counters: Counters,
        progress: ProgressFn,
        policy: EnginePolicy,
    ) -> Iterator[pa.RecordBatch]: ...


def _apply_files_local(
    plan: Plan,
    inputs: InputSet,
    *,
    batch_size: int,
    counters: Counters,
    progress: ProgressFn,
    policy: EnginePolicy | None = None,
) -> Iterator[pa.RecordBatch]:
    """The built-in engine: the core over the input's batches, in this process."""
    for path in inputs.files:
        # Rows of this file read so far and the size of the current batch, so that an error
        # can say which rows of the file it is about (transformations count within a batch).
        where = {"start": 0, "rows": 0}

        def counted(p: Path = path, w: dict[str, int] = where) -> Iterator[pa.RecordBatch]:
            for batch in inputs.file_batches(p, batch_size):
                w["start"] += w["rows"]
                w["rows"] = batch.num_rows
                progress(batch.num_rows)
                yield batch

        try:
            yield from apply_batches(plan, counted(), counters)
        except TransformError as exc:
            first, last = where["start"] + 1, where["start"] + where["rows"]
            raise TransformError(
                f"{path}, in the batch of data rows {first}-{last}: {exc}"
            ) from None


ENGINES: dict[str, EngineFn] = {"pandas": _apply_files_local}
"""Engine name -> function; ``cape apply --engine NAME`` picks one."""

_OPTIONAL_ENGINES = ("beam", "dask", "spark")


def register_engine(name: str, fn: EngineFn) -> None:
    """Make ``fn`` available as ``cape apply --engine name`` (engine packages call this)."""
    ENGINES[name] = fn


def get_engine(name: str) -> EngineFn:
    """The engine called ``name``; an optional one is imported on first use
    (``cape_pipelines.<name>.files`` registers it). Unknown names list the known ones."""
    if name not in ENGINES and name in _OPTIONAL_ENGINES:
        try:
            __import__(f"cape_pipelines.{name}.files")
        except ImportError as exc:
            raise CapeError(
                f"engine {name!r} is not available ({_first_line(exc)}); install the '{name}' extra"
            ) from None
    try:
        return ENGINES[name]
    except KeyError:
        raise CapeError(
            f"unknown engine {name!r}; available: {', '.join(sorted(ENGINES))}"
        ) from None


@dataclass
class ApplyResult:
    """What one :func:`apply_files` run did."""

    output: Path
    run_id: str
    counters: Counters
    plan: Plan


def apply_files(
    policy: PolicySource,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    keys: Mapping[str, bytes | str] | None = None,
    resolver: KeyResolver | None = None,
    audit: AuditTarget = None,
    format: Format | None = None,
    input_format: Format | None = None,
    csv_options: CsvOptions | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    engine: str = "pandas",
    timestamp_unit: TimestampUnit = "us",
    overwrite: bool = False,
    progress: bool | None = False,
    run_id: str | None = None,
    policy_source: str | None = None,
    column_tags: Mapping[str, Sequence[str]] | None = None,
) -> ApplyResult:
    """Apply ``policy`` to a CSV/Parquet file or directory and write one output file.

    Streams batches of ``batch_size`` rows, so memory does not grow with the
    input. The output appears only if the whole run succeeds. One audit run
    is recorded: ``run.started``, ``policy.fetched``, then ``run.completed`` or
    ``run.failed`` with the counts of the rows written.
    ``progress``: True/False, or None for "only if stderr is a terminal".
    """
    src = Path(input)
    dst = Path(output)
    run = RunContext(engine=engine, sink=audit, run_id=run_id)
    try:
        pol = load_policy(policy)
    except BaseException as exc:
        run.started()
        run.failed(exc)
        raise
    # The policy is known before the first record, so every record of the run names it.
    run.set_policy(pol.label, pol.version, pol.sha256)
    run.started()
    counters: Counters | None = None
    try:
        if policy_source is None:
            policy_source = str(policy) if isinstance(policy, str | os.PathLike) else "inline"
        run.policy_fetched(policy_source)
        if batch_size < 1:
            raise CapeError("batch size must be at least 1")
        fmt = output_format(dst, format)
        if dst.exists() and not overwrite:
            raise FileExistsError(f"output {dst} already exists; pass --overwrite to replace it")
        run_engine = get_engine(engine)
        inputs = open_inputs(src, format=input_format, csv_options=csv_options)
        _refuse_overlap(inputs, dst)
        resolver = resolver or KeyResolver(keys)
        plan = build_plan(pol, inputs.schema, resolver=resolver, column_tags=column_tags)
        counters = Counters.empty_for(plan)
        bar = Progress.auto(inputs.total_rows(), progress)
        metadata = {
            "cape.policy.label": pol.label,
            "cape.policy.version": str(pol.version),
            "cape.policy.sha256": pol.sha256,
            "cape.run_id": run.run_id,
        }
        with atomic_path(dst, overwrite=overwrite) as tmp:
            writer: ParquetOut | CsvOut
            if fmt == "parquet":
                writer = ParquetOut(
                    tmp, plan.output_schema, metadata, timestamp_unit=timestamp_unit
                )
            else:
                delim = (csv_options or CsvOptions()).delimiter
                writer = CsvOut(tmp, plan.output_schema, delim)
            try:
                for out in run_engine(
                    plan,
                    inputs,
                    batch_size=batch_size,
                    counters=counters,
                    progress=bar,
                    policy=EnginePolicy(pol, resolver, dict(column_tags or {})),
                ):
                    writer.write(out)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            finally:
                bar.close()
    except BaseException as exc:
        run.failed(exc, counters)
        raise
    run.completed(counters)
    return ApplyResult(output=dst, run_id=run.run_id, counters=counters, plan=plan)


def _refuse_overlap(inputs: InputSet, dst: Path) -> None:
    target = dst.resolve()
    if any(f.resolve() == target for f in inputs.files):
        raise CapeError(f"output {dst} is one of the input files; write somewhere else")
    if inputs.root.is_dir() and inputs.root.resolve() in target.parents:
        raise CapeError(
            f"output {dst} is inside the input directory {inputs.root}; write somewhere else"
        )


__all__ = [
    "CSV_INFER_BLOCK",
    "DEFAULT_BATCH_SIZE",
    "ENGINES",
    "METADATA_KEYS",
    "ROW_GROUP_SIZE",
    "ApplyResult",
    "CsvOptions",
    "CsvOut",
    "EngineFn",
    "EnginePolicy",
    "Format",
    "InputSet",
    "ParquetOut",
    "Progress",
    "ProgressFn",
    "TimestampUnit",
    "apply_files",
    "atomic_path",
    "format_of",
    "get_engine",
    "open_inputs",
    "output_format",
    "parse_arrow_type",
    "read_output_metadata",
    "register_engine",
]
