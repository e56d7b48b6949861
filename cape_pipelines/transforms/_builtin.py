"""The built-in transformation families, listed where the package is assembled.

The registry imports this list; the families import only :mod:`.base`, so no
module imports itself back. Order matters only for listings (the Spark SQL
functions are registered in this order).
"""

from __future__ import annotations

from .base import Transformation
from .bucket import Bucket
from .fpe import Fpe, FpeReverser
from .generalize import Generalize
from .mask import Mask
from .perturb import DatePerturbation, NumericPerturbation
from .redact import ColumnRedact, RowRedact
from .reversible import ReversibleTokenizer, TokenReverser
from .rounding import DateTruncation, NumericRounding
from .text_scrub import TextScrub
from .tokenize import Tokenizer

BUILTINS: tuple[type[Transformation], ...] = (
    Tokenizer,
    ReversibleTokenizer,
    TokenReverser,
    NumericRounding,
    DateTruncation,
    NumericPerturbation,
    DatePerturbation,
    ColumnRedact,
    RowRedact,
    Fpe,
    FpeReverser,
    Mask,
    Bucket,
    Generalize,
    TextScrub,
)
