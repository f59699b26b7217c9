"""A CT sends only from the addresses it owns, and answers ARP only for them.

Routed mode: strict reverse-path filtering (``rp_filter=1``) on the CT's host veth, a sysctl
of our own interface only (the node's ``all``/``default`` values are never touched; the kernel
uses the stricter of ``all`` and the device's). A packet from the CT passes only if its source
is routed back through that same veth, which holds exactly the CT's /32 routes: another CT's
address or any other source is dropped before it is routed. ARP doesn't leave the veth in
routed mode (the node answers ARP for CT addresses on the LAN, see NEIGHBOUR_DEVS).

Bridged mode, where the node controls the addresses (NETIF ``ip=`` keys): an nftables table of
the bridge family per CT, ``vzbackup_ct<CTID>``, drops ARP and IPv4/IPv6 frames entering the
bridge from the CT's host veth with a sender/source address the CT doesn't own (DHCP's
0.0.0.0, IPv6 link-local and the unspecified address stay allowed). It is created at start
and restore and deleted at stop. Without ``ip=`` keys the CT configures its own addresses
(DHCP, static inside) and nothing is filtered, as with OpenVZ's veth.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterable, Sequence

from vzbackup.errors import DependencyError, RuntimeFailure

NFT_TABLE = "vzbackup_ct{ctid}"
_V6_ALWAYS = ("fe80::/10", "::")  # link-local and duplicate address detection
_V4_ALWAYS = ("0.0.0.0",)  # DHCP discover


def strict_source(host_veth: str) -> None:
    """Strict reverse-path filter on the CT's routed host veth."""
    path = f"/proc/sys/net/ipv4/conf/{host_veth}/rp_filter"
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as e:
        raise RuntimeFailure(f"cannot enable rp_filter on {host_veth}: {e}") from e


def _nft(script: str, *, ok_missing: bool = False) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise DependencyError(
            "nft (nftables) is needed to fence bridged CT addresses",
            hint="apt-get install nftables (scripts/setup.sh does)",
        )
    res = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True)
    if res.returncode and not (ok_missing and "No such file or directory" in res.stderr):
        raise RuntimeFailure(f"nft failed: {res.stderr.strip()}")


def _set(addrs: Iterable[str]) -> str:
    return "{ " + ", ".join(addrs) + " }"


def _rules(host_veth: str, ips: Sequence[str]) -> list[str]:
    addrs = [ipaddress.ip_interface(ip).ip for ip in ips]
    v4 = [*(str(a) for a in addrs if a.version == 4), *_V4_ALWAYS]
    v6 = [*(str(a) for a in addrs if a.version == 6), *_V6_ALWAYS]
    dev = f'iifname "{host_veth}"'
    return [
        f"{dev} arp saddr ip != {_set(v4)} drop",
        f"{dev} ip saddr != {_set(v4)} drop",
        f"{dev} ip6 saddr != {_set(v6)} drop",
    ]


def fence_bridged(ctid: int, netifs: Sequence[tuple[str, Sequence[str]]]) -> None:
    """(Re)create the CT's bridge table for ``(host veth, ips)`` pairs that have ips."""
    rules = [r for host, ips in netifs if ips for r in _rules(host, ips)]
    unfence_bridged(ctid)
    if not rules:
        return
    table = NFT_TABLE.format(ctid=ctid)
    body = "\n".join(f"    {r}" for r in rules)
    _nft(
        f"table bridge {table} {{\n"
        f"  chain from_ct {{\n    type filter hook prerouting priority -200; policy accept;\n"
        f"{body}\n  }}\n}}\n"
    )


def unfence_bridged(ctid: int) -> None:
    """Delete the CT's bridge table (idempotent; nothing to do without nft)."""
    if shutil.which("nft") is None:
        return
    _nft(f"delete table bridge {NFT_TABLE.format(ctid=ctid)}\n", ok_missing=True)
