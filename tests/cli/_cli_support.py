"""Helpers shared by the CLI tests: run ``cape`` in-process, write inputs, list leftovers."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from cape_pipelines.cli import main

CSV_TEXT = (
    "id,name,ssn,age,country,signup\n"
    "1,Ada,900-01-0001,34,US,2024-01-02 03:04:05\n"
    "2,Ben,900-01-0002,15,GB,2024-02-03 04:05:06\n"
    "3,Chloe,900-01-0003,,DE,2024-03-04 05:06:07\n"
    "4,Dmitri,900-01-0004,61,FR,2024-04-05 06:07:08\n"
)

DROP_SSN = """
label: test-drop
version: 2
rules:
  - match: {name: ssn}
    actions: [drop]
"""

DROP_AND_MINORS = """
label: test-minors
rules:
  - actions:
      - transform: {type: row-redact, condition: "age < 18"}
  - match: {name: ssn}
    actions: [drop]
"""

KEY_HEX = "6b" * 32


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(capsys, *argv: str) -> Result:
    """``cape ARGV`` in this process; stdout and stderr captured."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return Result(code, cap.out, cap.err)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def leftovers(directory: Path) -> list[str]:
    """Temporary outputs left in ``directory`` (there must never be any)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".cape-tmp"))
