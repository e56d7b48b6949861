"""Key references and the provider chain: forms, precedence, decoding, and never showing bytes."""

from __future__ import annotations

import base64
import pickle

import pytest
from pydantic import SecretBytes

from cape_pipelines.errors import KeyFormatError, KeyMissingError
from cape_pipelines.keys import KeyRef, KeyResolver, KeyStore, env_var_name, parse_key_ref

KEY = bytes(range(32))


@pytest.mark.parametrize(
    ("value", "secret", "inline"),
    [
        ({"secret": "email-key"}, "email-key", None),
        ("plain passphrase", None, b"plain passphrase"),  # cape-python inline string
        ({"type": "secret", "value": base64.b64encode(KEY).decode()}, None, KEY),  # padded
        # cape-python wrote URL-safe base64 without padding
        (
            {"type": "secret", "value": base64.urlsafe_b64encode(KEY).decode().rstrip("=")},
            None,
            KEY,
        ),
        (
            {"type": "secret", "name": "my-key", "value": "QUJDREVGR0hJSktMTU5PUA=="},
            None,
            b"ABCDEFGHIJKLMNOP",
        ),
    ],
)
def test_parse_key_ref(value: object, secret: str | None, inline: bytes | None) -> None:
    ref = parse_key_ref(value)
    assert ref.secret == secret
    assert (ref.inline.get_secret_value() if ref.inline else None) == inline


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (42, "key must be {secret: NAME}"),
        ({"secret": ""}, "key must be {secret: NAME}"),
        ({"type": "secret", "value": 5}, "must be a base64 string"),
        ({"type": "secret", "value": "!!!not base64!!!"}, "is not valid base64"),
        ({"type": "secret", "value": "QUJD", "extra": 1}, "takes only 'value'"),
    ],
)
def test_parse_key_ref_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_key_ref(value)
    assert "!!!not" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "var"),
    [("email-key", "CAPE_KEY_EMAIL_KEY"), ("a.b", "CAPE_KEY_A_B"), ("X", "CAPE_KEY_X")],
)
def test_env_var_name(name: str, var: str) -> None:
    assert env_var_name(name) == var


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (KEY.hex(), KEY),
        (KEY.hex().upper(), KEY),
        (" " + KEY.hex() + "\n", KEY),
        ("base64:" + base64.b64encode(KEY).decode(), KEY),
    ],
)
def test_environment_forms(text: str, expected: bytes) -> None:
    resolver = KeyResolver(environ={"CAPE_KEY_EMAIL_KEY": text})
    assert resolver.resolve(KeyRef(secret="email-key")) == expected


@pytest.mark.parametrize(
    ("environ", "keys", "message"),
    [
        ({"CAPE_KEY_K": "zz-not-hex"}, None, "environment variable CAPE_KEY_K is neither hex nor"),
        ({"CAPE_KEY_K": "base64:%%%"}, None, "environment variable CAPE_KEY_K is neither hex nor"),
        ({"CAPE_KEY_K": ""}, None, "environment variable CAPE_KEY_K is empty"),
        ({}, {"k": "not hex"}, "explicit key 'k' is neither hex nor"),
        ({}, {"k": b""}, "explicit key 'k' is empty"),
        ({}, {"k": 1234}, "explicit key 'k' must be bytes"),
    ],
)
def test_bad_key_material(environ: dict, keys: dict | None, message: str) -> None:
    resolver = KeyResolver(keys, environ=environ)
    with pytest.raises(KeyFormatError, match=message) as info:
        resolver.resolve(KeyRef(secret="k"))
    assert "zz-not-hex" not in str(info.value) and "not hex'" not in str(info.value)


def test_precedence_explicit_then_environment_then_providers() -> None:
    ref = KeyRef(secret="k")
    env = {"CAPE_KEY_K": (b"E" * 16).hex()}
    provider = [("coordinator", lambda name: b"C" * 16 if name == "k" else None)]
    assert KeyResolver({"k": b"X" * 16}, environ=env, providers=provider).resolve(ref) == b"X" * 16
    assert KeyResolver({"k": (b"H" * 16).hex()}, environ=env).resolve(ref) == b"H" * 16
    assert KeyResolver(environ=env, providers=provider).resolve(ref) == b"E" * 16
    assert KeyResolver(environ={}, providers=provider).resolve(ref) == b"C" * 16


def test_missing_key_lists_what_was_tried() -> None:
    resolver = KeyResolver(environ={}, providers=[("coordinator", lambda name: None)])
    with pytest.raises(
        KeyMissingError,
        match=r"key 'email-key' not found \(tried: keys=, CAPE_KEY_EMAIL_KEY, coordinator\)",
    ) as info:
        resolver.resolve(KeyRef(secret="email-key"))
    assert info.value.key_name == "email-key"
    assert isinstance(info.value, LookupError)


def test_inline_key_resolves_without_providers() -> None:
    assert KeyResolver(environ={}).resolve(KeyRef(inline=SecretBytes(KEY))) == KEY


def test_run_key_is_stable_within_a_resolver_only() -> None:
    a, b = KeyResolver(environ={}), KeyResolver(environ={})
    assert a.run_key() == a.run_key() and len(a.run_key()) == 32
    assert a.run_key() != b.run_key()


def test_nothing_shows_key_bytes() -> None:
    inline = KeyRef(inline=SecretBytes(KEY))
    store = KeyStore({"x": KEY})
    resolver = KeyResolver({"k": KEY}, environ={})
    texts = [repr(inline), str(inline), inline.id, repr(store), str(store), repr(resolver)]
    texts += [repr(KeyRef(secret="k")), inline.model_dump_json()]
    joined = " ".join(texts)
    assert KEY.hex() not in joined and repr(KEY) not in joined
    assert base64.b64encode(KEY).decode() not in joined
    assert "<hidden>" in repr(inline) and "1 key(s) hidden" in repr(store)
    assert inline.id.startswith("inline:") and KeyRef(secret="k").id == "secret:k"


def test_key_store_pickles_for_workers() -> None:
    store = pickle.loads(pickle.dumps(KeyStore({"x": KEY})))
    assert store["x"] == KEY and "x" in store and len(store) == 1


# ---------------------------------------------------------------- the 16-byte floor


SHORT = b"k" * 15


@pytest.mark.parametrize(
    ("keys", "environ", "providers", "where"),
    [
        ({"email-key": SHORT}, {}, [], "key 'email-key'"),
        ({"email-key": SHORT.hex()}, {}, [], "key 'email-key'"),
        ({}, {"CAPE_KEY_EMAIL_KEY": "01"}, [], r"key 'email-key' \(from CAPE_KEY_EMAIL_KEY\)"),
        ({}, {}, [("vault", lambda name: SHORT)], r"key 'email-key' \(from vault\)"),
    ],
)
def test_a_named_key_under_16_bytes_is_refused(keys, environ, providers, where) -> None:
    resolver = KeyResolver(keys, environ=environ, providers=providers)
    message = rf"^{where} is \d+ byte\(s\); keys must be at least 16"
    with pytest.raises(KeyFormatError, match=message):
        resolver.resolve(KeyRef(secret="email-key"))
    # 16 bytes is enough
    assert KeyResolver({"email-key": b"k" * 16}).resolve(KeyRef(secret="email-key")) == b"k" * 16


def test_a_one_byte_key_is_refused_for_a_tokenizer_at_plan_time() -> None:
    import pyarrow as pa

    import cape_pipelines as cape

    pol = {
        "label": "t",
        "rules": [
            {
                "match": {"name": "x"},
                "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "k"}}}],
            }
        ],
    }
    with pytest.raises(KeyFormatError) as info:
        cape.apply_policy(pol, pa.table({"x": ["a"]}), keys={"k": b"\x07"})
    assert "rules[0].actions[0].transform" in str(info.value)
    assert "key 'k' is 1 byte(s)" in str(info.value)


@pytest.mark.parametrize("key", ["short", {"type": "secret", "value": "QUJD"}])
def test_a_short_inline_key_is_a_policy_error_at_validate(key: object) -> None:
    import cape_pipelines as cape

    pol = {
        "label": "t",
        "rules": [
            {"match": {"name": "x"}, "actions": [{"transform": {"type": "tokenizer", "key": key}}]}
        ],
    }
    with pytest.raises(cape.PolicyError) as info:
        cape.load_policy(pol)
    [(loc, msg)] = info.value.problems
    assert loc.startswith("rules[0].actions[0].transform")
    assert "keys must be at least 16 bytes" in msg and "short" not in msg
