"""Imports every built-in transformation family so that each registers itself."""

from . import (  # noqa: F401
    bucket,
    fpe,
    generalize,
    mask,
    perturb,
    redact,
    reversible,
    rounding,
    text_scrub,
    tokenize,
)
