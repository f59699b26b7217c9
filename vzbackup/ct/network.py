"""Container networking: routed (venet-like) and bridged (veth) modes, driven by ``ip``.

Every container has its own network namespace, addressed by the host PID of its init
(``/proc/PID/ns/net``); commands inside it run as ``nsenter --net=... ip ...``.

Routed mode: one veth pair per CT, CT end ``eth0`` holding every IP_ADDRESS as /32 with a
default route via 169.254.0.1. The host end carries 169.254.0.1/32 itself (the same address on
every routed host veth), so the CT reaches the host at that address, and has proxy_arp on plus
a ``IP/32 dev <veth> src 169.254.0.1`` route per CT address, so host-originated packets carry
a source the CT can answer through its default route. No forwarding is enabled here.

Bridged mode: OpenVZ NETIF entries; the host end is enslaved to an existing bridge and the CT
end gets the optional ``ip=``/``gw=`` extension keys configured inside.

The IP_ADDRESS and NETIF grammar (what a CT config may say) is ``vzbackup.config.net``;
this module wires what it describes.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shlex
import socket
import struct
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vzbackup.config.net import IFNAMSIZ, Netif, routed_addr
from vzbackup.constants import HOST_GATEWAY
from vzbackup.ct import antispoof
from vzbackup.errors import (
    ConfigError,
    DependencyError,
    ExistsError,
    RuntimeFailure,
    UsageError,
    VzError,
)
from vzbackup.nsexec import ns_argv

GATEWAY = HOST_GATEWAY
"""Address of the host as seen from every routed CT (on each routed host veth)."""
ROUTED_IFNAME = "eth0"
"""Name of the routed interface inside the CT."""
_CMD_TIMEOUT = 30


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class NetConfig:
    """Network configuration of one CT: routed IPs (IP_ADDRESS) and bridged NETIF entries."""

    ctid: int
    ips: tuple[str, ...] = ()
    netifs: tuple[Netif, ...] = field(default=())
    neighbour_devs: str = "detect"  # vz.conf NEIGHBOUR_DEVS: "detect", "none" or device names

    def __post_init__(self) -> None:
        if not isinstance(self.ips, tuple):
            object.__setattr__(self, "ips", tuple(self.ips))
        if not isinstance(self.netifs, tuple):
            object.__setattr__(self, "netifs", tuple(self.netifs))


# --------------------------------------------------------------------------- naming


def host_veth_name(ctid: int, index: int) -> str:
    """Host-side veth name, OpenVZ style ``veth{ctid}.{index}``, or ``vz<hash>`` if too long."""
    if ctid < 0 or index < 0:
        raise UsageError(f"invalid CTID/index {ctid}/{index} for a veth name")
    name = f"veth{ctid}.{index}"
    if len(name) <= IFNAMSIZ:
        return name
    return "vz" + hashlib.sha1(f"{ctid}.{index}".encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Plan:
    routed_host: str | None
    routed_ips: tuple[str, ...]
    bridged: tuple[tuple[Netif, str], ...]  # (netif, resolved host name)


def _plan(cfg: NetConfig) -> _Plan:
    """Resolve names deterministically from the config alone (teardown relies on this)."""
    ips: list[str] = []
    for ip in cfg.ips:
        try:
            addr = routed_addr(ip)
        except UsageError as e:
            raise ConfigError(f"CT {cfg.ctid}: bad IP_ADDRESS entry {ip!r}: {e}") from None
        if addr not in ips:
            ips.append(addr)
    routed_host = host_veth_name(cfg.ctid, 0) if ips else None
    used = {routed_host} if routed_host else set()
    used |= {n.host_ifname for n in cfg.netifs if n.host_ifname}
    ct_names: set[str] = {ROUTED_IFNAME} if ips else set()
    bridged: list[tuple[Netif, str]] = []
    for nif in cfg.netifs:
        if nif.ifname in ct_names:
            raise ConfigError(
                f"CT {cfg.ctid}: NETIF ifname {nif.ifname!r} clashes with another interface",
                hint=f"routed mode (IP_ADDRESS) uses {ROUTED_IFNAME!r} inside the CT",
            )
        ct_names.add(nif.ifname)
        name = nif.host_ifname
        if name is None:
            m = re.search(r"(\d+)$", nif.ifname)
            if m and host_veth_name(cfg.ctid, int(m.group(1))) not in used:
                name = host_veth_name(cfg.ctid, int(m.group(1)))
            else:
                idx = 0
                while host_veth_name(cfg.ctid, idx) in used:
                    idx += 1
                name = host_veth_name(cfg.ctid, idx)
            used.add(name)
        bridged.append((nif, name))
    return _Plan(routed_host, tuple(ips), tuple(bridged))


# --------------------------------------------------------------------------- ip helpers


def _ip(
    args: list[str], *, pid: int | None = None, ok: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (inside the netns of *pid* if given); RuntimeFailure on error.

    An error whose stderr contains one of *ok* is tolerated (returned, not raised).
    """
    cmd = ["ip", *args]
    if pid is not None:
        cmd = [*ns_argv(pid, "net"), *cmd]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=_CMD_TIMEOUT)
    except FileNotFoundError as e:
        raise DependencyError(f"{cmd[0]} not found", hint="install iproute2 and util-linux") from e
    except subprocess.TimeoutExpired as e:
        raise RuntimeFailure(f"{' '.join(cmd)} timed out") from e
    if res.returncode != 0 and not any(s in res.stderr for s in ok):
        where = f" (in the netns of pid {pid})" if pid is not None else ""
        raise RuntimeFailure(
            f"ip {' '.join(args)} failed{where}: {res.stderr.strip() or f'exit {res.returncode}'}"
        )
    return res


def _ip_batch(cmds: list[list[str]], *, pid: int | None = None) -> None:
    """Run several ``ip`` commands in one ``ip -batch`` process (one process spawn, not one
    per command: a restore runs this inside a migration's freeze); stops at the first error.
    """
    if not cmds:
        return
    cmd = ["ip", "-batch", "-"]
    if pid is not None:
        cmd = [*ns_argv(pid, "net"), *cmd]
    script = "".join(shlex.join(c) + "\n" for c in cmds)
    try:
        res = subprocess.run(cmd, input=script, capture_output=True, text=True,
                             timeout=_CMD_TIMEOUT)
    except FileNotFoundError as e:
        raise DependencyError(f"{cmd[0]} not found", hint="install iproute2 and util-linux") from e
    except subprocess.TimeoutExpired as e:
        raise RuntimeFailure(f"{' '.join(cmd)} timed out") from e
    if res.returncode != 0:
        where = f" (in the netns of pid {pid})" if pid is not None else ""
        raise RuntimeFailure(f"ip -batch{where}: {res.stderr.strip() or f'exit {res.returncode}'}"
                             f" in:\n{script}")


_GONE = ("Cannot find device", "does not exist", "No such device")
_ADDR_EXISTS = ("Address already assigned", "File exists")


def _link(name: str) -> dict | None:
    """``ip -d link show`` of a host interface as a dict, or None if it does not exist."""
    res = _ip(["-j", "-d", "link", "show", "dev", name], ok=_GONE)
    if res.returncode != 0:
        return None
    data = json.loads(res.stdout or "[]")
    return data[0] if data else None


def _kind(info: dict) -> str | None:
    return (info.get("linkinfo") or {}).get("info_kind")


def _require_bridge(bridge: str) -> None:
    info = _link(bridge)
    if info is None:
        raise RuntimeFailure(
            f"bridge {bridge!r} does not exist", hint=f"create it: ip link add {bridge} type bridge"
        )
    if _kind(info) != "bridge":
        raise RuntimeFailure(f"{bridge!r} is not a bridge (kind {_kind(info)!r})")


def _ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _check_netns(pid: int) -> bool:
    """Ensure /proc/PID/ns/net is a netns other than ours; False if the process is gone."""
    try:
        theirs = _ns_id(f"/proc/{pid}/ns/net")
    except FileNotFoundError:
        return False
    if theirs == _ns_id("/proc/self/ns/net"):
        raise RuntimeFailure(f"pid {pid} shares the host network namespace; refusing to touch it")
    return True


def _require_netns(pid: int) -> None:
    if not _check_netns(pid):
        raise RuntimeFailure(f"process {pid} does not exist (container not running?)")


def _set_proxy_arp(dev: str) -> None:
    path = f"/proc/sys/net/ipv4/conf/{dev}/proxy_arp"
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as e:
        raise RuntimeFailure(f"cannot enable proxy_arp on {dev}: {e}") from e


def _host_addresses() -> set[str]:
    res = _ip(["-j", "addr", "show"])
    return {
        a["local"]
        for link in json.loads(res.stdout or "[]")
        for a in link.get("addr_info", [])
        if "local" in a
    }


def _host_routes(family: str) -> list[dict]:
    res = _ip(["-j", family, "route", "show", "table", "all"])
    return json.loads(res.stdout or "[]")


def _host_route_devs(addr: str) -> list[str]:
    """Devices that carry a host (/32 or /128) unicast or local route to *addr*."""
    ver = ipaddress.ip_address(addr).version
    full = 32 if ver == 4 else 128
    devs = []
    for r in _host_routes("-4" if ver == 4 else "-6"):
        if r.get("type", "unicast") not in ("unicast", "local"):
            continue
        if r.get("dst") in (addr, f"{addr}/{full}"):
            devs.append(r.get("dev", ""))
    return devs


def ips_in_use_on_host(ips: Iterable[str]) -> list[str]:
    """The entries of *ips* already assigned to a host interface or having a host route."""
    ips = list(ips)
    if not ips:
        return []
    addrs = _host_addresses()
    routes: dict[int, list[dict]] = {}
    used = []
    for ip in ips:
        try:
            addr = ipaddress.ip_interface(ip.strip()).ip
        except (ValueError, AttributeError):
            raise UsageError(f"invalid IP address {ip!r}") from None
        if str(addr) in addrs:
            used.append(ip)
            continue
        full = addr.max_prefixlen
        if addr.version not in routes:
            routes[addr.version] = _host_routes(f"-{addr.version}")
        if any(
            r.get("type", "unicast") in ("unicast", "local")
            and r.get("dst") in (str(addr), f"{addr}/{full}")
            for r in routes[addr.version]
        ):
            used.append(ip)
    return used


# --------------------------------------------------------------------------- undo


class _Undo:
    """Reverse-order cleanup actions for a partially applied configuration."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], object]] = []

    def push(self, action: Callable[[], object]) -> None:
        self._actions.append(action)

    def run(self) -> None:
        for action in reversed(self._actions):
            with contextlib.suppress(VzError):
                action()
        self._actions.clear()


def _del_link(name: str) -> None:
    _ip(["link", "del", "dev", name], ok=_GONE)


# --------------------------------------------------------------------------- routed mode


def _routed_host_side(host: str, ips: Iterable[str], *, first: list[list[str]]) -> None:
    """The host veth's gateway address and the CT's /32 routes, after the *first* commands,
    in one batch; then proxy ARP and the strict reverse-path filter (the CT's init does not
    run yet)."""
    _ip_batch([*first, ["addr", "replace", f"{GATEWAY}/32", "dev", host],
               ["link", "set", "dev", host, "up"],
               *(["route", "add", f"{addr}/32", "dev", host, "src", GATEWAY] for addr in ips)])
    _set_proxy_arp(host)
    antispoof.strict_source(host)


def _routed_ct_side(pid: int, ips: Iterable[str]) -> None:
    _ip_batch([["link", "set", "dev", "lo", "up"],
               *(["addr", "replace", f"{addr}/32", "dev", ROUTED_IFNAME] for addr in ips),
               ["link", "set", "dev", ROUTED_IFNAME, "up"],
               ["route", "replace", GATEWAY, "dev", ROUTED_IFNAME, "scope", "link"],
               ["route", "replace", "default", "via", GATEWAY, "dev", ROUTED_IFNAME]], pid=pid)


def _refuse_used(ips: Iterable[str], ctid: int) -> None:
    used = ips_in_use_on_host(ips)
    if used:
        raise ExistsError(
            f"CT {ctid}: IP address(es) {', '.join(used)} already in use on this host",
            hint="another CT or a host interface has them; pick different addresses",
        )


def _setup_routed(host: str, ips: tuple[str, ...], pid: int, undo: _Undo) -> None:
    peer = ["peer", "name", ROUTED_IFNAME, "netns", str(pid)]
    undo.push(lambda: _del_link(host))  # also removes its addresses and routes
    _routed_host_side(host, ips, first=[["link", "add", "name", host, "type", "veth", *peer]])
    _routed_ct_side(pid, ips)


# --------------------------------------------------------------------------- bridged mode


def _setup_bridged(nif: Netif, host: str, pid: int, undo: _Undo) -> None:
    cmd = ["link", "add", "name", host]
    if nif.host_mac:
        cmd += ["address", nif.host_mac]
    cmd += ["type", "veth", "peer", "name", nif.ifname]
    if nif.mac:
        cmd += ["address", nif.mac]
    _ip([*cmd, "netns", str(pid)])
    undo.push(lambda: _del_link(host))
    _bridged_host_side(nif, host)
    dev = nif.ifname
    for ip in nif.ip:
        _ip(["addr", "replace", ip, "dev", dev], pid=pid)
    _ip(["link", "set", "dev", dev, "up"], pid=pid)
    if nif.gw:
        gw = ipaddress.ip_address(nif.gw)
        nets = [ipaddress.ip_interface(ip).network for ip in nif.ip]
        if not any(gw in net for net in nets if net.version == gw.version):
            _ip(["route", "replace", nif.gw, "dev", dev, "scope", "link"], pid=pid)
        fam = "-4" if gw.version == 4 else "-6"
        _ip([fam, "route", "replace", "default", "via", nif.gw, "dev", dev], pid=pid)


def _bridged_host_side(nif: Netif, host: str) -> None:
    if nif.bridge:
        _ip(["link", "set", "dev", host, "master", nif.bridge])
    _ip(["link", "set", "dev", host, "up"])


# --------------------------------------------------------------------------- neighbours

_ETH_P_ARP = 0x0806


def _neighbour_devs(cfg: NetConfig, addr: str) -> list[str]:
    """Host devices on which this node answers ARP for the routed *addr* (vzctl's
    NEIGHBOUR_DEVS): "detect" picks every device with a connected subnet route to it (the
    CTs' own veths only carry /32 routes)."""
    setting = cfg.neighbour_devs.strip()
    if setting == "none" or ipaddress.ip_address(addr).version != 4:
        return []
    if setting != "detect":
        return setting.split()
    ip = ipaddress.ip_address(addr)
    devs: list[str] = []
    for r in _host_routes("-4"):
        dst, dev = r.get("dst", ""), r.get("dev", "")
        if r.get("scope") != "link" or not dev or "/" not in dst or dev in devs:
            continue
        if dev != "lo" and ip in ipaddress.ip_network(dst, strict=False):
            devs.append(dev)
    return devs


def _gratuitous_arp(dev: str, addr: str) -> None:
    """Broadcast an unsolicited ARP reply for *addr* from *dev*'s MAC so neighbours (and
    switches) move the address to this node at once, as vzctl's ``arpsend -U`` does."""
    info = _link(dev)
    if not info or not info.get("address"):
        return
    mac = bytes.fromhex(info["address"].replace(":", ""))
    ip = ipaddress.ip_address(addr).packed
    bcast = b"\xff" * 6
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mac, ip, bcast, ip)
    frame = bcast + mac + struct.pack("!H", _ETH_P_ARP) + arp
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sk:
        sk.bind((dev, _ETH_P_ARP))
        sk.send(frame)


def announce(cfg: NetConfig) -> list[str]:
    """Answer ARP for the CT's routed IPv4 addresses on the node's neighbour devices and
    announce them there (after start, restore or migration); returns ``IP@dev`` entries."""
    done: list[str] = []
    for addr in _plan(cfg).routed_ips:
        for dev in _neighbour_devs(cfg, addr):
            _ip(["neigh", "replace", "proxy", addr, "dev", dev])
            with contextlib.suppress(OSError):
                _gratuitous_arp(dev, addr)
            done.append(f"{addr}@{dev}")
    return done


def withdraw(cfg: NetConfig) -> None:
    """Stop answering ARP for the CT's routed addresses (idempotent)."""
    addrs = set(_plan(cfg).routed_ips)
    if not addrs:
        return
    res = _ip(["-j", "-4", "neigh", "show", "proxy"])
    for entry in json.loads(res.stdout or "[]"):
        if entry.get("dst") in addrs and entry.get("dev"):
            _ip(["neigh", "del", "proxy", entry["dst"], "dev", entry["dev"]], ok=_GONE)


# --------------------------------------------------------------------------- public API


def check(cfg: NetConfig) -> None:
    """What :func:`setup` refuses before touching anything: a missing bridge, a host
    interface of the CT's that exists already, a routed IP in use on the host (ExistsError).
    A restore checks ahead, outside a migration's freeze (three ``ip`` processes)."""
    plan = _plan(cfg)
    hosts = [host for _nif, host in plan.bridged]
    hosts += [plan.routed_host] if plan.routed_host else []
    for nif, _host in plan.bridged:
        if nif.bridge:
            _require_bridge(nif.bridge)
    for host in hosts:
        if _link(host) is not None:
            raise RuntimeFailure(f"CT {cfg.ctid}: host interface {host!r} already exists")
    if plan.routed_ips:
        _refuse_used(plan.routed_ips, cfg.ctid)


def setup(cfg: NetConfig, pid: int, *, announce_now: bool = True, checked: bool = False
          ) -> None:
    """Create and configure all interfaces of *cfg* for the CT whose init is *pid*
    (*checked*: :func:`check` passed already).

    Without *announce_now* the caller announces the addresses later (:func:`announce`): a
    restore does once CRIU has locked the CT's network, so that no packet reaches the CT
    before its sockets are back (the kernel would reset those connections).

    On failure everything created so far is removed and RuntimeFailure is raised (ExistsError
    if a routed IP is already in use on the host, before anything is touched).
    """
    plan = _plan(cfg)
    _require_netns(pid)
    if not checked:
        check(cfg)
    undo = _Undo()
    try:
        if not plan.routed_host:  # else in the routed CT side's batch: one process less
            _ip(["link", "set", "dev", "lo", "up"], pid=pid)
        if plan.routed_host:
            _setup_routed(plan.routed_host, plan.routed_ips, pid, undo)
        for nif, host in plan.bridged:
            _setup_bridged(nif, host, pid, undo)
        _fence_bridged(cfg.ctid, plan)
        undo.push(lambda: antispoof.unfence_bridged(cfg.ctid))
        undo.push(lambda: withdraw(cfg))
        if announce_now:
            announce(cfg)
    except BaseException:
        undo.run()
        raise


def teardown(cfg: NetConfig) -> None:
    """Remove the CT's host routes and host veths that still exist (idempotent).

    Only veth devices are deleted, so a misconfigured host_ifname never removes a host NIC.
    """
    plan = _plan(cfg)
    errors: list[str] = []
    try:
        withdraw(cfg)
    except VzError as e:
        errors.append(str(e))
    if plan.bridged:
        try:
            antispoof.unfence_bridged(cfg.ctid)
        except VzError as e:
            errors.append(str(e))
    hosts = [plan.routed_host] if plan.routed_host else []
    hosts += [host for _, host in plan.bridged]
    for host in hosts:
        try:
            info = _link(host)
            if info is None or _kind(info) != "veth":
                continue
            if host == plan.routed_host:
                for addr in plan.routed_ips:
                    _ip(["route", "del", f"{addr}/32", "dev", host], ok=(*_GONE, "No such process"))
            _del_link(host)
        except VzError as e:
            errors.append(str(e))
    if errors:
        raise RuntimeFailure(f"CT {cfg.ctid}: network teardown incomplete: " + "; ".join(errors))


def _fence_bridged(ctid: int, plan: _Plan) -> None:
    if plan.bridged:
        antispoof.fence_bridged(ctid, [(host, nif.ip) for nif, host in plan.bridged])


def add_ips(cfg: NetConfig, pid: int, ips: list[str]) -> None:
    """Add routed IPs to a running CT: addresses inside plus host routes.

    Creates the routed veth pair first if the CT had no routed IPs yet.
    """
    addrs: list[str] = []
    for ip in ips:
        addr = routed_addr(ip)
        if addr not in addrs:
            addrs.append(addr)
    if not addrs:
        return
    _require_netns(pid)
    host = host_veth_name(cfg.ctid, 0)
    undo = _Undo()
    if _link(host) is None:
        _plan(NetConfig(cfg.ctid, tuple(addrs), cfg.netifs))  # name clashes with NETIF
        _refuse_used(addrs, cfg.ctid)
        try:
            _setup_routed(host, tuple(addrs), pid, undo)
            announce(_subset(cfg, addrs))
        except BaseException:
            undo.run()
            raise
        return
    new = [a for a in addrs if host not in _host_route_devs(a)]
    _refuse_used(new, cfg.ctid)
    try:
        for addr in new:
            _ip(["route", "add", f"{addr}/32", "dev", host, "src", GATEWAY])
            undo.push(lambda a=addr: _ip(["route", "del", f"{a}/32", "dev", host]))
        for addr in addrs:
            res = _ip(["addr", "add", f"{addr}/32", "dev", ROUTED_IFNAME], pid=pid, ok=_ADDR_EXISTS)
            if res.returncode == 0:
                undo.push(
                    lambda a=addr: _ip(["addr", "del", f"{a}/32", "dev", ROUTED_IFNAME], pid=pid)
                )
        announce(_subset(cfg, addrs))
    except BaseException:
        undo.run()
        raise


def _subset(cfg: NetConfig, addrs: list[str]) -> NetConfig:
    return NetConfig(cfg.ctid, tuple(addrs), neighbour_devs=cfg.neighbour_devs)


def del_ips(cfg: NetConfig, pid: int, ips: list[str]) -> None:
    """Remove routed IPs from a running CT (missing addresses/routes are ignored)."""
    addrs = list(dict.fromkeys(routed_addr(ip) for ip in ips))
    host = host_veth_name(cfg.ctid, 0)
    inside = _check_netns(pid)
    withdraw(_subset(cfg, addrs))
    for addr in addrs:
        if inside:
            _ip(
                ["addr", "del", f"{addr}/32", "dev", ROUTED_IFNAME],
                pid=pid,
                ok=("Cannot assign requested address", "Address not found", *_GONE),
            )
        _ip(["route", "del", f"{addr}/32", "dev", host], ok=("No such process", *_GONE))
