"""Bad requests: clear 4xx JSON with a stable code, no data echoed, no stack traces, size limits."""

from __future__ import annotations

import socket

import pytest
import requests
from _db_snapshot import stores_nothing

SECRET = "4f1c-do-not-echo-9a7e"


def _post(server, tokens, path, *, role="pipeline", **kwargs):
    headers = {"Authorization": f"Bearer {tokens[role]}", **kwargs.pop("headers", {})}
    return requests.post(server.url + path, headers=headers, timeout=30, **kwargs)


@pytest.mark.parametrize(
    "path,role,body",
    [
        ("/v1/audit", "pipeline", b'{"records": [ {"record_id": '),  # truncated
        ("/v1/audit", "pipeline", b"{'single': 'quotes'}"),
        ("/v1/policies", "author", b"not json at all " + SECRET.encode()),
        ("/v1/tokens", "admin", b"\xff\xfe\x00"),
    ],
)
def test_malformed_json_is_400(server, tokens, path, role, body):
    with stores_nothing(server):
        resp = _post(
            server, tokens, path, role=role, data=body, headers={"Content-Type": "application/json"}
        )
    assert resp.status_code == 400
    assert resp.json() == {
        "error": {"code": "malformed_json", "message": "request body is not valid JSON"}
    }


@pytest.mark.parametrize(
    "path,role,body",
    [
        # A record id is echoed (the client matches refusals by it); other fields never.
        (
            "/v1/audit",
            "pipeline",
            {"records": [{"record_id": "r1", "run_id": "r", "time": SECRET}]},
        ),
        ("/v1/audit", "pipeline", {"records": "x", "extra": SECRET}),
        ("/v1/tokens", "admin", {"name": SECRET, "role": "superuser"}),
        ("/v1/keys", "admin", {"name": "k", "labels": ["customers"], "material": SECRET}),
        ("/v1/policies/customers/versions/1/reject", "reviewer", {"reason": ""}),
    ],
)
def test_invalid_body_is_422_without_echo(server, tokens, path, role, body):
    with stores_nothing(server):
        resp = _post(server, tokens, path, role=role, json=body)
    assert resp.status_code == 422
    error = resp.json()["error"]
    # A record the coordinator cannot take is `record_invalid` (issue 9), naming its index.
    want = "record_invalid" if "time" in str(body) else "invalid_request"
    assert error["code"] == want and error["problems"]
    assert SECRET not in resp.text


def test_declared_oversized_body_is_413(server, tokens):
    big = b'{"records": [' + b" " * 1_100_000 + b"]}"
    with stores_nothing(server):
        resp = _post(
            server, tokens, "/v1/audit", data=big, headers={"Content-Type": "application/json"}
        )
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"


def test_streamed_oversized_body_is_413(server, tokens):
    """A chunked body (no Content-Length) is cut off once it passes the limit."""

    def chunks():
        yield b'{"records": ['
        for _ in range(300):
            yield b" " * 8192

    with stores_nothing(server):
        resp = _post(
            server, tokens, "/v1/audit", data=chunks(), headers={"Content-Type": "application/json"}
        )
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"


def test_too_many_records_in_one_batch(server, tokens):
    records = [
        {
            "record_id": f"r{i}",
            "run_id": "r",
            "event": "run.started",
            "time": "2024-01-01T00:00:00Z",
        }
        for i in range(1001)
    ]
    with stores_nothing(server):  # not the first 1,000 of them either
        resp = _post(server, tokens, "/v1/audit", json={"records": records})
    assert resp.status_code == 422


@pytest.mark.parametrize(
    "method,path,status,code",
    [
        ("GET", "/v1/nothing-here", 404, "not_found"),
        ("DELETE", "/v1/audit", 405, "method_not_allowed"),
        ("GET", "/v1/policies/NOT_A_LABEL/versions", 422, "invalid_request"),
        ("GET", "/v1/policies/customers/versions/99999999999999999999", 422, "invalid_request"),
    ],
)
def test_routing_errors_are_json(server, tokens, method, path, status, code):
    resp = requests.request(
        method,
        server.url + path,
        headers={"Authorization": f"Bearer {tokens['admin']}"},
        timeout=30,
    )
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == code


def test_bad_content_length_refused(server):
    """A raw request whose Content-Length is not a number never reaches the app."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/audit HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n"
            b"Content-Type: application/json\r\n\r\n{}"
        )
        head = sock.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 4")
    assert "Traceback" not in head


def test_the_snapshot_sees_an_accepted_write(server, tokens):
    """stores_nothing is not vacuous: a write the server accepts fails it."""
    with pytest.raises(AssertionError, match="changed the database"):
        with stores_nothing(server):
            resp = _post(
                server,
                tokens,
                "/v1/tokens",
                role="admin",
                json={"name": "snapshot-check", "role": "auditor"},
            )
            assert resp.status_code in (200, 201), resp.text
