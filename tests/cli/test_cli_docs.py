"""The Python snippets of docs/python-api.md run, top to bottom, as the page promises."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cape_pipelines.audit import MemorySink

DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


def test_python_api_snippets_run(monkeypatch, tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 6
    # Snippets that do not pass audit= would log to the default sink: keep it in a file.
    monkeypatch.setenv("CAPE_AUDIT_FILE", str(tmp_path / "audit.jsonl"))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs_snippets"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name}[{i}]", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"snippet {i} of {DOC.name} failed: {type(exc).__name__}: {exc}")
    out = capsys.readouterr().out
    assert "customers" in out
    assert isinstance(namespace["sink"], MemorySink)
