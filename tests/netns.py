"""Network namespaces joined by a bridge: on one machine, nodes with addresses of their own and
links that can be cut. Root only; everything made is removed on exit, whatever happened."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET = "10.231.{}.{}"
IFNAME = "eth0"  # each node's interface, the same name in every namespace (GLOO_SOCKET_IFNAME)


def require() -> None:
    """Fail, saying why, unless namespaces can be made here: the suite runs as root, as CI does,
    and a partition that is never tested is no guarantee."""
    assert os.geteuid() == 0, "network namespaces need root (the suite runs as root, as CI does)"
    probe = f"sftprobe{os.getpid() % 10000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    assert made.returncode == 0, f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Net:
    tag: str
    addrs: list[str]
    ifname: str = IFNAME

    def ns(self, n: int) -> str:
        return f"{self.tag}n{n}"

    def host_end(self, n: int) -> str:
        return f"{self.tag}h{n}"

    def wrap(self, n: int) -> list[str]:
        """The argv prefix that runs a command as node ``n``."""
        return ["ip", "netns", "exec", self.ns(n)]

    def link(self, n: int, up: bool) -> None:
        """Cut (or restore) node ``n``'s only link: its packets go nowhere, no connection is reset."""
        _ip("link", "set", self.host_end(n), "up" if up else "down")


@contextmanager
def bridged(nodes: int) -> Iterator[Net]:
    tag = f"sft{os.getpid() % 10000}"
    subnet = os.getpid() % 200 + 20
    net = Net(tag, [SUBNET.format(subnet, n + 1) for n in range(nodes)])
    bridge = f"{tag}br"
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        for n, addr in enumerate(net.addrs):
            ns, inside = net.ns(n), f"{tag}i{n}"
            _ip("netns", "add", ns)
            _ip("link", "add", net.host_end(n), "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", net.host_end(n), "master", bridge)
            _ip("link", "set", net.host_end(n), "up")
            _ip("-n", ns, "link", "set", inside, "name", IFNAME)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield net
    finally:
        for n in range(nodes):
            subprocess.run(["ip", "netns", "del", net.ns(n)], capture_output=True, timeout=10)
            subprocess.run(["ip", "link", "del", net.host_end(n)], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=10)
