"""Keys that stay out of job graphs: what each engine ships, searched for the key bytes.

Per engine, the test captures exactly what the engine serializes for its
workers (Spark: the pickled ``mapInArrow`` command handed to the JVM; Dask:
the task graph pickled as ``distributed`` does; Beam: the pipeline proto with
its DoFn payloads) and looks for the key as raw bytes, hex (both cases),
base64 and base64url. By DEFAULT (keys given as bytes to a local engine go
through the run's private key directory) and with an explicit worker-side
provider the key must be absent and the output bytes the same as with the
bytes inline; with the explicit opt-in ``worker_keys="inline"`` the same
search finds the key, which shows the search can fail.
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
from cape_pipelines.keys import (
    EnvKeys,
    KeyShippingError,
    KeyStore,
    RunSecrets,
    SecretFileKeys,
    Workers,
    worker_key,
)
from cape_pipelines.seam import DerivedKeys

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


def _dask(worker_keys: Any) -> tuple[bytes, pa.Table]:
    pytest.importorskip("distributed")
    import cloudpickle
    import runners

    import cape_pipelines.dask as cape_dask

    df = runners.to_pandas(TABLE)
    options: dict[str, Any] = {} if worker_keys == "default" else {"worker_keys": worker_keys}
    out = cape_dask.apply_policy(
        runners.dask_frame(df), POLICY, keys=KEYS, audit=MemorySink(), **options
    )
    # What distributed sends to the scheduler and workers: the pickled task graph.
    blob = cloudpickle.dumps(dict(out.__dask_graph__()))
    result = cape_dask.compute(out, scheduler=runners.distributed_client())
    return blob, runners.from_pandas(result)


@pytest.mark.dask
def test_dask_graph_carries_no_key_material_by_default() -> None:
    import runners

    blob, got = _dask("default")
    assert_no_keys(blob)
    assert got.equals(runners.normalise(expected()))
    inline, got_inline = _dask("inline")
    assert_has_a_key(inline)
    assert got_inline.equals(got)


@pytest.mark.dask
def test_dask_graph_with_a_mounted_secret_directory(secret_dir: Path) -> None:
    import runners

    blob, got = _dask(SecretFileKeys(secret_dir))
    assert_no_keys(blob)
    assert got.equals(runners.normalise(expected()))


# -- Spark --------------------------------------------------------------------------------------


def _spark(spark: Any, worker_keys: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, pa.Table]:
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
    options: dict[str, Any] = {} if worker_keys == "default" else {"worker_keys": worker_keys}
    sdf = spark.createDataFrame(TABLE, schema=schema_to_spark(TABLE.schema))
    out = apply_policy(sdf, POLICY, keys=KEYS, audit=MemorySink(), **options)
    result = collect(out)
    monkeypatch.setattr(rdd, "_prepare_for_python_RDD", original)
    assert shipped, "no Python function was shipped: the capture missed it"
    return b"".join(shipped), result


@pytest.mark.spark
def test_spark_closure_carries_no_key_material_by_default(
    spark: Any, secret_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = expected()
    for setting in ("default", SecretFileKeys(secret_dir)):
        blob, got = _spark(spark, setting, monkeypatch)
        assert_no_keys(blob)
        assert got.sort_by("id").equals(want.cast(got.schema).sort_by("id"))
    inline, got_inline = _spark(spark, "inline", monkeypatch)
    assert_has_a_key(inline)
    assert got_inline.sort_by("id").equals(got.sort_by("id"))


# -- Beam ---------------------------------------------------------------------------------------


def _beam_proto(worker_keys: Any) -> bytes:
    pytest.importorskip("apache_beam")
    import apache_beam as beam

    from cape_pipelines.beam import ApplyPolicy

    options: dict[str, Any] = {} if worker_keys == "default" else {"worker_keys": worker_keys}
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
            **options,
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
def test_beam_pipeline_proto_carries_no_key_material_by_default(secret_dir: Path) -> None:
    assert_no_keys(_beam_proto("default"))
    assert_no_keys(_beam_proto(SecretFileKeys(secret_dir)))
    assert_has_a_key(_beam_proto("inline"))


@pytest.mark.beam
@pytest.mark.parametrize("setting", ["default", "secret-dir"])
def test_beam_output_unchanged_with_key_references(secret_dir: Path, setting: str) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from cape_pipelines.beam import ApplyPolicy

    rows = [dict(zip(TABLE.column_names, r.values(), strict=True)) for r in TABLE.to_pylist()]
    got: list[dict[str, Any]] = []
    opts = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    out_file = secret_dir.parent / "beam-out"
    options: dict[str, Any] = (
        {"worker_keys": SecretFileKeys(secret_dir)} if setting == "secret-dir" else {}
    )
    with beam.Pipeline(options=opts) as p:
        _ = (
            p
            | beam.Create(rows)
            | ApplyPolicy(
                POLICY,
                keys=KEYS,
                schema=TABLE.schema,
                audit=str(secret_dir.parent / "audit.jsonl"),
                **options,
            )
            | beam.Map(repr)
            | beam.io.WriteToText(str(out_file))
        )
    for path in secret_dir.parent.glob("beam-out*"):
        got += [eval(line) for line in path.read_text().splitlines()]
    want = expected().to_pylist()
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)


# -- which reference each key gets, and what a remote cluster refuses ---------------------------

LOCAL = Workers("spark", "spark master local[2]", local=True)
REMOTE = Workers("spark", "spark master spark://10.0.0.7:7077", local=False)


def _binding(policy: dict[str, Any], **options: Any) -> Any:
    from cape_pipelines.seam import bind

    return bind(policy, engine="spark", audit=MemorySink(), **options)


def _shipped(binding: Any, workers: Workers) -> Any:
    return binding.build(TABLE.schema, workers=workers)


def test_keys_from_the_environment_ship_as_env_references_to_remote_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAPE_KEY_TOK", TOKEN_KEY.hex())
    monkeypatch.setenv("CAPE_KEY_SIV", SIV_KEY.hex())
    plan = _shipped(_binding(POLICY), REMOTE)
    assert {type(p) for p in plan.keys.providers.values()} == {EnvKeys}
    assert sorted(plan.keys.references.values()) == ["siv", "tok"]
    assert_no_keys(pickle.dumps(plan))
    # Local workers may have started before the variable was set: the run's directory.
    local = _shipped(_binding(POLICY), LOCAL)
    assert {type(p) for p in local.keys.providers.values()} == {RunSecrets}
    assert_no_keys(pickle.dumps(local))


def test_keys_from_a_mounted_secret_directory_ship_as_that_directory(
    secret_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPE_KEYS_DIR", str(secret_dir))
    for workers in (LOCAL, REMOTE):
        plan = _shipped(_binding(POLICY), workers)
        providers = set(map(repr, plan.keys.providers.values()))
        assert providers == {repr(SecretFileKeys(str(secret_dir)))}
        assert_no_keys(pickle.dumps(plan))
        worker_copy = pickle.loads(pickle.dumps(plan))
        assert apply_arrow_plan(worker_copy).equals(expected())


def apply_arrow_plan(plan: Any) -> pa.Table:
    from cape_pipelines.core import apply_batch

    out, _, _ = apply_batch(plan, TABLE.to_batches()[0])
    return pa.Table.from_batches([out])


def test_bytes_given_in_process_are_refused_for_a_remote_cluster_with_the_fix() -> None:
    with pytest.raises(KeyShippingError) as caught:
        _shipped(_binding(POLICY, keys=KEYS), REMOTE)
    text = str(caught.value)
    assert "'tok'" in text and "10.0.0.7" in text
    assert "CAPE_KEY_<NAME>" in text and "worker_keys='inline'" in text
    for form in forms(TOKEN_KEY) + forms(SIV_KEY):
        assert form.decode("latin-1") not in text
    # The opt-in ships them (and says so only by the setting's name: no bytes in logs).
    plan = _shipped(_binding(POLICY, keys=KEYS, worker_keys="inline"), REMOTE)
    assert_has_a_key(pickle.dumps(plan))


def test_a_policy_inline_key_and_a_run_key_never_ship() -> None:
    inline = {
        "label": "inline",
        "rules": [
            {
                "match": {"name": "email"},
                "actions": [
                    {
                        "transform": {
                            "type": "tokenizer",
                            "key": {
                                "type": "secret",
                                "value": base64.b64encode(TOKEN_KEY).decode(),
                            },
                        }
                    }
                ],
            }
        ],
    }
    plan = _shipped(_binding(inline), LOCAL)
    blob = pickle.dumps(plan)
    assert_no_keys(blob)  # not in the key store, nor in the policy's own copy in the step
    assert apply_arrow_plan(pickle.loads(blob)).equals(
        apply_arrow(inline, TABLE, audit=MemorySink())
    )
    with pytest.raises(KeyShippingError, match="inline in the policy"):
        _shipped(_binding(inline), REMOTE)
    noisy = {
        "label": "noise",
        "rules": [
            {
                "match": {"name": "id"},
                "actions": [{"transform": {"type": "numeric-perturbation", "min": -1, "max": 1}}],
            }
        ],
    }
    binding = _binding(noisy)
    plan = _shipped(binding, LOCAL)
    run_key = binding.resolver.run_key()
    assert run_key not in pickle.dumps(plan) and run_key.hex().encode() not in pickle.dumps(plan)
    with pytest.raises(KeyShippingError, match="seed"):
        _shipped(_binding(noisy), REMOTE)
    seeded = {**noisy, "rules": [{**noisy["rules"][0]}]}
    seeded["rules"][0]["actions"] = [
        {"transform": {"type": "numeric-perturbation", "min": -1, "max": 1, "seed": 7}}
    ]
    plan = _shipped(_binding(seeded), REMOTE)  # re-derived from the seed on the worker
    assert {type(p) for p in plan.keys.providers.values()} == {DerivedKeys}
    assert apply_arrow_plan(pickle.loads(pickle.dumps(plan))).equals(
        apply_arrow(seeded, TABLE, audit=MemorySink())
    )


def test_the_run_directory_is_private_and_removed_at_the_run_end() -> None:
    binding = _binding(POLICY, keys=KEYS)
    plan = _shipped(binding, LOCAL)
    (secrets,) = {p for p in plan.keys.providers.values()}
    directory = Path(secrets.directory)
    assert directory.stat().st_mode & 0o777 == 0o700
    files = list(directory.iterdir())
    assert len(files) == 2 and all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    # A worker's copy is a plain reader: unpickling (and dropping) it removes nothing.
    copy = pickle.loads(pickle.dumps(plan))
    assert type(copy.keys.providers[next(iter(copy.keys.providers))]) is SecretFileKeys
    del copy
    assert directory.exists()
    binding.close_run_secrets()
    assert not directory.exists()
    # A worker that comes later gets an error naming the key and the directory, no bytes.
    fresh = pickle.loads(pickle.dumps(plan))
    with pytest.raises(KeyMissingError, match=str(directory)):
        apply_arrow_plan(fresh)


def test_each_engine_says_where_its_workers_are() -> None:
    from types import SimpleNamespace

    from cape_pipelines._workers import beam_workers, dask_workers, spark_workers

    def sdf(master: str) -> Any:
        return SimpleNamespace(
            sparkSession=SimpleNamespace(sparkContext=SimpleNamespace(master=master))
        )

    assert spark_workers(sdf("local[2]")).local
    assert spark_workers(sdf("spark://127.0.0.1:7077")).local
    assert not spark_workers(sdf("spark://10.0.0.7:7077")).local
    assert not spark_workers(sdf("yarn")).local
    assert not spark_workers(sdf("k8s://https://10.0.0.1:443")).local
    assert dask_workers().local  # no distributed client: the local schedulers

    class DataflowRunner:
        pass

    class DirectRunner:
        pass

    options = SimpleNamespace(view_as=lambda _: SimpleNamespace(environment_type=None))
    assert not beam_workers(SimpleNamespace(runner=DataflowRunner(), options=options)).local
    assert beam_workers(SimpleNamespace(runner=DirectRunner(), options=options)).local


def test_worker_keys_takes_only_its_three_forms() -> None:
    with pytest.raises(TypeError, match="worker_keys"):
        _binding(POLICY, keys=KEYS, worker_keys="inlined")


# -- cape apply --engine ------------------------------------------------------------------------


@pytest.mark.dask
@pytest.mark.parametrize("inline", [False, True])
def test_cape_apply_engine_uses_the_default_and_removes_the_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    import pyarrow.parquet as pq
    import yaml

    import cape_pipelines.seam as seam
    from cape_pipelines.cli import main

    made: list[RunSecrets] = []

    class Recorded(RunSecrets):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(seam, "RunSecrets", Recorded)
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(TABLE, src)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    args = ["apply", "--policy", str(policy), "--input", str(src), "--output", str(out)]
    args += ["--engine", "dask", "--no-progress", "--audit-file", str(tmp_path / "a.jsonl")]
    args += ["--key", f"tok={TOKEN_KEY.hex()}", "--key", f"siv={SIV_KEY.hex()}"]
    assert main(args + (["--inline-keys"] if inline else [])) == 0
    if inline:
        assert made == []
    else:
        assert made and all(not Path(m.directory).exists() for m in made)
    assert pq.read_table(out).to_pylist() == expected().to_pylist()


# -- Spark SQL functions ------------------------------------------------------------------------


@pytest.mark.spark
def test_spark_sql_functions_carry_no_key_material(
    spark: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyspark.core.rdd as rdd

    from cape_pipelines.spark import register_udfs
    from cape_pipelines.spark.convert import schema_to_spark

    shipped: list[bytes] = []
    original = rdd._prepare_for_python_RDD

    def capture(sc: Any, command: Any) -> Any:
        out = original(sc, command)
        shipped.append(bytes(out[0]))
        return out

    monkeypatch.setattr(rdd, "_prepare_for_python_RDD", capture)
    monkeypatch.setenv("CAPE_KEY_SIV", SIV_KEY.hex())  # the driver's environment: also by path
    register_udfs(spark, keys={"tok": TOKEN_KEY})
    spark.createDataFrame(TABLE, schema=schema_to_spark(TABLE.schema)).createOrReplaceTempView(
        "people_worker_keys"
    )
    rows = spark.sql(
        "SELECT id, cape_tokenize(email, 'tok') AS email, "
        "cape_tokenize_reversible(name, 'siv') AS name FROM people_worker_keys"
    ).toArrow()
    monkeypatch.setattr(rdd, "_prepare_for_python_RDD", original)
    assert shipped, "no Python function was shipped: the capture missed it"
    assert_no_keys(b"".join(shipped))
    want = expected()
    got = rows.sort_by("id")
    assert got.column("email").to_pylist() == want.sort_by("id").column("email").to_pylist()
    assert got.column("name").to_pylist() == want.sort_by("id").column("name").to_pylist()


def test_sql_functions_refuse_bytes_for_a_remote_cluster() -> None:
    from cape_pipelines.keys import shipped_keys

    with pytest.raises(KeyShippingError, match="CAPE_KEY_<NAME>"):
        shipped_keys(KEYS, {}, REMOTE)
    remote = shipped_keys(None, {"CAPE_KEY_TOK": TOKEN_KEY.hex()}, REMOTE)
    assert_no_keys(pickle.dumps(remote))
    local = shipped_keys(KEYS, {"CAPE_KEY_OTHER": "ab" * 16}, LOCAL)
    assert_no_keys(pickle.dumps(local))
    from cape_pipelines.keys import KeyRef

    copy = pickle.loads(pickle.dumps(local))
    assert copy.resolve(KeyRef(secret="tok")) == TOKEN_KEY
    assert copy.resolve(KeyRef(secret="other")) == b"\xab" * 16
    with pytest.raises(KeyMissingError, match="'nope'"):
        copy.resolve(KeyRef(secret="nope"))
