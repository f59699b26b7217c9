"""The network part of a CT config: IP_ADDRESS and NETIF (OpenVZ's grammar plus ``ip``/``gw``).

Only what the text may say: ``vzbackup.ct.network`` wires what it describes. An address
must be usable by a container (not loopback, multicast, link-local, reserved, nor a
network's or broadcast address); NETIF entries are ``key=value,...`` separated by ``;``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from vzbackup.errors import ConfigError, UsageError

IFNAMSIZ = 15  # longest interface name the kernel takes

_NETIF_IGNORED = ("mac_filter",)  # OpenVZ keys we accept but do not model
_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")
_BAD_IFNAME = re.compile(r"[\s/:,;=@%]")


@dataclass(frozen=True)
class Netif:
    """One bridged veth interface (an OpenVZ NETIF entry plus ``ip``/``gw`` extensions)."""

    ifname: str
    bridge: str | None = None
    mac: str | None = None
    host_ifname: str | None = None
    host_mac: str | None = None
    ip: tuple[str, ...] = ()
    gw: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ip, tuple):
            object.__setattr__(self, "ip", tuple(self.ip))


# --------------------------------------------------------------------------- addresses


def validate_ip(s: str) -> str:
    """Normalise ``addr`` or ``addr/prefix`` (IPv4 or IPv6); raise UsageError for garbage."""
    if not isinstance(s, str):
        raise UsageError(f"invalid IP address {s!r}")
    text = s.strip()
    if not text or "%" in text:
        raise UsageError(f"invalid IP address {s!r}")
    try:
        if "/" in text:
            iface = ipaddress.ip_interface(text)
            addr, prefix = iface.ip, iface.network.prefixlen
        else:
            addr, prefix = ipaddress.ip_address(text), None
    except ValueError as e:
        raise UsageError(f"invalid IP address {s!r}: {e}") from None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr.is_link_local:
        raise UsageError(
            f"IP address {s!r} is not usable for a container",
            hint="unspecified, multicast, loopback and link-local addresses are reserved",
        )
    if addr.version == 4 and (addr.is_reserved or str(addr) == "255.255.255.255"):
        raise UsageError(f"IP address {s!r} is reserved")
    if prefix is None:
        return str(addr)
    if prefix == 0:
        raise UsageError(f"invalid prefix length in {s!r}")
    net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    if addr.version == 4 and prefix <= 30 and addr in (net.network_address, net.broadcast_address):
        raise UsageError(f"{s!r} is the network or broadcast address of {net}")
    return f"{addr}/{prefix}"


def ip_addr(ip: str) -> str:
    """The address of a normalised ``addr`` or ``addr/prefix`` (what makes two entries the
    same IP, whatever their prefixes)."""
    return ip.partition("/")[0]


def unique_ips(ips: Iterable[str]) -> list[str]:
    """*ips* normalised (validate_ip), each address once: a repeated one is dropped, one
    given with two prefixes is refused (which of them the CT should have is not clear)."""
    by_addr: dict[str, str] = {}
    for ip in map(validate_ip, ips):
        first = by_addr.setdefault(ip_addr(ip), ip)
        if first != ip:
            raise UsageError(f"IP addresses {first} and {ip} are the same address",
                             hint="give each address once")
    return list(by_addr.values())


def routed_addr(ip: str) -> str:
    """The bare IPv4 address of a routed-mode IP (any prefix is ignored; /32 is used)."""
    addr = ipaddress.ip_interface(validate_ip(ip)).ip
    if addr.version != 4:
        raise ConfigError(f"routed IP {ip!r}: IPv6 is not supported in routed mode")
    return str(addr)


def _check_ifname(name: str, what: str) -> str:
    if not name or len(name) > IFNAMSIZ or name in (".", "..") or _BAD_IFNAME.search(name):
        raise ConfigError(
            f"invalid {what} {name!r}",
            hint=f"1-{IFNAMSIZ} characters, no whitespace or any of / : , ; = @ %",
        )
    return name


def _check_mac(mac: str, what: str) -> str:
    if not _MAC.match(mac):
        raise ConfigError(f"invalid {what} {mac!r}", hint="use six hex octets: 00:18:51:AA:BB:CC")
    norm = mac.replace("-", ":").upper()
    if int(norm[:2], 16) & 1:
        raise ConfigError(f"invalid {what} {mac!r}: multicast MAC address")
    if norm == "00:00:00:00:00:00":
        raise ConfigError(f"invalid {what} {mac!r}: all-zero MAC address")
    return norm


# --------------------------------------------------------------------------- NETIF


def _netif_ip(text: str, key: str) -> str:
    try:
        return validate_ip(text)
    except UsageError as e:
        raise ConfigError(f"bad {key} {text!r}: {e}") from None


def _netif_gw(text: str, key: str) -> str:
    gw = _netif_ip(text, key)
    if "/" in gw:
        raise ConfigError(f"{key} {text!r} must be a plain address")
    return gw


# NETIF key -> check(value, key) returning the value to keep; "ip" may repeat
_NETIF_CHECKS: dict[str, Callable[[str, str], str]] = {
    "ifname": _check_ifname,
    "mac": _check_mac,
    "host_ifname": _check_ifname,
    "host_mac": _check_mac,
    "bridge": _check_ifname,
    "ip": _netif_ip,
    "gw": _netif_gw,
}
_NETIF_KEYS = tuple(_NETIF_CHECKS)


def parse_netif(value: str) -> list[Netif]:
    """Parse an OpenVZ NETIF value: ``key=val,...`` entries separated by ``;``.

    Keys: ifname (required), mac, host_ifname, host_mac, bridge, ip (repeatable), gw.
    """
    result: list[Netif] = []
    for n, raw in enumerate(value.split(";"), 1):
        entry = raw.strip()
        if not entry:
            continue
        try:
            nif = _netif(entry)
            if any(x.ifname == nif.ifname for x in result):
                raise ConfigError(f"ifname {nif.ifname!r} used twice")
            if nif.host_ifname and any(x.host_ifname == nif.host_ifname for x in result):
                raise ConfigError(f"host_ifname {nif.host_ifname!r} used twice")
        except ConfigError as e:
            raise ConfigError(f"NETIF entry {n} ({entry!r}): {e.args[0]}", hint=e.hint) from None
        result.append(nif)
    return result


def _netif(entry: str) -> Netif:
    fields: dict[str, str] = {}
    ips: list[str] = []
    for key, text in _netif_pairs(entry):
        value = _NETIF_CHECKS[key](text, key)
        if key == "ip":
            if value not in ips:
                ips.append(value)
        elif key in fields:
            raise ConfigError(f"duplicate key {key!r}")
        else:
            fields[key] = value
    if "ifname" not in fields:
        raise ConfigError("missing ifname=")
    return Netif(ip=tuple(ips), **fields)


def _netif_pairs(entry: str) -> Iterator[tuple[str, str]]:
    for part in filter(None, (p.strip() for p in entry.split(","))):
        key, sep, text = (x.strip() for x in part.partition("="))
        if not sep or not key:
            raise ConfigError(f"{part!r} is not key=value")
        if key in _NETIF_IGNORED:
            continue
        if key not in _NETIF_CHECKS:
            raise ConfigError(f"unknown key {key!r}", hint=f"known keys: {', '.join(_NETIF_KEYS)}")
        if not text:
            raise ConfigError(f"empty value for {key!r}")
        yield key, text


def format_netif(netifs: Iterable[Netif]) -> str:
    """Inverse of :func:`parse_netif`."""
    entries = []
    for nif in netifs:
        parts = [f"ifname={nif.ifname}"]
        for key in ("mac", "host_ifname", "host_mac", "bridge"):
            val = getattr(nif, key)
            if val is not None:
                parts.append(f"{key}={val}")
        parts.extend(f"ip={ip}" for ip in nif.ip)
        if nif.gw is not None:
            parts.append(f"gw={nif.gw}")
        entries.append(",".join(parts))
    return ";".join(entries)


def parse_ip_address(value: str) -> list[str]:
    """IP_ADDRESS: whitespace-separated addresses, each as :func:`validate_ip` accepts."""
    return [validate_ip(ip) for ip in value.split()]
