"""The broker's registries: subscriptions, triggers and the trust list of approvers' keys."""

from __future__ import annotations

import json
from typing import Any

from redis.exceptions import ResponseError

from phibroker.errors import BrokerUnavailable
from phibroker.grants import Grant
from phibroker.keys import WORKERS_GROUP, Keys
from phibroker.store.connection import CONNECTION_ERRORS, Connection, connect, roster

MAX_SUBSCRIPTION_BYTES = 16 * 1024  # a name's event and `where` (1,000 characters at most), and a little more


def access(keys: Keys, agent: str | None = None) -> list[Grant]:
    """What an agent's workers send the registries: they register their subscriptions in their own hash
    (the coordinators route the events they publish). Without `agent`, the coordinators': they write
    the roster (an agent may not: junk names would hide the others), read the routes, a trigger they
    start and the trust list. Clients and the views read them as they read the rest (store/views.py)."""
    every_sub = (f"%R~{keys.roster}", f"%R~{keys.subs_of('*')}")
    if agent is not None:
        return [Grant(("hset",), (f"~{keys.subs_of(agent)}",))]
    return [
        Grant(("sadd",), (f"%W~{keys.roster}",)),
        Grant(("hget", "hgetall", "smembers"), (*every_sub, f"%R~{keys.triggers}", f"%R~{keys.trusted_keys}")),
    ]


def edits(keys: Keys) -> list[Grant]:
    """An operator's: triggers added and removed, keys trusted and distrusted, a subscription
    forgotten with its stream and the ids it has seen."""
    return [
        Grant(
            ("hset", "hdel", "hexists", "smembers"),
            (f"~{keys.triggers}", f"~{keys.trusted_keys}", f"~{keys.subs_of('*')}", f"~{keys.roster}"),
        ),
        Grant(("del",), (f"~{keys.sub('*')}",)),
    ]


class Registry(Connection):
    """The broker's registries: subscriptions, triggers and the trust list of approvers' keys."""

    def choreography(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Subscriptions (as `by_name`) and triggers: name -> info."""
        return by_name(self.routing()[0]), self._triggers()

    def routing(self) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, dict[str, Any]]]:
        """Every agent's subscription entries (a name two agents registered comes twice: a router routes
        by each, and the subscription's seen-set runs the event once) and the triggers."""
        return subscriptions(self.redis, self.keys), self._triggers()

    def _triggers(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in self.redis.hgetall(self.keys.triggers).items()}

    def register_subscription(self, agent: str, name: str, info: dict[str, Any]) -> None:
        """Into the agent's own hash; routers find it once the agent is on the roster (`add_to_roster`)."""
        self.redis.hset(self.keys.subs_of(agent), name, json.dumps(info))

    def registrants(self, name: str) -> set[str]:
        """The agents on the roster that registered the subscription `name`."""
        agents = self.roster()
        pipe = self.redis.pipeline(transaction=False)
        for agent in agents:
            pipe.hexists(self.keys.subs_of(agent), name)
        return {agent for agent, has in zip(agents, pipe.execute(), strict=True) if has}

    def add_to_roster(self, agent: str) -> None:
        """Put an agent on the roster, where every router and view looks: a coordinator does, as the
        agent's signed message asks, or the agent's own worker where agents sign nothing."""
        self.redis.sadd(self.keys.roster, agent)

    def remove_subscription(self, name: str) -> bool:
        """Forget a subscription, with its stream (the events queued for it) and the ids it has seen."""
        agents = self.roster()
        pipe = self.redis.pipeline(transaction=False)
        for agent in agents:
            pipe.hdel(self.keys.subs_of(agent), name)
        pipe.delete(self.keys.sub(name))
        pipe.delete(self.keys.sub_seen(name))  # apart: the two keys may live in different cluster slots
        removed = pipe.execute()[: len(agents)]
        return any(removed)

    def register_trigger(self, name: str, info: dict[str, Any]) -> None:
        self.redis.hset(self.keys.triggers, name, json.dumps(info))

    def remove_trigger(self, name: str) -> bool:
        return bool(self.redis.hdel(self.keys.triggers, name))

    def trigger(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.keys.triggers, name)
        return json.loads(raw) if raw else None

    def subscription_health(self, name: str) -> dict[str, Any]:
        """Length, lag and events dropped unread by retention (oldest go first, so it is exact)."""
        stream = self.keys.sub(name)
        try:
            info = self.redis.xinfo_stream(stream)
            groups = self.redis.xinfo_groups(stream)
        except ResponseError:
            return {"length": 0, "dropped": 0, "lag": None, "pending": 0}
        group = next((g for g in groups if g["name"] in (WORKERS_GROUP, WORKERS_GROUP.encode())), None)
        added = int(info.get("entries-added") or 0)
        read = int(group.get("entries-read") or 0) if group else 0
        trimmed = added - int(info["length"])
        return {
            "length": int(info["length"]),
            "dropped": max(0, trimmed - read),
            "lag": group.get("lag") if group else None,
            "pending": int(group["pending"]) if group else 0,
        }

    def trusted_keys(self) -> dict[str, str]:
        """The configured trust list: approver name -> public key (hex). Empty: none configured."""
        entries = self.redis.hgetall(self.keys.trusted_keys).items()  # not hex: refused as untrusted, later
        return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in entries}

    def trust_key(self, name: str, public_hex: str) -> None:
        self.redis.hset(self.keys.trusted_keys, name, public_hex)

    def distrust_key(self, name: str) -> bool:
        return bool(self.redis.hdel(self.keys.trusted_keys, name))

    def registered_subscriptions(self, timeout: float) -> dict[str, dict[str, Any]]:
        """Subscriptions over a one-off connection that gives up after `timeout` seconds and never
        retries, so `graph` draws at once when no broker answers."""
        quick = connect(self.settings, timeout=timeout, retries=0)
        try:
            return by_name(subscriptions(quick, self.keys))
        except CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"cannot reach Redis at {self.settings.shown_url}: {exc}") from None
        finally:
            quick.close()


def subscriptions(client: Any, keys: Keys) -> list[tuple[str, dict[str, Any]]]:
    """Every agent's subscription entries, (name, info), each info's `agent` the one whose hash holds it
    (whatever the entry says). Two round trips: the roster, then its agents' hashes."""
    agents = roster(client, keys)
    pipe = client.pipeline(transaction=False)
    for agent in agents:
        pipe.hgetall(keys.subs_of(agent))
    found: list[tuple[str, dict[str, Any]]] = []
    for agent, raw in zip(agents, pipe.execute(), strict=True):
        for name, value in raw.items():
            try:  # an agent writes its own hash: whatever it holds must not stop the others' routes
                info = json.loads(value) if len(value) <= MAX_SUBSCRIPTION_BYTES else None
            except (ValueError, RecursionError):
                continue
            if isinstance(info, dict):
                found.append((name.decode(errors="replace"), {**info, "agent": agent}))
    return found


def by_name(entries: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Subscription entries by name, as the views show them: of a name two agents registered, the entry
    of the agent it is named after (`AGENT.fn`), else the first."""
    named: dict[str, dict[str, Any]] = {}
    for name, info in entries:
        if name not in named or name.startswith(f"{info['agent']}."):
            named[name] = info
    return named
