"""The broker's registries: subscriptions, triggers and the trust list of approvers' keys."""

from __future__ import annotations

import json
from typing import Any

from redis.exceptions import ResponseError

from phibroker.errors import BrokerUnavailable
from phibroker.grants import Grant
from phibroker.keys import WORKERS_GROUP, Keys
from phibroker.store.connection import CONNECTION_ERRORS, Connection, connect


def access(keys: Keys, agent: str | None = None) -> list[Grant]:
    """What an agent's workers send the registries: they register their subscriptions and read the
    routes (subscriptions, triggers) of the events they publish. Without `agent`, the coordinators':
    they read the routes, a trigger they start and the trust list, never writing them. Clients and the
    views read them as they read the rest (store/views.py)."""
    if agent is not None:
        return [Grant(("hset", "hgetall"), (f"~{keys.subs}", f"%R~{keys.triggers}"))]
    return [Grant(("hget", "hgetall"), (f"%R~{keys.subs}", f"%R~{keys.triggers}", f"%R~{keys.trusted_keys}"))]


def edits(keys: Keys) -> list[Grant]:
    """An operator's: triggers added and removed, keys trusted and distrusted, a subscription
    forgotten with its stream and the ids it has seen."""
    return [
        Grant(("hset", "hdel"), (f"~{keys.triggers}", f"~{keys.trusted_keys}", f"~{keys.subs}")),
        Grant(("del",), (f"~{keys.sub('*')}",)),
    ]


class Registry(Connection):
    """The broker's registries: subscriptions, triggers and the trust list of approvers' keys."""

    def choreography(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Subscriptions and triggers: name -> info."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.subs)
        pipe.hgetall(self.keys.triggers)
        subs, triggers = pipe.execute()
        return (
            {k.decode(): json.loads(v) for k, v in subs.items()},
            {k.decode(): json.loads(v) for k, v in triggers.items()},
        )

    def register_subscription(self, name: str, info: dict[str, Any]) -> None:
        self.redis.hset(self.keys.subs, name, json.dumps(info))

    def remove_subscription(self, name: str) -> bool:
        """Forget a subscription, with its stream (the events queued for it) and the ids it has seen."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(self.keys.subs, name)
        pipe.delete(self.keys.sub(name))
        pipe.delete(self.keys.sub_seen(name))  # apart: the two keys may live in different cluster slots
        removed, _, _ = pipe.execute()
        return bool(removed)

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
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self.keys.trusted_keys).items()}

    def trust_key(self, name: str, public_hex: str) -> None:
        self.redis.hset(self.keys.trusted_keys, name, public_hex)

    def distrust_key(self, name: str) -> bool:
        return bool(self.redis.hdel(self.keys.trusted_keys, name))

    def registered_subscriptions(self, timeout: float) -> dict[str, dict[str, Any]]:
        """Subscriptions over a one-off connection that gives up after `timeout` seconds and never
        retries, so `graph` draws at once when no broker answers."""
        quick = connect(self.settings, timeout=timeout, retries=0)
        try:
            raw: Any = quick.hgetall(self.keys.subs)
        except CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"cannot reach Redis at {self.settings.shown_url}: {exc}") from None
        finally:
            quick.close()
        return {k.decode(): json.loads(v) for k, v in raw.items()}
