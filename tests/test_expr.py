"""The expression and template language: semantics, parse errors, and that it cannot reach Python."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phibroker.errors import ExpressionError
from phibroker.workflow.expr import (
    ROOTS_WORKFLOW,
    Expression,
    Reference,
    compile_expression,
    compile_template,
    resolve,
    task_of,
)

SCOPE: dict[str, Any] = {
    "params": {"topic": "redis", "count": 3, "ratio": 0.5, "none": None, "flag": True, "tags": ["a", "b"]},
    "tasks": {
        "Audit": {"result": {"vulnerabilities_found": 2, "ok": False}},
        "Research": {"result": {"sources": [{"title": "First"}, {"title": "Second"}], "meta": {"k": 1}}},
        "build": {"result": {"ok": False}},
        "build.api": {"result": {"ok": True}},
        "build-web": {"result": {"ok": True, "odd key": 7, "a.b": 8}},
    },
}


def value(source: str, scope: dict[str, Any] | None = None) -> Any:
    return compile_expression(source).value(SCOPE if scope is None else scope)


def truth(source: str, scope: dict[str, Any] | None = None) -> bool:
    return compile_expression(source).test(SCOPE if scope is None else scope)


# -- templates ---------------------------------------------------------------------------------------


def test_whole_string_reference_keeps_the_type() -> None:
    scope = SCOPE
    assert compile_template("${params.count}").render(scope) == 3
    assert compile_template("${params.tags}").render(scope) == ["a", "b"]
    assert compile_template("${tasks.Research.result.meta}").render(scope) == {"k": 1}
    assert compile_template("${params.none}").render(scope) is None
    assert compile_template("${params.missing}").render(scope) is None
    assert compile_template("${  params.flag  }").render(scope) is True


def test_interpolation_formats_values() -> None:
    template = compile_template(
        "t=${params.topic} n=${params.count} r=${params.ratio} f=${params.flag} x=${params.none} "
        "l=${params.tags} d=${tasks.Research.result.meta} m=${params.missing}"
    )
    assert template.render(SCOPE) == 't=redis n=3 r=0.5 f=true x=null l=["a","b"] d={"k":1} m=null'


def test_paths_with_indexes_and_dotted_task_names() -> None:
    assert compile_template("${tasks.Research.result.sources.0.title}").render(SCOPE) == "First"
    assert compile_template("${tasks.Research.result.sources.1.title}").render(SCOPE) == "Second"
    assert compile_template("${tasks.Research.result.sources.2.title}").render(SCOPE) is None
    assert compile_template("${tasks.build.api.result.ok}").render(SCOPE) is True
    assert compile_template("${tasks.build.result.ok}").render(SCOPE) is False
    assert compile_template("${tasks.build-web.result.ok}").render(SCOPE) is True


def test_payload_is_templated_recursively_but_not_keys() -> None:
    payload = {
        "topic": "${params.topic}",
        "${params.topic}": "key stays",
        "nested": [{"n": "${params.count}"}, 5, None, True, "plain"],
        "num": 1.5,
    }
    template = compile_template(payload)
    assert template.render(SCOPE) == {
        "topic": "redis",
        "${params.topic}": "key stays",
        "nested": [{"n": 3}, 5, None, True, "plain"],
        "num": 1.5,
    }
    assert template.references == {Reference(("params", "topic")), Reference(("params", "count"))}
    assert not template.is_constant
    assert payload["topic"] == "${params.topic}"  # the input is not modified


def test_constant_template_returns_the_value() -> None:
    payload = {"a": [1, "two", {"b": None}]}
    template = compile_template(payload)
    assert template.is_constant and template.references == frozenset()
    assert template.render(SCOPE) is payload


def test_escape() -> None:
    assert compile_template("cost $${x}").render(SCOPE) == "cost ${x}"
    assert compile_template("$${params.topic} is ${params.topic}").render(SCOPE) == "${params.topic} is redis"
    template = compile_template({"a": "$${b}"})
    assert template.is_constant and template.render({}) == {"a": "${b}"}
    assert compile_template("$ { and $x and {}").render({}) == "$ { and $x and {}"


@pytest.mark.parametrize(
    ("source", "reason", "position"),
    [
        ("abc ${params.topic", "unterminated '${'", 4),
        ("${}", "empty reference", 2),
        ("${  }", "empty reference", 4),
        ("x ${params.a == 1}", "unexpected token '=='", 13),
        ("${params.}", "unexpected character '.'", 8),
        ("${1abc}", "unexpected token '1'", 2),
        ("${true}", "unexpected token 'true'", 2),
    ],
)
def test_template_errors(source: str, reason: str, position: int) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_template({"payload": [source]})
    assert caught.value.source == source
    assert caught.value.reason == reason
    assert caught.value.position == position


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    )
)
def test_template_without_dollar_brace_is_unchanged(value: Any) -> None:
    if "${" in repr(value):
        return
    template = compile_template(value)
    assert template.is_constant
    assert template.render({"params": {}}) == value


# -- expressions: semantics --------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["==", "!=", "<", "<=", ">", ">=", "in", "not in"])
def test_null_rule_on_every_comparison(op: str) -> None:
    assert value(f"params.none {op} 1") is False
    assert value(f"1 {op} params.none") is False
    assert value(f"null {op} null") is False
    assert value(f"params.missing {op} [1]") is False
    assert value(f"params.missing.deeper {op} 'x'") is False


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("params.count == 3", True),
        ("params.count == 3.0", True),
        ("params.count != 3", False),
        ("params.count > 2.5", True),
        ("params.count >= 3", True),
        ("params.count < 3", False),
        ("params.count <= 3", True),
        ("params.topic == 'redis'", True),
        ('params.topic < "s"', True),
        ("params.tags == ['a', 'b']", True),
        ("params.flag == true", True),
        # incompatible types: never an exception, never true (except !=, which they certainly are)
        ("params.topic < 5", False),
        ("params.topic > 5", False),
        ("params.tags > 1", False),
        ("params.topic == 5", False),
        ("true == 1", False),
        ("false == 0", False),
        ("true > false", False),
        ("params.topic != 5", True),
        ("[1, 'a'] < [1, 2]", False),
    ],
)
def test_comparisons(source: str, expected: bool) -> None:
    assert value(source) is expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("'a' in params.tags", True),
        ("'z' in params.tags", False),
        ("'ed' in params.topic", True),
        ("1 in params.topic", False),
        ("'k' in tasks.Research.result.meta", True),
        ("'q' in tasks.Research.result.meta", False),
        ("1 in [1, 2]", True),
        ("true in [1]", False),
        ("1 in 5", False),
        ("[1] in tasks.Research.result.meta", False),
        ("'z' not in params.tags", True),
        ("'a' not in params.tags", False),
        ("'x' not in params.none", False),
        ("params.none not in [1]", False),
        ("'q' not in tasks.Research.result.meta", True),
    ],
)
def test_membership(source: str, expected: bool) -> None:
    assert value(source) is expected


def test_logic_returns_bools_and_short_circuits() -> None:
    assert value("params.topic and params.count") is True
    assert value("params.none or 0") is False
    assert value("params.none or params.topic") is True
    assert value("not params.none") is True
    assert value("not params.topic") is False
    assert value("false and len(x) == 1") is False
    assert value("true or nothing.here") is True


def test_precedence_and_parentheses() -> None:
    scope = {"a": 1, "b": 2, "c": True, "d": False}
    # not (a == b) and c, or d
    assert value("not a == b and c or d", scope) is True
    assert value("not (a == b and c) or d", scope) is True
    assert value("not a == 1 and c", scope) is False
    assert value("a == 1 and (d or c)", scope) is True
    assert value("a == 1 and d or c", scope) is True
    assert value("a == 2 and d or c", scope) is True
    assert value("a == 2 and (d or c)", scope) is False
    assert value("((a)) == ((1))", scope) is True
    assert value("not not c", scope) is True


def test_literals() -> None:
    assert value("-5") == -5
    assert value("-0.5") == -0.5
    assert value("x == -1", {"x": -1}) is True
    assert value("x>-1", {"x": 0}) is True
    assert value("'it\\'s'") == "it's"
    assert value('"say \\"hi\\""') == 'say "hi"'
    assert value("'back\\\\slash'") == "back\\slash"
    assert value("'keep\\n'") == "keep\\n"
    assert value("[1, 'a', x, [true, null]]", {"x": 2}) == [1, "a", 2, [True, None]]
    assert value("[]") == []
    for text, expected in [("true", True), ("TRUE", True), ("True", True), ("False", False)]:
        assert value(text) is expected
    for text in ("null", "NULL", "None", "none"):
        assert value(text) is None


def test_functions() -> None:
    assert value("len(params.topic)") == 5
    assert value("len(params.tags) == 2") is True
    assert value("len(tasks.Research.result.meta)") == 1
    assert value("len(params.count)") is None
    assert value("len(params.none)") is None
    assert value("len(params.missing) > 0") is False
    assert value("exists(params.topic)") is True
    assert value("exists(tasks.Audit.result.ok)") is True  # False is a value
    assert value("exists(params.none)") is False
    assert value("exists(params.missing.x)") is False
    assert value("not exists(params.missing)") is True


def test_references_paths() -> None:
    assert truth("tasks.build.api.result.ok")
    assert not truth("tasks.build.result.ok")
    assert truth("tasks.build-web.result.ok")
    assert value("tasks.Research.result.sources.1.title") == "Second"
    assert value("tasks.Research.result.sources[0].title") == "First"
    assert value('tasks["build-web"]["result"]["odd key"]') == 7
    assert value('tasks.build-web.result["a.b"]') == 8
    assert value("tasks.Research.result.sources.9") is None
    assert value("params.topic.0") is None  # strings are not indexed
    assert value("params.count.x") is None
    expr = compile_expression("tasks.Audit.result.vulnerabilities_found > 0 and params.x in ['a']")
    assert isinstance(expr, Expression)
    assert expr.references == {
        Reference(("tasks", "Audit", "result", "vulnerabilities_found")),
        Reference(("params", "x")),
    }
    assert str(Reference(("tasks", "build-web", "result", "odd key", "0"))) == 'tasks.build-web.result["odd key"].0'


def test_resolve_prefers_the_longest_key() -> None:
    scope = {"tasks": {"a": {"b": {"c": 1}}, "a.b": {"c": 2}}}
    assert resolve(("tasks", "a", "b", "c"), scope) == 2
    assert resolve(("tasks", "a"), scope) == {"b": {"c": 1}}
    assert resolve(("nope",), scope) is None
    assert resolve((), scope) is None
    assert resolve(("tasks", "a", "b", "c", "d"), scope) is None


def test_task_of() -> None:
    names = {"build", "build.api", "Audit"}
    assert task_of(Reference(("tasks", "build", "api", "result", "ok")), names) == "build.api"
    assert task_of(Reference(("tasks", "build", "result")), names) == "build"
    assert task_of(Reference(("tasks", "Audit")), names) == "Audit"
    assert task_of(Reference(("tasks", "Other", "result")), names) is None
    assert task_of(Reference(("params", "build")), names) is None
    assert ROOTS_WORKFLOW == {"params", "tasks"}


def test_evaluation_never_raises_for_data() -> None:
    odd: dict[str, Any] = {"x": {"y": object()}, "l": [1, "a", None], "s": "str"}
    for source in (
        "x.y > 1",
        "x.y == x",
        "l > [2]",
        "s.0.1",
        "l[5]",
        "x in l",
        "l in x",
        "len(x.y)",
        "x < s",
    ):
        compile_expression(source).value(odd)


def test_no_access_to_python_internals() -> None:
    scope = {"params": {"a": 1}, "s": "text"}
    assert value("params.__class__", scope) is None
    assert value("params.__class__.__mro__", scope) is None
    assert value("s.__len__", scope) is None
    assert value("params.keys", scope) is None
    assert compile_template("${params.__class__}").render(scope) is None
    assert compile_template("${params.__dict__}").render(scope) is None
    for source in ("__import__('os')", "params.get('a')", "open('/etc/passwd')", "eval('1')", "s.upper()"):
        with pytest.raises(ExpressionError):
            compile_expression(source)


# -- expressions: parse errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "reason", "position"),
    [
        ("", "empty expression", 0),
        ("   ", "empty expression", 3),
        ("a > > b", "unexpected token '>'", 4),
        ("a >", "unexpected end of expression", 3),
        ("a b", "unexpected token 'b'", 2),
        ("'abc", "unterminated string", 0),
        ('x == "ab\\"', "unterminated string", 5),
        ("(a == 1", "expected ')'", 7),
        ("(a == 1]", "expected ')'", 7),
        ("[1, 2", "expected ']'", 5),
        ("foo(1)", "unknown function 'foo'", 0),
        ("a and bar(x)", "unknown function 'bar'", 6),
        ("len()", "len() takes exactly one argument", 4),
        ("len(a, b)", "len() takes exactly one argument", 5),
        ("a < b < c", "comparison operators cannot be chained; use 'and'", 6),
        ("a == b != c", "comparison operators cannot be chained; use 'and'", 7),
        ("a in b in c", "comparison operators cannot be chained; use 'and'", 7),
        ("a @ b", "unexpected character '@'", 2),
        ("a.", "unexpected character '.'", 1),
        ("a[-1]", "expected a string or a non-negative integer inside '[ ]'", 2),
        ("a[x]", "expected a string or a non-negative integer inside '[ ]'", 2),
        ("a[0", "expected ']'", 3),
        ("not", "unexpected end of expression", 3),
        ("a not b", "unexpected token 'not'", 2),
        ("and a", "unexpected token 'and'", 0),
        ("()", "unexpected token ')'", 1),
        ("a == 1.2.3", "unexpected token '.3'", 8),
        ("(" * 200 + "a" + ")" * 200, "expression is nested too deeply", 64),
    ],
)
def test_parse_errors(source: str, reason: str, position: int) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source)
    assert caught.value.source == source
    assert caught.value.reason == reason
    assert caught.value.position == position


@given(st.text(max_size=60))
def test_compile_arbitrary_text_only_raises_expression_error(source: str) -> None:
    try:
        expr = compile_expression(source)
    except ExpressionError:
        return
    expr.test({"params": {}, "tasks": {}})


@given(st.text(alphabet="ab01 .()[]'\"=!<>-,_inotdlenxsu", max_size=40))
def test_compile_expression_like_text_only_raises_expression_error(source: str) -> None:
    try:
        expr = compile_expression(source)
    except ExpressionError:
        return
    expr.value({"a": [1, {"b": "x"}], "b": None})


@given(st.text(max_size=40))
def test_compile_template_arbitrary_text_only_raises_expression_error(text: str) -> None:
    try:
        template = compile_template({"k": [text]})
    except ExpressionError:
        return
    template.render({})


def test_an_expression_too_long_or_a_reference_of_too_many_parts_is_one_clear_error() -> None:
    with pytest.raises(ExpressionError, match="longer than 10,000 characters"):
        compile_expression("x == " + "1" * 10_000)
    with pytest.raises(ExpressionError, match="more than 64 parts"):
        compile_expression("data" + ".a" * 64)
    assert compile_expression("data" + ".a" * 63 + " == 1").test({"data": {"a": 1}}) is False
    dotted = {"tasks": {"a.b.c": {"result": 7}}}  # names may contain dots: the longest key wins
    assert compile_expression("tasks.a.b.c.result == 7").test(dotted)
