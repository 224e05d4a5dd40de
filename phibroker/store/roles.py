"""Each Redis user's grants, from the store roles its process runs, for `phibroker acl generate`
(`security/acl.py` makes the users of them; it does not import the store itself)."""

from __future__ import annotations

from phibroker.grants import Roles
from phibroker.store import client, coordinator, views, worker

ROLES = Roles(
    agent=worker.access,
    coordinator=coordinator.access,
    client=client.access,
    approver=client.approver_access,
    watch=views.access,
    admin=client.admin_access,
)
