"""Work functions the cluster tests send to Dask workers (importable there via PYTHONPATH)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pandas as pd


def slow_people(n: int, markers: str, sleep: float) -> pd.DataFrame:
    """One partition of ``n`` people, made slowly, leaving a marker file when it starts."""
    Path(markers, uuid.uuid4().hex).touch()
    time.sleep(sleep)
    return pd.DataFrame(
        {"i": pd.Series(range(n), dtype="int64"), "name": [f"p{i}" for i in range(n)]}
    )
