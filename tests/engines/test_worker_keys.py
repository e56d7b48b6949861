"""Keys that stay out of job graphs: what each engine ships, searched for the key bytes.

Per engine, the test captures exactly what the engine serializes for its
workers (Spark: the pickled ``mapInArrow`` command handed to the JVM; Dask:
the task graph pickled as ``distributed`` does; Beam: the pipeline proto with
its DoFn payloads) and looks for the key as raw bytes, hex and base64. With a
worker-side key provider the key must be absent and the output bytes the
same as today's; without one (today's behaviour, kept for quick local runs)
the same search finds the key, which shows the search can fail.
"""

from __future__ import annotations

import base64
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from cape_pipelines import apply_policy as apply_arrow
from cape_pipelines.audit import MemorySink
from cape_pipelines.errors import KeyMissingError
from cape_pipelines.keys import EnvKeys, KeyStore, SecretFileKeys, worker_key

# Random-looking, so no accidental match in unrelated bytes.
TOKEN_KEY = bytes.fromhex("8f3a1c9e5b7d20461ea9c3f07b5d8e2a94c61f0d3b7e5a2c8d4f6a1b3c5e7d90")
SIV_KEY = bytes.fromhex("1d2c3b4a59687f0e" * 4)
KEYS = {"tok": TOKEN_KEY, "siv": SIV_KEY}
POLICY = {
    "label": "worker-keys",
    "rules": [
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "tok"}}}],
        },
        {
            "match": {"name": "name"},
            "actions": [{"transform": {"type": "reversible-tokenizer", "key": {"secret": "siv"}}}],
        },
    ],
}
TABLE = pa.table(
    {
        "id": pa.array(range(6), pa.int64()),
        "email": ["a@x.org", "b@x.org", None, "a@x.org", "c@x.org", "d@x.org"],
        "name": ["Ann", "Bob", "Cy", None, "Dee", "Eve"],
    }
)


def forms(key: bytes) -> list[bytes]:
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
            base64.urlsafe_b64encode(key)]  # fmt: skip


def assert_no_keys(blob: bytes) -> None:
    for key in KEYS.values():
        for form in forms(key):
            assert form not in blob, "key material in what the engine ships"


def assert_has_a_key(blob: bytes) -> None:
    assert any(form in blob for key in KEYS.values() for form in forms(key))


@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    """A mounted-secret-like directory: one hex file per key, readable by local workers."""
    d = tmp_path / "secrets"
    d.mkdir()
    for name, key in KEYS.items():
        (d / name).write_text(key.hex() + "\n")
    return d


def expected() -> pa.Table:
    return apply_arrow(POLICY, TABLE, keys=KEYS, audit=MemorySink())


# -- the store itself ---------------------------------------------------------------------------


def test_a_store_by_reference_pickles_names_not_bytes(secret_dir: Path) -> None:
    store = KeyStore({"r0": TOKEN_KEY, "r1": SIV_KEY, "seeded": b"s" * 32})
    shipped = store.by_reference({"r0": "tok", "r1": "siv"}, SecretFileKeys(secret_dir))
    blob = pickle.dumps(shipped)
    assert_no_keys(blob)
    assert b"s" * 32 in blob  # an unnamed key still travels: said so in the docs
    plain = pickle.dumps(store)
    assert_has_a_key(plain)
    worker_copy = pickle.loads(blob)
    assert worker_copy["r0"] == TOKEN_KEY and worker_copy["r1"] == SIV_KEY
    assert "hidden" in repr(worker_copy) and TOKEN_KEY.hex() not in repr(worker_copy)


def test_worker_keys_resolve_once_per_process_and_fail_by_name(
    secret_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = SecretFileKeys(secret_dir / "elsewhere")
    with pytest.raises(KeyMissingError, match="'nope'"):
        worker_key(provider, "nope")
    monkeypatch.setenv("CAPE_KEY_ONCE", "aa" * 16)
    assert worker_key(EnvKeys(), "once") == b"\xaa" * 16
    monkeypatch.setenv("CAPE_KEY_ONCE", "bb" * 16)
    assert worker_key(EnvKeys(), "once") == b"\xaa" * 16  # cached for the process
    with pytest.raises(Exception, match="secret directory"):
        SecretFileKeys(secret_dir).fetch("../tok")


# -- Dask ---------------------------------------------------------------------------------------


def _dask(secret_dir: Path | None) -> tuple[bytes, pa.Table]:
    pytest.importorskip("distributed")
    import cloudpickle
    import runners

    import cape_pipelines.dask as cape_dask

    provider = SecretFileKeys(secret_dir) if secret_dir else None
    df = runners.to_pandas(TABLE)
    out = cape_dask.apply_policy(
        runners.dask_frame(df), POLICY, keys=KEYS, audit=MemorySink(), worker_keys=provider
    )
    # What distributed sends to the scheduler and workers: the pickled task graph.
    blob = cloudpickle.dumps(dict(out.__dask_graph__()))
    result = cape_dask.compute(out, scheduler=runners.distributed_client())
    return blob, runners.from_pandas(result)


@pytest.mark.dask
def test_dask_graph_carries_no_key_material(secret_dir: Path) -> None:
    import runners

    blob, got = _dask(secret_dir)
    assert_no_keys(blob)
    assert got.equals(runners.normalise(expected()))
    today, _ = _dask(None)
    assert_has_a_key(today)


# -- Spark --------------------------------------------------------------------------------------


def _spark(
    spark: Any, secret_dir: Path | None, monkeypatch: pytest.MonkeyPatch
) -> tuple[bytes, pa.Table]:
    import pyspark.core.rdd as rdd

    from cape_pipelines.spark import apply_policy, collect
    from cape_pipelines.spark.convert import schema_to_spark

    shipped: list[bytes] = []
    original = rdd._prepare_for_python_RDD

    def capture(sc: Any, command: Any) -> Any:
        out = original(sc, command)
        shipped.append(bytes(out[0]))
        return out

    monkeypatch.setattr(rdd, "_prepare_for_python_RDD", capture)
    provider = SecretFileKeys(secret_dir) if secret_dir else None
    sdf = spark.createDataFrame(TABLE, schema=schema_to_spark(TABLE.schema))
    out = apply_policy(sdf, POLICY, keys=KEYS, audit=MemorySink(), worker_keys=provider)
    result = collect(out)
    monkeypatch.setattr(rdd, "_prepare_for_python_RDD", original)
    assert shipped, "no Python function was shipped: the capture missed it"
    return b"".join(shipped), result


@pytest.mark.spark
def test_spark_closure_carries_no_key_material(
    spark: Any, secret_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob, got = _spark(spark, secret_dir, monkeypatch)
    assert_no_keys(blob)
    want = expected()
    assert got.sort_by("id").equals(want.cast(got.schema).sort_by("id"))
    today, _ = _spark(spark, None, monkeypatch)
    assert_has_a_key(today)


# -- Beam ---------------------------------------------------------------------------------------


def _beam_proto(secret_dir: Path | None) -> bytes:
    pytest.importorskip("apache_beam")
    import apache_beam as beam

    from cape_pipelines.beam import ApplyPolicy

    provider = SecretFileKeys(secret_dir) if secret_dir else None
    p = beam.Pipeline()
    rows = [dict(zip(TABLE.column_names, r.values(), strict=True)) for r in TABLE.to_pylist()]
    _ = (
        p
        | beam.Create(rows)
        | ApplyPolicy(
            POLICY,
            keys=KEYS,
            schema=TABLE.schema,
            audit=str(Path(tempfile.mkdtemp()) / "audit.jsonl"),
            worker_keys=provider,
        )
    )
    # What a runner receives: the pipeline proto, DoFns pickled into their payloads.
    proto = p.to_runner_api()
    return proto.SerializeToString() + b"".join(_dofn_pickles(proto))


def _dofn_pickles(proto: Any) -> list[bytes]:
    """Every ParDo's DoFn payload, undone to the pickle bytes (Beam compresses and base64s it)."""
    import bz2
    import zlib

    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    out = []
    for transform in proto.components.transforms.values():
        if transform.spec.urn != common_urns.primitives.PAR_DO.urn:
            continue
        payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
        raw = payload.do_fn.payload
        try:
            raw = base64.b64decode(raw, validate=True)
        except ValueError:
            pass
        for decompress in (bz2.decompress, zlib.decompress):
            try:
                raw = decompress(raw)
                break
            except (OSError, ValueError, zlib.error):
                continue
        out.append(raw)
    assert out, "no ParDo payload found"
    return out


@pytest.mark.beam
def test_beam_pipeline_proto_carries_no_key_material(secret_dir: Path) -> None:
    assert_no_keys(_beam_proto(secret_dir))
    assert_has_a_key(_beam_proto(None))


@pytest.mark.beam
def test_beam_output_unchanged_with_worker_keys(secret_dir: Path) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from cape_pipelines.beam import ApplyPolicy

    rows = [dict(zip(TABLE.column_names, r.values(), strict=True)) for r in TABLE.to_pylist()]
    got: list[dict[str, Any]] = []
    opts = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    out_file = secret_dir.parent / "beam-out"
    with beam.Pipeline(options=opts) as p:
        _ = (
            p
            | beam.Create(rows)
            | ApplyPolicy(
                POLICY,
                keys=KEYS,
                schema=TABLE.schema,
                audit=str(secret_dir.parent / "audit.jsonl"),
                worker_keys=SecretFileKeys(secret_dir),
            )
            | beam.Map(repr)
            | beam.io.WriteToText(str(out_file))
        )
    for path in secret_dir.parent.glob("beam-out*"):
        got += [eval(line) for line in path.read_text().splitlines()]
    want = expected().to_pylist()
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)
