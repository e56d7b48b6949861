"""The row-condition language of ``row-redact``: a small parser compiled to pyarrow expressions.

A condition such as ``age < 18 or country in ('XX', 'YY')`` is tokenized and
parsed here by hand (never ``eval``, never pandas ``query``) into an AST of
frozen dataclasses, which pickles and is checked against a schema by
:meth:`Condition.to_expression`. The grammar, keywords case-insensitive::

    condition  := or_expr                        -- at most MAX_PREDICATES predicates
    or_expr    := and_expr (("or" | "|") and_expr)*
    and_expr   := not_expr (("and" | "&") not_expr)*
    not_expr   := ("not" | "~") not_expr | "(" condition ")" | predicate
    predicate  := operand op operand            -- one column and one literal, either order
                | column "is" ["not"] "null"
                | column ["not"] "in" "(" literal ("," literal)* [","] ")"
    op         := "==" | "!=" | "<" | "<=" | ">" | ">=" | "=" | "<>"
    column     := identifier | `any text` (a backquote inside is written twice)
    literal    := ["-"] number | 'text' | "text" | true | false
                | date'YYYY-MM-DD' | timestamp'YYYY-MM-DDTHH:MM:SS[.ffffff][+HH:MM|Z]'

Strings use SQL quoting: a quote inside is written twice (``'O''Brien'``);
a backslash is an ordinary character. Double-quoted strings, ``=``, ``<>``,
``&``, ``|`` and ``~`` are accepted so that cape-python conditions (pandas
``query`` / Spark SQL) keep working; ``&`` and ``|`` have the precedence of
``and`` and ``or``, as in pandas. ``null`` is not a literal: write ``is null``.

Semantics are SQL's three-valued logic (Arrow's Kleene ``and``/``or``): a
comparison or ``in`` with a null operand is null, and so is one with a float
NaN (IEEE would make ``NaN < 1000`` and ``NaN >= 1000`` both false, letting
the row through every range condition). ``row-redact`` removes rows
where the condition is true *or null*, so a missing value never lets a row
through. Literals are typed against the column: an integer literal against a
float column is fine, a string against an int column is a :class:`PlanError`.
A ``date`` literal against a timestamp column means midnight of that day; a
literal without a UTC offset against a time-zone-aware column is read as UTC.

The parser (:mod:`.parser`) and the AST with its compiler to Arrow
(:mod:`.nodes`) are separate modules; this one re-exports the public names.
"""

from .nodes import And, Compare, Condition, InList, IsNull, Literal, Node, Not, Or

# The parser's limits, importable from here as before (tests and callers size inputs by them).
from .parser import MAX_DEPTH as MAX_DEPTH
from .parser import MAX_PREDICATES as MAX_PREDICATES
from .parser import ConditionSyntaxError, parse_condition

__all__ = [
    "And",
    "Compare",
    "Condition",
    "ConditionSyntaxError",
    "InList",
    "IsNull",
    "Literal",
    "Node",
    "Not",
    "Or",
    "parse_condition",
]
