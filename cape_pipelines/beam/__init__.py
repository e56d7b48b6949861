"""Apache Beam adapter: :class:`ApplyPolicy`, a composite PTransform over dicts, Rows and tables.

Needs the ``beam`` extra (``pip install 'cape-pipelines[beam]'``); the rest of
Cape Pipelines imports without it.

>>> import apache_beam as beam
>>> from cape_pipelines.beam import ApplyPolicy
"""

try:
    import apache_beam  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by the no-beam import test
    raise ImportError(
        "cape_pipelines.beam needs Apache Beam: pip install 'cape-pipelines[beam]'"
    ) from exc

from .apply import DEFAULT_BATCH_SIZE, ApplyPolicy

__all__ = ["DEFAULT_BATCH_SIZE", "ApplyPolicy"]
