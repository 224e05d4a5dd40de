"""The package's layers, checked on its source: imports run one way, and only `store` talks to Redis.

    cli -> web | interop | tools -> runtime -> store -> engine -> workflow -> leaves
    security -> leaves;  testing -> runtime and below

A module may import its own layer and any layer below it; leaves (errors, keys, settings, wire, grants)
import leaves only. A change that breaks the rule fails here, naming the module and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "phibroker"
LEAVES = {"errors", "keys", "settings", "wire", "grants"}
RANK = {"leaves": 0, "workflow": 1, "engine": 2, "store": 3, "runtime": 4, "tools": 5, "interop": 5, "web": 5}
RANK.update({"testing": 4.5, "cli": 6, "__main__": 7, "__init__": 4.5})


def layer(module: str) -> str:
    """`phibroker.store.worker` -> store; `phibroker.wire` -> leaves; `phibroker` -> __init__."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return "leaves" if parts[1] in LEAVES else parts[1]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "phibroker":
                names += [f"phibroker.{alias.name}" for alias in node.names]
            else:
                names.append(node.module)
    return names


MODULES = modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module: str) -> None:
    own = layer(module)
    for target in imports(MODULES[module]):
        if not target.startswith("phibroker.") or target in ("phibroker.__version__",):
            continue
        other = layer(target)
        if own == "security":
            assert other in ("leaves", "security"), f"{module} imports {target}: security uses leaves only"
        elif other == "security":
            assert RANK[own] >= RANK["runtime"], f"{module} imports {target}: security is for runtime and up"
        else:
            assert RANK[other] <= RANK[own], f"{module} ({own}) imports {target} ({other}), a layer above it"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_store_imports_redis(module: str) -> None:
    for target in imports(MODULES[module]):
        if target == "redis" or target.startswith("redis."):
            assert layer(module) == "store", f"{module} imports {target}; only phibroker.store talks to Redis"


def test_nothing_imports_the_cli_but_the_entry_points() -> None:
    for module, path in MODULES.items():
        if layer(module) in ("cli", "__main__"):
            continue
        assert not [t for t in imports(path) if t.startswith("phibroker.cli")], f"{module} imports the cli"


def test_nothing_imports_the_web_page_but_the_cli() -> None:
    for module, path in MODULES.items():
        if layer(module) in ("cli", "web", "__main__"):
            continue
        assert not [t for t in imports(path) if t.startswith("phibroker.web")], f"{module} imports the web page"


def test_the_public_api_is_importable_as_documented() -> None:
    from phibroker import Agent, Client, PhibrokerError, Retryable, __version__

    assert Agent("kalic").name == "kalic" and issubclass(Retryable, Exception) and __version__
    assert not issubclass(Retryable, PhibrokerError)  # a signal to retry, not an error to report
    assert callable(Client.from_url)
