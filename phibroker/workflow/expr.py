"""The expression (`when`, `expect`, `where`) and `${...}` template language of workflow files.

A hand-written lexer and parser, never Python's eval: a workflow file must not be able to run code.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from phibroker.errors import ExpressionError

ROOTS_WORKFLOW = frozenset({"params", "tasks"})

_MAX_DEPTH = 64
# Bounds that keep evaluating an expression cheap whoever wrote it (a subscription's filter runs on
# every event, in every process that routes events): its length, a reference's parts, and how many
# dotted parts one name may span (task and param names may contain dots; see `resolve`).
MAX_SOURCE = 10_000
WHERE_MAX = 1_000  # a subscription's or trigger's `where`: each process that routes events runs it on each
_MAX_PATH = 64
_MAX_NAME_PARTS = 16
_INDEX = re.compile(r"[0-9]+")
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_TOKEN = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<num>-?[0-9]+(?:\.[0-9]+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_-]*)"
    r"|(?P<seg>\.[A-Za-z0-9_][A-Za-z0-9_-]*)"
    r"|(?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,)"
)
_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""", re.DOTALL)
_UNESCAPE = re.compile(r"""\\(["'\\])""")
_DOLLAR = re.compile(r"\$\$?\{")
_KEYWORDS = frozenset({"and", "or", "not", "in"})
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None, "none": None}


# -- references ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """A dotted path into the scope; integer segments (list indexes) are kept as strings like "0"."""

    path: tuple[str, ...]

    def __str__(self) -> str:
        text = self.path[0]
        for segment in self.path[1:]:
            if _PLAIN_SEGMENT.fullmatch(segment):
                text += "." + segment
            else:
                text += '["' + segment.replace("\\", "\\\\").replace('"', '\\"') + '"]'
        return text


def resolve(path: tuple[str, ...], scope: Mapping[str, Any]) -> Any:
    """Follow `path` through mapping keys and list indexes only; anything missing or odd is None.

    Task and param names may contain dots, so at a mapping the longest run of segments that is a key
    wins (of up to `_MAX_NAME_PARTS`: so the look costs in proportion to the path, not its square).
    """
    if not path:
        return None
    current = scope.get(path[0])
    i = 1
    while i < len(path) and current is not None:
        if isinstance(current, Mapping):
            for j in range(min(len(path), i + _MAX_NAME_PARTS), i, -1):
                key = ".".join(path[i:j])
                if key in current:
                    current, i = current[key], j
                    break
            else:
                return None
        elif isinstance(current, list | tuple) and _INDEX.fullmatch(path[i]) and int(path[i]) < len(current):
            current, i = current[int(path[i])], i + 1
        else:
            return None
    return current


def task_of(ref: Reference, task_names: Collection[str]) -> str | None:
    """The task a `tasks.` reference points to: the longest dotted run after "tasks" that is a known name."""
    if ref.path[0] != "tasks":
        return None
    for j in range(min(len(ref.path), 1 + _MAX_NAME_PARTS), 1, -1):
        name = ".".join(ref.path[1:j])
        if name in task_names:
            return name
    return None


# -- semantics: comparisons never raise, and anything compared with null is false ------------------


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, Mapping):
        return "dict"
    return "other"


def _equal(a: Any, b: Any) -> bool:
    if a is None or b is None or _kind(a) != _kind(b):
        return False
    try:
        return bool(list(a) == list(b)) if _kind(a) == "list" else bool(a == b)
    except Exception:  # whatever the data, evaluation does not fail
        return False


def _not_equal(a: Any, b: Any) -> bool:
    return a is not None and b is not None and not _equal(a, b)


def _ordering(compare: Callable[[Any, Any], Any]) -> Callable[[Any, Any], bool]:
    def ordered(a: Any, b: Any) -> bool:
        kind = _kind(a)
        if a is None or b is None or kind != _kind(b) or kind not in ("number", "str", "list"):
            return False
        try:
            return bool(compare(list(a), list(b)) if kind == "list" else compare(a, b))
        except TypeError:
            return False

    return ordered


def _contains(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    if isinstance(b, list | tuple):
        return any(_equal(a, item) for item in b)
    if isinstance(b, str):
        return isinstance(a, str) and a in b
    if isinstance(b, Mapping):
        try:
            return a in b
        except TypeError:
            return False
    return False


def _not_contains(a: Any, b: Any) -> bool:
    return a is not None and b is not None and not _contains(a, b)


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": _equal,
    "!=": _not_equal,
    "<": _ordering(operator.lt),
    "<=": _ordering(operator.le),
    ">": _ordering(operator.gt),
    ">=": _ordering(operator.ge),
    "in": _contains,
    "not in": _not_contains,
}
_FUNCTIONS: dict[str, Callable[[Any], Any]] = {
    "len": lambda v: len(v) if isinstance(v, str | list | tuple | Mapping) else None,
    "exists": lambda v: v is not None,
}


# -- expression tree -------------------------------------------------------------------------------


class _Node(Protocol):
    def evaluate(self, scope: Mapping[str, Any]) -> Any: ...


@dataclass(frozen=True)
class _Literal:
    value: Any

    def evaluate(self, scope: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True)
class _Ref:
    ref: Reference

    def evaluate(self, scope: Mapping[str, Any]) -> Any:
        return resolve(self.ref.path, scope)


@dataclass(frozen=True)
class _Apply:
    """A function of the operands' values: `not`, a comparison, a call, a list literal."""

    function: Callable[..., Any]
    operands: tuple[_Node, ...]

    def evaluate(self, scope: Mapping[str, Any]) -> Any:
        return self.function(*(operand.evaluate(scope) for operand in self.operands))


@dataclass(frozen=True)
class _Logic:
    """`and` / `or`: short-circuit, and always a bool."""

    op: str
    left: _Node
    right: _Node

    def evaluate(self, scope: Mapping[str, Any]) -> Any:
        left = bool(self.left.evaluate(scope))
        if left == (self.op == "or"):
            return left
        return bool(self.right.evaluate(scope))


# -- lexer and parser ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: str  # num, str, name, seg (".segment"), op, end
    text: str
    pos: int
    value: Any = None


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(source):
        if source[pos] in "\"'":
            string = _STRING.match(source, pos)
            if string is None:
                raise ExpressionError(source, "unterminated string", pos)
            tokens.append(_Token("str", string.group(), pos, _UNESCAPE.sub(r"\1", string.group()[1:-1])))
            pos = string.end()
            continue
        match = _TOKEN.match(source, pos)
        if match is None:
            raise ExpressionError(source, f"unexpected character {source[pos]!r}", pos)
        kind, text = match.lastgroup or "", match.group()
        value: Any = text
        if kind == "num":
            try:
                value = float(text) if "." in text else int(text)
            except ValueError:
                raise ExpressionError(source, "number too large", pos) from None
        elif kind == "seg":
            value = text[1:]
        if kind != "ws":
            tokens.append(_Token(kind, text, pos, value))
        pos = match.end()
    tokens.append(_Token("end", "", len(source)))
    return tokens


class _Parser:
    """Recursive descent, lowest precedence first: or, and, not, comparison, primary."""

    def __init__(self, source: str):
        self.source = source
        self.tokens = _tokenize(source)
        self.index = 0
        self.depth = 0
        self.references: set[Reference] = set()

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.token
        self.index = min(self.index + 1, len(self.tokens) - 1)
        return token

    def is_op(self, text: str) -> bool:
        return self.token.kind == "op" and self.token.text == text

    def is_word(self, word: str, ahead: int = 0) -> bool:
        token = self.tokens[min(self.index + ahead, len(self.tokens) - 1)]
        return token.kind == "name" and token.text == word

    def error(self, reason: str, token: _Token | None = None) -> ExpressionError:
        return ExpressionError(self.source, reason, (token or self.token).pos)

    def unexpected(self) -> ExpressionError:
        if self.token.kind == "end":
            return self.error("unexpected end of expression")
        return self.error(f"unexpected token {self.token.text!r}")

    def expect(self, text: str) -> None:
        if not self.is_op(text):
            raise self.error(f"expected {text!r}")
        self.advance()

    def expression(self) -> _Node:
        if self.token.kind == "end":
            raise self.error("empty expression")
        node = self.or_()
        if self.token.kind != "end":
            raise self.unexpected()
        return node

    def reference_only(self) -> Reference:
        """The whole source must be one reference: what a `${...}` holds."""
        if self.token.kind == "end":
            raise self.error("empty reference")
        root = self.token
        if root.kind != "name" or root.text in _KEYWORDS or root.text.lower() in _LITERALS:
            raise self.unexpected()
        self.advance()
        ref = self.path(root)
        if self.token.kind != "end":
            raise self.unexpected()
        return ref

    def or_(self) -> _Node:
        node = self.and_()
        while self.is_word("or"):
            self.advance()
            node = _Logic("or", node, self.and_())
        return node

    def and_(self) -> _Node:
        node = self.not_()
        while self.is_word("and"):
            self.advance()
            node = _Logic("and", node, self.not_())
        return node

    def not_(self) -> _Node:
        self.depth += 1  # every nesting passes here, so this bounds the recursion
        if self.depth > _MAX_DEPTH:
            raise self.error("expression is nested too deeply")
        try:
            if self.is_word("not") and not self.is_word("in", 1):
                self.advance()
                return _Apply(operator.not_, (self.not_(),))
            return self.comparison()
        finally:
            self.depth -= 1

    def comparison_operator(self) -> tuple[str, int] | None:
        """The comparison operator at the current token and how many tokens it spans, if any."""
        if self.token.kind == "op" and self.token.text in _COMPARISONS:
            return self.token.text, 1
        if self.is_word("in"):
            return "in", 1
        if self.is_word("not") and self.is_word("in", 1):
            return "not in", 2
        return None

    def comparison(self) -> _Node:
        left = self.primary()
        found = self.comparison_operator()
        if found is None:
            return left
        for _ in range(found[1]):
            self.advance()
        right = self.primary()
        if self.comparison_operator() is not None:
            raise self.error("comparison operators cannot be chained; use 'and'")
        return _Apply(_COMPARISONS[found[0]], (left, right))

    def primary(self) -> _Node:
        token = self.token
        if token.kind in ("num", "str"):
            self.advance()
            return _Literal(token.value)
        if self.is_op("("):
            self.advance()
            node = self.or_()
            self.expect(")")
            return node
        if self.is_op("["):
            self.advance()
            items: list[_Node] = []
            if not self.is_op("]"):
                items.append(self.or_())
                while self.is_op(","):
                    self.advance()
                    items.append(self.or_())
            self.expect("]")
            return _Apply(lambda *values: list(values), tuple(items))
        if token.kind == "name" and token.text not in _KEYWORDS:
            self.advance()
            if token.text.lower() in _LITERALS:
                return _Literal(_LITERALS[token.text.lower()])
            if self.is_op("("):
                return self.call(token)
            return _Ref(self.path(token))
        raise self.unexpected()

    def call(self, name: _Token) -> _Node:
        if name.text not in _FUNCTIONS:
            raise self.error(f"unknown function {name.text!r}", name)
        self.advance()
        if self.is_op(")"):
            raise self.error(f"{name.text}() takes exactly one argument")
        arg = self.or_()
        if self.is_op(","):
            raise self.error(f"{name.text}() takes exactly one argument")
        self.expect(")")
        return _Apply(_FUNCTIONS[name.text], (arg,))

    def path(self, root: _Token) -> Reference:
        segments = [root.text]
        while True:
            if self.token.kind == "seg":
                segments.append(self.advance().value)
            elif self.is_op("["):
                self.advance()
                key = self.token
                if not (key.kind == "str" or (key.kind == "num" and isinstance(key.value, int) and key.value >= 0)):
                    raise self.error("expected a string or a non-negative integer inside '[ ]'")
                segments.append(str(self.advance().value))
                self.expect("]")
            else:
                break
            if len(segments) > _MAX_PATH:
                raise self.error(f"a reference of more than {_MAX_PATH} parts")
        ref = Reference(tuple(segments))
        self.references.add(ref)
        return ref


class Expression:
    """A parsed `when`/`expect`/`where` expression; evaluating it never raises."""

    def __init__(self, source: str, node: _Node, references: frozenset[Reference]):
        self.source, self._node, self.references = source, node, references

    def value(self, scope: Mapping[str, Any]) -> Any:
        return self._node.evaluate(scope)

    def test(self, scope: Mapping[str, Any]) -> bool:
        return bool(self.value(scope))

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def compile_expression(source: str) -> Expression:
    if not isinstance(source, str):
        raise ExpressionError(repr(source), "an expression must be a string")
    if len(source) > MAX_SOURCE:
        raise ExpressionError(source[:40] + "...", f"longer than {MAX_SOURCE:,} characters")
    parser = _Parser(source)
    node = parser.expression()
    return Expression(source, node, frozenset(parser.references))


# -- templates -------------------------------------------------------------------------------------


def _to_text(value: Any) -> str:
    """How a value reads inside a longer string: JSON spellings, compact JSON for containers."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping | list | tuple):
        try:
            return json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _split(text: str) -> list[str | Reference]:
    """A template string as literal text and references; `$${` is a literal `${`."""
    parts: list[str | Reference] = []
    buffer: list[str] = []
    pos = 0
    while (match := _DOLLAR.search(text, pos)) is not None:
        buffer.append(text[pos : match.start()])
        pos = match.end()
        if match.group() == "$${":
            buffer.append("${")
            continue
        end = text.find("}", pos)
        if end < 0:
            raise ExpressionError(text, "unterminated '${'", match.start())
        try:
            ref = _Parser(text[pos:end]).reference_only()
        except ExpressionError as error:
            raise ExpressionError(text, error.reason, pos + (error.position or 0)) from None
        if "".join(buffer):
            parts.append("".join(buffer))
        parts.append(ref)
        buffer, pos = [], end + 1
    buffer.append(text[pos:])
    if "".join(buffer):
        parts.append("".join(buffer))
    return parts


@dataclass(frozen=True)
class _Text:
    """A template string with references in it."""

    parts: tuple[str | Reference, ...]

    def render(self, scope: Mapping[str, Any]) -> Any:
        if len(self.parts) == 1 and isinstance(self.parts[0], Reference):
            return resolve(self.parts[0].path, scope)  # the whole string: keep the value's type
        return "".join(p if isinstance(p, str) else _to_text(resolve(p.path, scope)) for p in self.parts)


def _compile(value: Any, refs: set[Reference]) -> Any:
    """Templated strings become _Text; a subtree that would render unchanged stays the very same object."""
    if isinstance(value, str):
        parts = _split(value)
        if any(isinstance(part, Reference) for part in parts):
            refs.update(part for part in parts if isinstance(part, Reference))
            return _Text(tuple(parts))
        text = "".join(str(part) for part in parts)  # `$${` escapes resolved
        return value if text == value else text
    if isinstance(value, Mapping):
        items = {key: _compile(item, refs) for key, item in value.items()}
        return value if all(items[key] is item for key, item in value.items()) else items
    if isinstance(value, list | tuple):
        compiled = [_compile(item, refs) for item in value]
        if all(new is old for new, old in zip(compiled, value, strict=True)):
            return value
        return tuple(compiled) if isinstance(value, tuple) else compiled
    return value


def _render(compiled: Any, scope: Mapping[str, Any]) -> Any:
    if isinstance(compiled, _Text):
        return compiled.render(scope)
    if isinstance(compiled, Mapping):
        return {key: _render(item, scope) for key, item in compiled.items()}
    if isinstance(compiled, list | tuple):
        rendered = [_render(item, scope) for item in compiled]
        return tuple(rendered) if isinstance(compiled, tuple) else rendered
    return compiled


class Template:
    """A payload, message or `map.over` value with its `${...}` references parsed once, rendered per run."""

    def __init__(self, value: Any):
        refs: set[Reference] = set()
        self._compiled = _compile(value, refs)
        self.references = frozenset(refs)
        self.is_constant = not refs

    def render(self, scope: Mapping[str, Any]) -> Any:
        return self._compiled if self.is_constant else _render(self._compiled, scope)

    def __repr__(self) -> str:
        return f"Template({self._compiled!r})"


def compile_template(value: Any) -> Template:
    return Template(value)
