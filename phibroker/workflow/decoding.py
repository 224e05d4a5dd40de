"""Reads a workflow file's bytes into plain data, bounded: size, nesting, YAML aliases, duplicate keys.

YAML 1.2 as users expect it (`on:` is a key, not `True`; dates stay text) and nothing JSON cannot
hold, so what `validate` accepts is what a run can store. Every problem is one `WorkflowFileError` line,
found in bounded time and memory whatever the file holds.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from phibroker.errors import WorkflowFileError
from phibroker.wire import nests_deeper
from phibroker.workflow.spec import MAX_DEPTH


@contextmanager
def collector_paused() -> Iterator[None]:
    """Decoding and checking a big file makes objects by the hundred thousand, none of them in cycles:
    the cyclic collector would walk them again and again (half the time of a 100,000-task file)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# What a workflow file may make the parsers do; past each, a one-line error in bounded time and memory.
MAX_FILE_BYTES = 16 * 1024 * 1024  # a generated 100,000-task file is ~12 MB; YAML takes ~50x its size to decode
MAX_ALIASES = 10_000  # `*name` uses: a hand-written file shares a block tens of times, a generated one never
MAX_ALIAS_NODES = 1_000_000  # nodes the aliases add once expanded (a billion laughs: 10^9 from 400 bytes)
_TOO_DEEP = f"maps and lists nest deeper than {MAX_DEPTH} levels"


def read_bounded(path: Path) -> bytes:
    """The file, or just enough of it to tell that it is too big (a 10 GB file is not read whole)."""
    with path.open("rb") as file:
        return file.read(MAX_FILE_BYTES + 1)


def decode(text: bytes | str, suffix: str = "") -> Any:
    """YAML or JSON by suffix (JSON if it starts with `{` otherwise); duplicate keys are errors.

    Bounded: the size, what YAML aliases expand to, and the nesting, each checked before it costs."""
    if len(text) > MAX_FILE_BYTES:
        raise WorkflowFileError(f"the file is over {MAX_FILE_BYTES >> 20} MiB, the limit for a workflow file")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise WorkflowFileError("the file is not UTF-8 text") from None
    if suffix == ".json" or (suffix not in (".yaml", ".yml") and text.lstrip().startswith("{")):
        data = _decode_json(text)
    else:
        data = _decode_yaml(text)
    if nests_deeper(data, MAX_DEPTH):
        raise WorkflowFileError(_TOO_DEEP)
    return data


def _decode_json(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as exc:
        raise WorkflowFileError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:  # the decoder recurses once a level
        raise WorkflowFileError(_TOO_DEEP) from None
    except ValueError as exc:  # a number of more than 4300 digits
        raise WorkflowFileError(f"invalid JSON: {str(exc).partition(':')[0]}") from None


def _decode_yaml(text: str) -> Any:
    loader = _UniqueKeyLoader(text)
    loader.anchored = "&" in text  # no anchor, no alias: nothing to expand
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        raise WorkflowFileError(_yaml_problem(text, exc)) from None
    except yaml.YAMLError as exc:
        raise WorkflowFileError(f"invalid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:  # the pure-Python parser (no libyaml) recurses a few times a level
        raise WorkflowFileError(_TOO_DEEP) from None
    except ValueError as exc:  # a number of more than 4300 digits
        raise WorkflowFileError(f"invalid YAML: {str(exc).partition(':')[0]}") from None
    finally:
        loader.dispose()


_YAML_LINE_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")  # what PyYAML counts as a new line


def _yaml_problem(text: str, exc: yaml.MarkedYAMLError) -> str:
    """One line for a YAML syntax error. A tab in the indentation is named as such: PyYAML only says
    "found character that cannot start any token", and an editor shows the tab as spaces."""
    mark = exc.problem_mark
    if mark is None:
        return f"invalid YAML: {exc.problem or exc}"
    lines = _YAML_LINE_BREAK.split(text)
    line = lines[mark.line] if mark.line < len(lines) else ""
    indent = line[: len(line) - len(line.lstrip(" \t"))]
    if "\t" in indent and mark.column <= len(indent):
        return f"invalid YAML at line {mark.line + 1}: tabs are not allowed in YAML indentation, use spaces"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem or exc}"


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise WorkflowFileError(f"duplicate key {key!r}")
            seen.add(key)
    return out


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader (the C one when built) that refuses duplicate keys instead of keeping the last,
    and checks what aliases expand to before building anything."""

    anchored = True  # whether the text may hold anchors (and so aliases)

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        if self.anchored:
            _check_aliases(node)
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: the safe constructor merges, and keys written here win
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                break  # a list or map as a key: the safe constructor's own error says so
            if key in seen:
                mark = key_node.start_mark
                raise WorkflowFileError(f"duplicate key {key!r} at line {mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_aliases(root: yaml.Node) -> None:
    """Aliases turn a small file huge (a billion laughs) or endless (an alias inside its own anchor).
    Count the nodes they stand for without expanding them: each shared node is walked once."""
    sizes: dict[int, int] = {}  # id(node) -> how many nodes it is, expanded
    walking: set[int] = set()  # the nodes on the way down to here: meeting one again is a loop
    aliases = 0
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, walked = stack.pop()
        key = id(node)
        if walked:
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            walking.discard(key)
        elif key in sizes:
            aliases += 1
            if aliases > MAX_ALIASES:
                raise WorkflowFileError(f"the YAML uses more than {MAX_ALIASES:,} aliases")
        elif key in walking:
            line = node.start_mark.line + 1
            raise WorkflowFileError(f"invalid YAML at line {line}: an alias refers to a node it is inside of")
        elif isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
        else:
            walking.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    added = sizes[id(root)] - len(sizes)
    if added > MAX_ALIAS_NODES:
        raise WorkflowFileError(f"YAML aliases expand to {added:,} more nodes, over the limit of {MAX_ALIAS_NODES:,}")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _not_json(loader: Any, node: yaml.Node) -> Any:
    """A workflow file holds what JSON can: a set, bytes or a date would pass `validate`, then fail to submit."""
    kind = node.tag.rpartition(":")[2]
    problem = f"!!{kind} values are not allowed: a workflow file holds JSON values (quote it as a string)"
    raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)


def _yaml12_booleans(loader: Any) -> None:
    """Only true/false are booleans (YAML 1.2), so `on:` stays the key `on`, not True; and a date stays
    text (YAML 1.2 has no timestamps), as in JSON."""
    dropped = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    resolvers = {
        first: [(tag, regexp) for tag, regexp in entries if tag not in dropped]
        for first, entries in loader.yaml_implicit_resolvers.items()
    }
    loader.yaml_implicit_resolvers = resolvers
    loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )


_yaml12_booleans(_UniqueKeyLoader)
for _tag in ("binary", "set", "omap", "pairs", "timestamp"):
    _UniqueKeyLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _not_json)
