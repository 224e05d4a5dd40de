"""Once a trust list exists, this machine's own key counts only if listed: `approve` is refused with the
key's name and the command that trusts it, and that command makes the next `approve` go through."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from phibroker.runtime.client import Client
from phibroker.security import signing
from phibroker.settings import Settings
from tests.conftest import Processes
from tests.test_failures import flow
from tests.test_patterns import cli, open_request

GATE = """
name: gate
tasks:
  Build: {agent: probe, command: work}
  Approve: {approval: {message: "Ship it?", approvers: [stryk]}, depends_on: [Build]}
"""


def test_a_local_key_left_off_the_trust_list_is_refused_with_the_command_that_trusts_it(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    stryk = signing.generate(settings.home, "stryk")  # the local key: trusted while no trust list exists
    alice = signing.generate(tmp_path / "alice-home", "alice")
    trusted = cli(settings, "keys", "trust", "alice", alice.public_hex)
    assert trusted.returncode == 0, trusted.stderr
    wf_id = client.submit(flow(tmp_path, GATE))
    request = open_request(client, wf_id, procs)

    refused = cli(settings, "approve", request["id"])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "'stryk' is not in the trust list" in line and "local keys count only once trusted" in line
    command = re.search(r"phibroker keys trust stryk [0-9a-f]{64}", line)
    assert command and command.group().endswith(stryk.public_hex), line
    assert client.status(wf_id)["state"] == "waiting_approval"

    following = cli(settings, *shlex.split(command.group())[1:])
    assert following.returncode == 0, following.stderr
    approved = cli(settings, "approve", request["id"])
    assert approved.returncode == 0, approved.stderr
    assert client.wait(wf_id, timeout=30)["state"] == "succeeded"
