"""``cape apply`` on files: one run from an input file or directory to one output file.

The pieces live in their own modules: :mod:`.inputs` (finding and reading the
input), :mod:`.writers` (the output file, written atomically) and
:mod:`.progress` (a plain callback engines report rows through). This module
holds the engine table and :func:`apply_files`, which ties them together.

The work itself goes through an engine function, found by name in the
``cape_pipelines.engines`` entry-point group (``pandas``, ``beam``, ``dask``,
``spark``: each adapter's ``files.py``). The run is the seam's
(:mod:`cape_pipelines.seam`): one binding, one audited run. Every engine hands its
output batches,
in input order, to the same writer, which writes fixed-size row groups, so the
output file's bytes do not depend on the engine or the batch size.

>>> from cape_pipelines.io import apply_files
>>> keys = {"email-key": b"..."}
>>> apply_files("policy.yaml", "in.csv", "out.parquet", keys=keys)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pyarrow as pa

from .audit import AuditTarget
from .core import Counters
from .errors import CapeError
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
from .lineage import LineageOption, file_lineage
from .plan import Plan
from .policy.load import PolicySource
from .progress import Progress, ProgressFn
from .seam import Binding, WorkerKeysSetting, bind
from .writers import (
    METADATA_KEYS,
    ROW_GROUP_SIZE,
    CsvOut,
    ParquetOut,
    TimestampUnit,
    atomic_path,
    open_writer,
    output_format,
    read_output_metadata,
)


@dataclass(frozen=True)
class FileJob:
    """One ``cape apply`` run's work, as an engine function gets it.

    The engine applies ``plan`` to every batch of ``inputs`` and yields the
    output batches in input order, adding each batch's counts into
    ``counters`` and reporting input rows to ``progress``. The caller writes
    the batches (so every engine gives the same file). ``binding`` is for
    engines that run the policy through their own adapter: its
    :meth:`~cape_pipelines.seam.Binding.silent` copy holds the very key
    resolver ``plan`` was built with (so every key, a per-run random one
    too, resolves to the same bytes) and records nothing (the job records
    the run).
    """

    plan: Plan
    inputs: InputSet
    batch_size: int
    counters: Counters
    progress: ProgressFn
    binding: Binding


EngineFn = Callable[[FileJob], Iterator[pa.RecordBatch]]
"""An engine function: a :class:`FileJob` in, the output batches out, in input order."""


ENGINE_GROUP = "cape_pipelines.engines"
"""The entry-point group naming each ``cape apply --engine`` function (see pyproject.toml)."""

ENGINES: dict[str, EngineFn] = {}
"""Engines registered in this process with :func:`register_engine` (tests, applications)."""


def register_engine(name: str, fn: EngineFn) -> None:
    """Make ``fn`` available as ``cape apply --engine name`` in this process.

    Packages declare theirs in the ``cape_pipelines.engines`` entry-point group instead.
    """
    ENGINES[name] = fn


def engine_names() -> list[str]:
    """Every engine name: those registered here and those declared as entry points."""
    return sorted({*ENGINES, *(ep.name for ep in entry_points(group=ENGINE_GROUP))})


def get_engine(name: str) -> EngineFn:
    """The engine called ``name``, loaded from its entry point on first use.

    An engine whose extra is not installed is an error saying which extra to
    install; unknown names list the known ones.
    """
    if name not in ENGINES:
        found = [ep for ep in entry_points(group=ENGINE_GROUP) if ep.name == name]
        if not found:
            hint = ""
            if not engine_names():
                # An install made before the entry points were declared: they are read from
                # the installed metadata, so the package must be installed again.
                hint = " (no engine is installed: reinstall cape-pipelines, e.g. pip install -e .)"
            raise CapeError(
                f"unknown engine {name!r}; available: {', '.join(engine_names())}{hint}"
            )
        try:
            ENGINES[name] = found[0].load()
        except ImportError as exc:
            raise CapeError(
                f"engine {name!r} is not available ({_first_line(exc)}); install the '{name}' extra"
            ) from None
    return ENGINES[name]


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
    worker_keys: WorkerKeysSetting = None,
    lineage: LineageOption = None,
) -> ApplyResult:
    """Apply ``policy`` to a CSV/Parquet file or directory and write one output file.

    Streams batches of ``batch_size`` rows, so memory does not grow with the
    input. The output appears only if the whole run succeeds. One audit run
    is recorded: ``run.started``, ``policy.fetched``, then ``run.completed`` or
    ``run.failed`` with the counts of the rows written.
    ``progress``: True/False, or None for "only if stderr is a terminal".
    ``worker_keys``: how the beam/dask/spark engines give their workers keys
    (default: references, never bytes; ``"inline"`` ships the bytes; see
    docs/keys.md). Any per-run key directory is removed when the run ends.
    ``lineage``: also send OpenLineage run events naming ``input`` and ``output`` (see
    :mod:`cape_pipelines.lineage`).
    """
    src = Path(input)
    dst = Path(output)
    if policy_source is None:
        policy_source = str(policy) if isinstance(policy, str | os.PathLike) else "inline"
    binding = bind(
        policy,
        engine=engine,
        keys=keys,
        resolver=resolver,
        audit=audit,
        column_tags=column_tags,
        source=policy_source,
        record_failure=True,
        run_id=run_id,
        worker_keys=worker_keys,
        lineage=file_lineage(lineage, src, dst),
    )
    with binding.run(run_id=run_id) as run, _closing_run_secrets(binding):
        if batch_size < 1:
            raise CapeError("batch size must be at least 1")
        fmt = output_format(dst, format)
        if dst.exists() and not overwrite:
            raise FileExistsError(f"output {dst} already exists; pass --overwrite to replace it")
        run_engine = get_engine(engine)
        inputs = open_inputs(src, format=input_format, csv_options=csv_options)
        _refuse_overlap(inputs, dst)
        plan = run.plan = binding.build(inputs.schema)
        counters = run.counters = Counters.empty_for(plan)
        metadata = {
            "cape.policy.label": plan.label,
            "cape.policy.version": str(plan.version),
            "cape.policy.sha256": plan.sha256,
            "cape.run_id": run.run_id,
        }
        delimiter = (csv_options or CsvOptions()).delimiter
        with (
            Progress.auto(inputs.total_rows(), progress) as bar,
            atomic_path(dst, overwrite=overwrite) as tmp,
            open_writer(fmt, tmp, plan.output_schema, metadata, timestamp_unit, delimiter) as out,
        ):
            produced = run_engine(FileJob(plan, inputs, batch_size, counters, bar, binding))
            if plan.risk is None:
                for batch in produced:
                    out.write(batch)
            else:
                from .risk_run import stream_with_risk

                counters = run.counters = stream_with_risk(
                    plan, produced, out.write, counters, tmp.parent
                )
    return ApplyResult(output=dst, run_id=run.run_id, counters=counters, plan=plan)


@contextmanager
def _closing_run_secrets(binding: Binding) -> Iterator[None]:
    """Remove the run's private key directory (if an engine made one) when the run ends."""
    try:
        yield
    finally:
        binding.close_run_secrets()


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
    "ENGINE_GROUP",
    "METADATA_KEYS",
    "ROW_GROUP_SIZE",
    "ApplyResult",
    "CsvOptions",
    "CsvOut",
    "EngineFn",
    "FileJob",
    "Format",
    "InputSet",
    "ParquetOut",
    "Progress",
    "ProgressFn",
    "TimestampUnit",
    "apply_files",
    "atomic_path",
    "engine_names",
    "format_of",
    "get_engine",
    "open_inputs",
    "output_format",
    "parse_arrow_type",
    "read_output_metadata",
    "register_engine",
]
