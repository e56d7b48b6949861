"""The row-condition tokenizer and recursive-descent parser (see :mod:`cape_pipelines.conditions`).

Written by hand (never ``eval``, never pandas ``query``), with limits on depth
and on the number of predicates, so a policy that validates also applies; it
builds the nodes of :mod:`.nodes` and reports errors with their 1-based column.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .nodes import (
    _FLIP,
    _IDENT_RE,
    _KEYWORDS,
    And,
    Compare,
    Condition,
    InList,
    IsNull,
    Literal,
    Node,
    Not,
    Or,
)

MAX_DEPTH = 100


# Arrow flattens a chain of and/or into one call and walks it recursively when
# binding a filter; around 9,000 operands that overflows the native stack and
# the process dies. Refusing long conditions when the policy is validated keeps
# "validate says ok" meaning "apply will run", with a wide margin.
MAX_PREDICATES = 4000


class ConditionSyntaxError(ValueError):
    """A condition does not parse; ``position`` is the 1-based column of the problem."""

    def __init__(self, message: str, position: int):
        self.position = position
        super().__init__(f"{message} at column {position}")


@dataclass(frozen=True)
class _Token:
    kind: str  # ident, column, number, string, date, timestamp, op, punct, kw, end
    value: Any
    pos: int  # 1-based column


_NUMBER_RE = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


_TYPED_RE = re.compile(r"(date|timestamp)\s*(?=['\"])", re.IGNORECASE)


_OPS = ("==", "!=", "<>", "<=", ">=", "<", ">", "=")


def _read_quoted(text: str, start: int, quote: str) -> tuple[str, int]:
    """The body of a quoted string starting at ``start`` (the quote), and the index after it."""
    out = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == quote:
            if i + 1 < len(text) and text[i + 1] == quote:
                out.append(quote)
                i += 2
                continue
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    what = "backquoted column name" if quote == "`" else "string"
    raise ConditionSyntaxError(f"unterminated {what}", start + 1)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        pos = i + 1
        typed = _TYPED_RE.match(text, i)
        if typed:
            kind = typed.group(1).lower()
            q = typed.end()
            body, i = _read_quoted(text, q, text[q])
            tokens.append(_Token(kind, _parse_temporal(kind, body, q + 1), pos))
            continue
        if ch in "'\"":
            body, i = _read_quoted(text, i, ch)
            tokens.append(_Token("string", body, pos))
            continue
        if ch == "`":
            body, i = _read_quoted(text, i, "`")
            if not body:
                raise ConditionSyntaxError("empty column name", pos)
            tokens.append(_Token("column", body, pos))
            continue
        m = _NUMBER_RE.match(text, i)
        if m:
            end = m.end()
            if end < n and (text[end].isalnum() or text[end] == "_"):
                raise ConditionSyntaxError(f"malformed number {text[i : end + 1]!r}", pos)
            tokens.append(_Token("number", m.group(0), pos))
            i = end
            continue
        m = _IDENT_RE.match(text, i)
        if m:
            word = m.group(0)
            low = word.lower()
            if low in _KEYWORDS:
                tokens.append(_Token("kw", low, pos))
            else:
                tokens.append(_Token("column", word, pos))
            i = m.end()
            continue
        op = next((o for o in _OPS if text.startswith(o, i)), None)
        if op is not None:
            tokens.append(_Token("op", {"=": "==", "<>": "!="}.get(op, op), pos))
            i += len(op)
            continue
        if ch in "(),-&|~":
            tokens.append(_Token("punct", ch, pos))
            i += 1
            continue
        raise ConditionSyntaxError(f"unexpected character {ch!r}", pos)
    tokens.append(_Token("end", None, n + 1))
    return tokens


def _parse_temporal(kind: str, body: str, pos: int) -> dt.date | dt.datetime:
    try:
        if kind == "date":
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", body):
                raise ValueError
            return dt.date.fromisoformat(body)
        return dt.datetime.fromisoformat(body)
    except ValueError:
        form = "YYYY-MM-DD" if kind == "date" else "YYYY-MM-DDTHH:MM:SS[.ffffff][+HH:MM]"
        raise ConditionSyntaxError(
            f"invalid {kind} literal {body!r} (expected {form})", pos
        ) from None


class _Parser:
    def __init__(self, text: str):
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0
        self.predicates = 0

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def _describe(self, tok: _Token) -> str:
        if tok.kind == "end":
            return "end of condition"
        if tok.kind == "string":
            return f"string '{tok.value}'"
        if tok.kind == "column":
            return f"column {tok.value!r}"
        return repr(str(tok.value))

    def error(self, expected: str) -> ConditionSyntaxError:
        return ConditionSyntaxError(
            f"expected {expected}, found {self._describe(self.tok)}", self.tok.pos
        )

    def is_kw(self, *words: str) -> bool:
        return self.tok.kind == "kw" and self.tok.value in words

    def is_punct(self, ch: str) -> bool:
        return self.tok.kind == "punct" and self.tok.value == ch

    def advance(self) -> _Token:
        tok = self.tok
        self.i += 1
        return tok

    def expect_punct(self, ch: str) -> None:
        if not self.is_punct(ch):
            raise self.error(f"'{ch}'")
        self.advance()

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise ConditionSyntaxError("empty condition", 1)
        node = self.or_expr()
        if self.tok.kind != "end":
            raise self.error("'and', 'or' or end of condition")
        return node

    def or_expr(self) -> Node:
        operands = [self.and_expr()]
        while self.is_kw("or") or self.is_punct("|"):
            self.advance()
            operands.append(self.and_expr())
        return operands[0] if len(operands) == 1 else Or(*operands)

    def and_expr(self) -> Node:
        operands = [self.not_expr()]
        while self.is_kw("and") or self.is_punct("&"):
            self.advance()
            operands.append(self.not_expr())
        return operands[0] if len(operands) == 1 else And(*operands)

    def not_expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ConditionSyntaxError(f"condition nested deeper than {MAX_DEPTH}", self.tok.pos)
        try:
            if self.is_kw("not") or self.is_punct("~"):
                self.advance()
                return Not(self.not_expr())
            if self.is_punct("("):
                self.advance()
                node = self.or_expr()
                self.expect_punct(")")
                return node
            return self.predicate()
        finally:
            self.depth -= 1

    def literal(self) -> Literal | None:
        """A literal at the cursor (consumed), or None if there is none."""
        tok = self.tok
        if self.is_punct("-"):
            nxt = self.tokens[self.i + 1]
            if nxt.kind != "number":
                self.advance()
                raise self.error("a number after '-'")
            self.advance()
            lit = self._number(self.advance())
            return Literal(lit.kind, -lit.value)
        if tok.kind == "number":
            return self._number(self.advance())
        if tok.kind == "string":
            self.advance()
            return Literal("string", tok.value)
        if tok.kind in ("date", "timestamp"):
            self.advance()
            return Literal(tok.kind, tok.value)
        if self.is_kw("true", "false"):
            self.advance()
            return Literal("bool", tok.value == "true")
        if self.is_kw("null"):
            raise ConditionSyntaxError(
                "null is not a value; write 'column is null' or 'column is not null'", tok.pos
            )
        return None

    @staticmethod
    def _number(tok: _Token) -> Literal:
        text = tok.value
        if re.fullmatch(r"\d+", text):
            return Literal("int", int(text))
        try:
            return Literal("decimal", Decimal(text))
        except InvalidOperation:  # pragma: no cover - the tokenizer only lets numbers through
            raise ConditionSyntaxError(f"malformed number {text!r}", tok.pos) from None

    def column(self, what: str = "a column name") -> str:
        if self.tok.kind != "column":
            raise self.error(what)
        return self.advance().value

    def predicate(self) -> Node:
        start = self.tok
        self.predicates += 1
        if self.predicates > MAX_PREDICATES:
            raise ConditionSyntaxError(
                f"condition has more than {MAX_PREDICATES} comparisons; split it into several "
                "row-redact rules or use 'in (...)' lists",
                start.pos,
            )
        left_lit = self.literal()
        if left_lit is not None:
            if self.tok.kind != "op":
                raise self.error("a comparison operator after a literal")
            op = self.advance().value
            if self.tok.kind != "column":
                raise self.error("a column name (a comparison needs one column and one literal)")
            return Compare(self.advance().value, _FLIP[op], left_lit)
        if start.kind != "column":
            raise self.error("a column name, a literal, 'not' or '('")
        name = self.advance().value
        if self.tok.kind == "op":
            op = self.advance().value
            if self.tok.kind == "column":
                raise self.error("a literal (comparing two columns is not supported)")
            lit = self.literal()
            if lit is None:
                raise self.error("a literal")
            return Compare(name, op, lit)
        if self.is_kw("is"):
            self.advance()
            negated = False
            if self.is_kw("not"):
                self.advance()
                negated = True
            if not self.is_kw("null"):
                raise self.error("'null'")
            self.advance()
            return IsNull(name, negated)
        negated = False
        if self.is_kw("not"):
            self.advance()
            negated = True
            if not self.is_kw("in"):
                raise self.error("'in'")
        if self.is_kw("in"):
            self.advance()
            self.expect_punct("(")
            values: list[Literal] = []
            while True:
                lit = self.literal()
                if lit is None:
                    raise self.error("a literal" if not values else "a literal or ')'")
                values.append(lit)
                if self.is_punct(","):
                    self.advance()
                    if self.is_punct(")"):
                        break
                    continue
                break
            self.expect_punct(")")
            return InList(name, tuple(values), negated)
        raise self.error("a comparison operator, 'is', 'in' or 'not in'")


def parse_condition(text: str) -> Condition:
    """Parse ``text``; raise :class:`ConditionSyntaxError` (a ``ValueError``) naming the column.

    >>> str(parse_condition("18 > age OR country = 'XX'"))
    "(age < 18 or country == 'XX')"
    """
    if not isinstance(text, str):
        raise ValueError(f"a condition must be a string, not {type(text).__name__}")
    return Condition(text, _Parser(text).parse())
