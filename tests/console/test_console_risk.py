"""The policy version page shows a version's risk: section to its reviewers (issue 13 item 5)."""

from __future__ import annotations

import copy
import re

from _console_support import POLICY, Coord
from fastapi.testclient import TestClient

XSS = "<script>alert(1)</script>"


def _signed_in(cc: Coord, who: str) -> TestClient:
    t = TestClient(cc.app, base_url="http://127.0.0.1")
    nonce = re.search(r'name="csrf" value="([^"]+)"', t.get("/ui/signin").text)
    assert nonce
    resp = t.post(
        "/ui/signin",
        data={"csrf": nonce.group(1), "token": cc.tokens[who]},
        follow_redirects=False,
    )
    assert resp.status_code == 303
    return t


def test_the_version_page_shows_the_declared_risk_section(cc: Coord) -> None:
    with_risk = copy.deepcopy(POLICY)
    with_risk["risk"] = {
        "quasi_identifiers": ["age", XSS],
        "sensitive": "email",
        "k": 5,
        "action": "suppress",
    }
    cc.coord.policies.push(cc.principals["author"], with_risk)
    page = _signed_in(cc, "reviewer").get(f"/ui/policies/{POLICY['label']}/1").text
    assert "Re-identification risk" in page
    assert "k = 5" in page and "removes the rows of classes smaller than k" in page
    assert "cape policy plan POLICY --data SAMPLE" in page
    assert XSS not in page and "&lt;script&gt;" in page


def test_a_version_without_the_section_shows_nothing_about_it(cc: Coord) -> None:
    cc.coord.policies.push(cc.principals["author"], POLICY)
    page = _signed_in(cc, "reviewer").get(f"/ui/policies/{POLICY['label']}/1").text
    assert "Re-identification risk" not in page
