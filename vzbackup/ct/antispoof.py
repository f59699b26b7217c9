"""A CT sends only from the addresses it owns, and answers ARP and Neighbour Discovery only
for them.

Routed mode: strict reverse-path filtering (``rp_filter=1``) on the CT's host veth, a sysctl
of our own interface only (the node's ``all``/``default`` values are never touched; the kernel
uses the stricter of ``all`` and the device's). A packet from the CT passes only if its source
is routed back through that same veth, which holds exactly the CT's /32 routes: another CT's
address or any other source is dropped before it is routed. Routed CTs have no IPv6 (routed
``IP_ADDRESS`` is IPv4 only), so the host veth gets ``disable_ipv6=1``: the node drops every
IPv6 packet the CT sends, whatever its source (rp_filter is IPv4 only). ARP doesn't leave the
veth in routed mode (the node answers ARP for CT addresses on the LAN, see NEIGHBOUR_DEVS).

Bridged mode, where the node controls the addresses (NETIF ``ip=`` keys): an nftables table of
the bridge family per CT, ``vzbackup_ct<CTID>``, drops ARP and IPv4/IPv6 frames entering the
bridge from the CT's host veth with a sender/source address the CT doesn't own (DHCP's
0.0.0.0, IPv6 link-local and the unspecified address stay allowed), Neighbour Advertisements
whose target is an address the CT doesn't own (the IPv6 ARP reply: sent from the CT's own
link-local address, it would claim another CT's address), and Router Advertisements and
Redirects (a CT is not the LAN's router). It is created at start and restore and deleted at
stop. Without ``ip=`` keys the CT configures its own addresses (DHCP, static inside) and
nothing is filtered, as with OpenVZ's veth.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence

from vzbackup.errors import DependencyError, RuntimeFailure

NFT_TABLE = "vzbackup_ct{ctid}"
_V6_ALWAYS = ("fe80::/10", "::")  # link-local and duplicate address detection
_V4_ALWAYS = ("0.0.0.0",)  # DHCP discover
_LINK_LOCAL = ipaddress.ip_network("fe80::/10")
# A routed CT's host veth: (sysctl, value, needed); IPv6 may be off on the node altogether.
ROUTED_SYSCTLS = (
    ("ipv4/conf/{dev}/rp_filter", "1", True),
    ("ipv6/conf/{dev}/disable_ipv6", "1", False),
)
# ICMPv6 a CT never sends onto the bridge when the node owns its addresses
_ROUTER_ONLY = "{ nd-router-advert, nd-redirect }"


def strict_source(host_veth: str) -> None:
    """Strict reverse-path filter and no IPv6 on the CT's routed host veth."""
    for key, value, needed in ROUTED_SYSCTLS:
        path = "/proc/sys/net/" + key.format(dev=host_veth)
        if not needed and not os.path.exists(path):
            continue
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            raise RuntimeFailure(f"cannot set {key.format(dev=host_veth)}: {e}") from e


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


def _nd_targets(addrs: Iterable[ipaddress.IPv6Address]) -> str:
    """The CT's IPv6 addresses and link-local as a set for a Neighbour Advertisement's target
    field (nft 1.0.6 has no ``icmpv6 taddr``: the 128 bits at offset 64 of the ICMPv6 header,
    as integers)."""
    owned = [f"{int(a):#034x}" for a in addrs]
    ll = f"{int(_LINK_LOCAL[0]):#034x}-{int(_LINK_LOCAL[-1]):#034x}"
    return _set([*owned, ll])


def _rules(host_veth: str, ips: Sequence[str]) -> list[str]:
    addrs = [ipaddress.ip_interface(ip).ip for ip in ips]
    v4 = [*(str(a) for a in addrs if a.version == 4), *_V4_ALWAYS]
    v6_addrs = [a for a in addrs if isinstance(a, ipaddress.IPv6Address)]
    v6 = [*(str(a) for a in v6_addrs), *_V6_ALWAYS]
    dev = f'iifname "{host_veth}"'
    return [
        f"{dev} arp saddr ip != {_set(v4)} drop",
        f"{dev} ip saddr != {_set(v4)} drop",
        f"{dev} ip6 saddr != {_set(v6)} drop",
        f"{dev} icmpv6 type nd-neighbor-advert @th,64,128 != {_nd_targets(v6_addrs)} drop",
        f"{dev} icmpv6 type {_ROUTER_ONLY} drop",
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
