"""Hypothesis over the OpenAPI spec: whatever is sent, no 5xx and no stack trace comes back."""

from __future__ import annotations

import re

import pytest
import requests
from _coord_support import ROLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
SEGMENT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["customers", "matrix", "1", "0", "-1", "99999999999999999999", "..", "%00"]),
    st.integers(min_value=-5, max_value=2**65).map(str),
)
ASCII = st.characters(min_codepoint=33, max_codepoint=126)
TRACE = re.compile(r"Traceback|File \"/|line \d+, in ")


def _operations(spec: dict) -> list[tuple[str, str, dict]]:
    return [
        (method.upper(), path, op)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    ]


def _body_strategy(op: dict, spec: dict) -> st.SearchStrategy:
    if "requestBody" not in op:
        return st.none()
    ref = op["requestBody"]["content"]["application/json"]["schema"].get("$ref", "")
    props = spec["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {}).get("properties", {})
    shaped = st.fixed_dictionaries({}, optional={name: JSON for name in props})
    records = st.fixed_dictionaries(
        {
            "records": st.lists(
                st.fixed_dictionaries(
                    {
                        "record_id": st.text(min_size=1, max_size=10),
                        "run_id": st.text(max_size=10),
                        "event": st.sampled_from(["run.started", "run.completed", "x"]),
                        "time": st.text(max_size=30) | st.just("2024-02-30T00:00:00Z"),
                    },
                    optional={"policy": JSON, "rows_in": JSON, "columns": JSON},
                ),
                max_size=3,
            )
        }
    )
    return st.one_of(JSON, shaped, records)


class _Spec(dict):
    def __repr__(self) -> str:
        return "<openapi spec>"


@pytest.fixture(scope="module")
def spec(server):
    return _Spec(requests.get(server.url + "/openapi.json", timeout=30).json())


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_5xx_no_trace(server, tokens, spec, data):
    operations = _operations(spec)
    method, template, op = operations[data.draw(st.integers(0, len(operations) - 1))]
    path = re.sub(
        r"\{[^}]+\}", lambda _: requests.utils.quote(data.draw(SEGMENT), safe=""), template
    )
    params = {
        p["name"]: data.draw(SEGMENT)
        for p in op.get("parameters", [])
        if p["in"] == "query" and data.draw(st.booleans())
    }
    role = data.draw(st.sampled_from([*ROLES, None]))
    headers = {"Authorization": f"Bearer {tokens[role]}"} if role else {}
    if data.draw(st.booleans()):
        headers["If-None-Match"] = data.draw(st.text(ASCII, max_size=20))
    body = data.draw(_body_strategy(op, spec))
    raw = data.draw(st.booleans())
    kwargs = {"data": data.draw(st.binary(max_size=200))} if raw else {"json": body}
    resp = requests.request(
        method, server.url + path, params=params, headers=headers, timeout=30, **kwargs
    )
    assert resp.status_code < 500, (method, path, resp.text)
    assert not TRACE.search(resp.text)
    if resp.status_code >= 400:
        assert resp.json()["error"]["code"]
