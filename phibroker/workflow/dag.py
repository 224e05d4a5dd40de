"""Workflow graph algorithms (order, levels, cycles, critical path), kept pure so they are fast and
testable without Redis. Iterative and O(V+E): workflows can have 100k tasks in chains as deep."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from heapq import heappop, heappush
from itertools import chain, filterfalse

from phibroker.errors import CycleError
from phibroker.workflow.render import STATE_COLOURS as STATE_COLOURS  # drawings: see render
from phibroker.workflow.render import SideEdge as SideEdge
from phibroker.workflow.render import to_dot as to_dot
from phibroker.workflow.render import to_mermaid as to_mermaid

Deps = Mapping[str, Sequence[str]]
"""Task name -> names of the tasks it depends on; iteration order is the file's declaration order."""


def _declared_in_order(deps: Deps) -> bool:
    """Whether every task is declared after all its dependencies: the common case, checked cheaply."""
    seen: set[str] = set()
    for task, needs in deps.items():
        if not seen.issuperset(needs):
            return False
        seen.add(task)
    return True


def _depth_first(deps: Deps) -> tuple[list[str], list[str] | None]:
    """Tasks in depth-first post-order (so dependencies first), or as far as it got and the first cycle met.

    Roots are taken in declaration order and each task's deps in listed order, so the result is
    deterministic. Iterative (an explicit stack of iterators): chains can be 100k tasks deep.
    """
    on_path: dict[str, bool] = {}  # True while the task is on the current path, False once finished
    postorder: list[str] = []
    for root in deps:
        if root in on_path:
            continue
        on_path[root] = True
        path = [root]
        stack = [iter(deps[root])]
        while stack:
            for dep in stack[-1]:
                state = on_path.get(dep)
                if state is None:
                    on_path[dep] = True
                    path.append(dep)
                    stack.append(iter(deps[dep]))
                    break
                if state:
                    return postorder, path[path.index(dep) :] + [dep]
            else:
                task = path.pop()
                on_path[task] = False
                postorder.append(task)
                stack.pop()
    return postorder, None


def _dependencies_first(deps: Deps) -> list[str]:
    """Some topological order, the cheapest to get when declaration order is not one. Raises CycleError."""
    order, cycle = _depth_first(deps)
    if cycle:
        raise CycleError(cycle)
    return order


def find_cycle(deps: Deps) -> list[str] | None:
    """A dependency cycle as a closed path, or None, so an error can show the user exactly what loops.

    `[A, B, C, A]` reads "A depends on B, B depends on C, C depends on A" (the same direction as
    `deps`). The cycle reported is the first one a depth-first search meets when it starts from tasks
    in declaration order and follows each task's dependencies in the order they are listed.
    A self-dependency gives `[A, A]`.
    """
    if _declared_in_order(deps):
        return None
    return _depth_first(deps)[1]


def topological_order(deps: Deps) -> list[str]:
    """Every task after its dependencies, in a deterministic order a user can predict.

    Next is always the earliest-declared task whose dependencies are all placed (Kahn's algorithm with a
    heap), so a file that already declares dependencies first comes back in exactly its own order.
    Raises CycleError with `find_cycle`'s path on a cycle.
    """
    if _declared_in_order(deps):
        return list(deps)
    names = list(deps)
    position = {name: i for i, name in enumerate(names)}
    unmet = [len(needs) for needs in deps.values()]
    users: list[list[int]] = [[] for _ in names]
    for i, needs in enumerate(deps.values()):
        for dep in needs:
            users[position[dep]].append(i)
    heap = [i for i, count in enumerate(unmet) if not count]  # ascending, so already a heap
    order: list[str] = []
    while heap:
        i = heappop(heap)
        order.append(names[i])
        for user in users[i]:
            unmet[user] -= 1
            if not unmet[user]:
                heappush(heap, user)
    if len(order) < len(names):
        cycle = find_cycle(deps)
        assert cycle is not None, "some task never became ready, so there is a cycle"
        raise CycleError(cycle)
    return order


def levels(deps: Deps) -> list[list[str]]:
    """What can run in parallel: level 0 has no deps, a task's level is 1 + the highest level of its deps.

    Tasks within a level are in declaration order. Raises CycleError on a cycle.
    """
    level: dict[str, int] = {}
    level_of = level.__getitem__
    try:  # files usually declare dependencies first; a KeyError means this one does not
        for task, needs in deps.items():
            level[task] = max(map(level_of, needs)) + 1 if needs else 0
    except KeyError:
        for task in _dependencies_first(deps):
            needs = deps[task]
            level[task] = max(map(level_of, needs)) + 1 if needs else 0
    out: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for task in deps:
        out[level[task]].append(task)
    return out


def critical_path(deps: Deps, estimates: Mapping[str, float] | None = None) -> tuple[list[str], float]:
    """The chain of tasks that bounds the workflow's duration: the heaviest root-to-sink path, root first.

    A task's weight is `estimates[task]`, or 1.0 when missing. Ties go to the earliest-declared sink and,
    walking back, to the dependency listed first. Returns ([], 0.0) for an empty graph; raises CycleError.
    """
    weight_of = (estimates or {}).get
    total: dict[str, float] = {}  # weight of the heaviest path from a root to the task, the task included
    total_of = total.__getitem__
    try:  # as in `levels`: declaration order first, a real topological order if that fails
        for task, needs in deps.items():
            total[task] = (max(map(total_of, needs)) if needs else 0.0) + weight_of(task, 1.0)
    except KeyError:
        for task in _dependencies_first(deps):
            needs = deps[task]
            total[task] = (max(map(total_of, needs)) if needs else 0.0) + weight_of(task, 1.0)
    has_dependents = set(chain.from_iterable(deps.values()))
    end = max(filterfalse(has_dependents.__contains__, deps), key=total_of, default=None)
    if end is None:
        return [], 0.0
    path = [end]
    while needs := deps[path[-1]]:  # walk back through the heaviest dependency, the first listed on ties
        path.append(max(needs, key=total_of))
    path.reverse()
    return path, total[end]


def dependents(deps: Deps) -> dict[str, list[str]]:
    """Reverse edges, for walking downstream (what to skip or cancel): task -> tasks that depend on it.

    Every task is a key; each list is in declaration order, without repeats.
    """
    out: dict[str, list[str]] = {task: [] for task in deps}
    for task, needs in deps.items():
        for dep in needs:
            users = out[dep]
            if not users or users[-1] != task:
                users.append(task)
    return out


def ancestors(deps: Deps, task: str) -> set[str]:
    """Every task `task` transitively depends on, not itself: what must finish before it can start."""
    seen: set[str] = set()
    stack = list(deps[task])
    while stack:
        dep = stack.pop()
        if dep not in seen:
            seen.add(dep)
            stack.extend(deps[dep])
    seen.discard(task)
    return seen


def ready(deps: Deps, finished: Collection[str], started: Collection[str] = ()) -> list[str]:
    """Tasks the scheduler may start now: not finished, not started, every dependency finished.

    In declaration order.
    """
    done = set(finished)
    busy = set(started)
    return [task for task, needs in deps.items() if task not in done and task not in busy and done.issuperset(needs)]
