"""The container side of network egress: a task granted a network reaches its own egress
proxy, and nothing else.

Under runc, a task's container keeps the network namespace Docker gave it (``network_mode:
none``: only ``lo``). Once it has started, and before its command runs, the host adds one veth
pair: the task's end moves into that namespace with a /30 address and no route beyond the /30
(so no default route, and IPv6 off there); the host's end gets the other address, on which the
task's :class:`~parity_sandbox._proxy.EgressProxy` listens. The task learns it as
``HTTP_PROXY``/``HTTPS_PROXY``. An nftables table on the host lets a task's veth reach only its
own proxy's address and port, and never forwards anything from or to a task's veth.

Under runsc, gVisor's own network stack serves the task: started with ``--network=sandbox``
(the OCI runtime :data:`RUNSC_RUNTIME`, registered by ``scripts/docker-setup.sh``), it copies
the interfaces, addresses and routes of its namespace once, when it starts, takes the
addresses off the host's side and speaks to the veth through a raw socket. So the veth must be
in place before the sandbox starts: a "pause" container (runc, hardened like a task's, see
``spec.pause_container``) is started first and gets the veth as above, then the task's
container joins its namespace (``network_mode: container:PAUSE``). gVisor then sees what a
runc task sees: ``lo`` and the /30, no default route, no IPv6 address; a task has no
capability to change that, and the host's table is the same. The pause container carries the
run's labels, so it goes with the task, and ``reap`` finds it after a crash.

Everything is per task and named after the run (``psb`` and 8 hex digits of its run id, then
``h`` for the host's end): the veth goes with the container's namespace and the proxy when
the run ends; ``reap`` removes what a crashed process left. The nftables rules are the same
for every task (a task's veth reaches the proxy port at its own address only).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from parity_sandbox._egress import AllowList
from parity_sandbox._exceptions import RuntimeUnavailable
from parity_sandbox._proxy import EgressProxy

#: Names of the host's ends of task veths start so (``psb`` + 8 hex digits + ``h``).
PREFIX = "psb"
#: The nftables table (family ``inet``) that holds the rules.
TABLE = "parity_sandbox_egress"
#: The port a task's proxy listens on, at its veth's host address.
PROXY_PORT = 3128
#: The OCI runtime that runs a task granted a network under gVisor (runsc with
#: ``--network=sandbox``, through scripts/runsc-egress).
RUNSC_RUNTIME = "runsc-egress"
_TOOLS = ("ip", "nft", "nsenter")
#: Seconds a network command may take.
_COMMAND_TIMEOUT = 20.0

#: A task's veth may reach the proxy port at an address of that same veth (its own proxy:
#: another task's address is on another veth), and nothing else; nothing is forwarded.
_RULES = f"""
table inet {TABLE} {{
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname "{PREFIX}*" tcp dport {PROXY_PORT} fib daddr . iif type local accept
        iifname "{PREFIX}*" drop
    }}
    chain forward {{
        type filter hook forward priority -10; policy accept;
        iifname "{PREFIX}*" drop
        oifname "{PREFIX}*" drop
    }}
}}
"""


def support_problem() -> str | None:
    """Why this host cannot give tasks egress (``None``: it can)."""
    if os.geteuid() != 0:
        return "network egress needs the executor to run as root (it adds veths and rules)"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return (
            f"network egress needs {', '.join(missing)} on the host "
            "(Debian: apt-get install iproute2 nftables util-linux)"
        )
    return None


def _run(argv: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeUnavailable(
            f"network egress: {' '.join(argv[:4])} failed: {done.stderr.strip()[:500]}"
        )
    return done.stdout


def host_name(run_id: str) -> str:
    return f"{PREFIX}{run_id[:8]}h"


@dataclass
class Slot:
    """One task's egress: its veth's names and addresses, and its proxy."""

    run_id: str
    network: ipaddress.IPv4Network
    allow: AllowList
    proxy: EgressProxy | None = field(default=None, repr=False)
    attached: bool = False

    @property
    def host_end(self) -> str:
        return host_name(self.run_id)

    @property
    def task_end(self) -> str:
        return f"{PREFIX}{self.run_id[:8]}c"

    @property
    def host_address(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def task_address(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 2

    @property
    def proxy_url(self) -> str:
        return f"http://{self.host_address}:{PROXY_PORT}"

    def environment(self) -> dict[str, str]:
        """What tells a task's programs to go through its proxy."""
        url = self.proxy_url
        names = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")
        return {**dict.fromkeys(names, url), "NO_PROXY": "", "no_proxy": ""}


class Egress:
    """The egress of one ``DockerExecutor``'s tasks: address slots and the nftables table.

    Args:
        subnet: where the tasks' /30 networks come from (never routed off the host).
        max_connections, max_bytes: each task's caps (see ``EgressProxy``).
    """

    def __init__(self, subnet: str, *, max_connections: int, max_bytes: int) -> None:
        problem = support_problem()
        if problem is not None:
            raise RuntimeUnavailable(problem)
        self._networks = ipaddress.IPv4Network(subnet).subnets(new_prefix=30)
        self._free: list[ipaddress.IPv4Network] = []
        self._lock = threading.Lock()
        self.max_connections = max_connections
        self.max_bytes = max_bytes
        self._ensure_table()

    @staticmethod
    def _ensure_table() -> None:
        """The table as this version writes it, replaced whole in one transaction (the same
        rules serve every task, so a replacement under running tasks changes nothing)."""
        _run(["nft", "-f", "-"], f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n{_RULES}")

    def allocate(self, run_id: str, allow: AllowList) -> Slot:
        """A /30 for a run's veth, and its slot (nothing made yet)."""
        with self._lock:
            found = self._free.pop() if self._free else next(self._networks, None)
        if found is None:
            raise RuntimeUnavailable("network egress: the subnet's addresses are all in use")
        return Slot(run_id, found, allow)

    def attach(self, slot: Slot, pid: int) -> None:
        """Give the container whose process is ``pid`` (its init, waiting for the task) the
        slot's veth, its rules and its proxy."""
        slot.attached = True
        host_end, task_end = slot.host_end, slot.task_end
        _run(
            ["ip", "-batch", "-"],
            f"link add {host_end} type veth peer name {task_end}\n"
            f"link set {task_end} netns {pid}\n"
            f"addr add {slot.host_address}/30 dev {host_end}\n"
            f"link set {host_end} up\n",
        )
        # In the task's namespace: no IPv6, then only the /30 (no default route).
        _run(
            [
                "nsenter",
                *("-t", str(pid), "-n", "--", "sh", "-c"),
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && exec ip -batch -",
            ],
            f"addr add {slot.task_address}/30 dev {task_end}\nlink set {task_end} up\n",
        )
        slot.proxy = EgressProxy(
            slot.allow, max_connections=self.max_connections, max_bytes=self.max_bytes
        )
        slot.proxy.start(str(slot.host_address), PROXY_PORT)

    def release(self, slot: Slot) -> list[dict[str, Any]]:
        """Undo ``attach`` (what of it was done); the proxy's connection log. The veth goes
        in the background (its /30 is free again after): the task has ended."""
        log: list[dict[str, Any]] = []
        if slot.proxy is not None:
            slot.proxy.close()
            log = [asdict(entry) for entry in slot.proxy.log]
        threading.Thread(
            target=self._remove_link, args=(slot,), name="parity-sandbox-egress", daemon=True
        ).start()
        return log

    def _remove_link(self, slot: Slot) -> None:
        if slot.attached:
            # It goes with the container's namespace too; whichever comes first.
            subprocess.run(["ip", "link", "del", slot.host_end], capture_output=True, check=False)
        with self._lock:
            self._free.append(slot.network)


def reap(live: Callable[[str], bool]) -> int:
    """Remove task veths whose run is over (``live(run_prefix)``: whether a run whose id
    starts so is still going); how many were removed."""
    if support_problem() is not None:
        return 0
    removed = 0
    listed = subprocess.run(
        ["ip", "-j", "link", "show", "type", "veth"], capture_output=True, text=True, check=False
    )
    links = json.loads(listed.stdout or "[]") if listed.returncode == 0 else []
    names = {str(link.get("ifname", "")) for link in links}
    for name in sorted(names):
        if name.startswith(PREFIX) and len(name) == len(PREFIX) + 9 and not live(name[3:11]):
            done = subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
            removed += done.returncode == 0
    return removed
