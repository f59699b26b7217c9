"""Container configuration (OpenVZ CTID.conf): typed access over a lossless VzFile."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from vzbackup.config.vzfile import VzFile
from vzbackup.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from vzbackup.config.net import Netif
    from vzbackup.ct.idmap import IdMap

PAGE = 4096
_SIZE = re.compile(r"^(\d+)([KMGTP]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_size(text: str, *, default_unit: str = "") -> int:
    """Parse 256M, 1G or 100P (pages, as vzctl) to bytes; bare numbers use *default_unit*."""
    m = _SIZE.match(text.strip())
    if not m:
        raise UsageError(f"invalid size {text!r}", hint="use a number with K, M, G, T or P (pages)")
    num, unit = int(m.group(1)), (m.group(2) or default_unit).upper()
    return num * PAGE if unit == "P" else num * _UNITS[unit]


def _barrier_limit(value: str) -> tuple[int, int]:
    parts = value.split(":")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() or p == "unlimited" for p in parts):
        raise ValueError(value)
    vals = [0 if p == "unlimited" else int(p) for p in parts]
    return vals[0], vals[1]


def _bindmounts(v: str) -> None:
    parse_bindmounts(v)


def _int_range(lo: int, hi: int) -> Callable[[str], None]:
    def check(v: str) -> None:
        if not v.isdigit() or not lo <= int(v) <= hi:
            raise ValueError(f"expected an integer {lo}..{hi}")

    return check


def _yes_no(v: str) -> None:
    if v not in ("yes", "no"):
        raise ValueError("expected yes or no")


def _stop_mode(v: str) -> None:
    if v not in ("stop", "suspend"):
        raise ValueError("expected stop or suspend")


def _pages(v: str) -> None:
    _barrier_limit(v)


def _ip_address(v: str) -> None:
    from vzbackup.config import net  # only a CT with addresses needs the network rules

    net.parse_ip_address(v)


def _netif(v: str) -> None:
    from vzbackup.config import net

    net.parse_netif(v)


def _pair(value: str, parse: Callable[[str], int]) -> tuple[int, int]:
    """soft[:hard] (one value: both), each parsed by *parse* or "unlimited" (0)."""
    parts = value.split(":")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError("expected soft[:hard]")
    soft, hard = (0 if p == "unlimited" else parse(p) for p in parts)
    if soft and hard and soft > hard:
        raise ValueError("the soft limit (barrier) is above the hard one (limit)")
    return soft, hard


def _count(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a number")
    return int(text)


def diskspace_kib(value: str) -> tuple[int, int]:
    """DISKSPACE soft[:hard] in KiB (bare numbers are KiB, as vzctl; K/M/G/T suffixes)."""
    return _pair(value, lambda p: parse_size(p, default_unit="K") // 1024)


def diskinodes(value: str) -> tuple[int, int]:
    """DISKINODES soft[:hard], inode counts."""
    return _pair(value, _count)


# Known keys and their validators; unknown keys are kept untouched.
VALIDATORS: dict[str, Callable[[str], object]] = {
    "ONBOOT": _yes_no,
    "BOOTORDER": _int_range(0, 2**31 - 1),
    "VE_STOP_MODE": _stop_mode,
    "CPUUNITS": _int_range(8, 500000),
    "CPULIMIT": _int_range(0, 100 * 4096),
    "CPUS": _int_range(0, 4096),
    "PHYSPAGES": _pages,
    "SWAPPAGES": _pages,
    "NUMPROC": _pages,
    "DISKSPACE": diskspace_kib,
    "DISKINODES": diskinodes,
    "DISK_QUOTA": _yes_no,
    "BINDMOUNT": _bindmounts,
    "UNPRIVILEGED": _yes_no,
    "IDMAP_BASE": _int_range(0, (1 << 32) - 2),
    "IDMAP_SIZE": _int_range(1, (1 << 32) - 1),
    "IP_ADDRESS": _ip_address,
    "NETIF": _netif,
}


@dataclass
class CTConfig:
    """A container's CTID.conf."""

    ctid: int
    file: VzFile

    @classmethod
    def load(cls, ctid: int, path: Path) -> CTConfig:
        conf = cls(ctid, VzFile.load(path))
        conf.validate()
        return conf

    def validate(self) -> None:
        for key, value in self.file.items():
            check = VALIDATORS.get(key)
            if check is None:
                continue
            try:
                check(value)
            except (ValueError, UsageError, ConfigError) as e:
                raise ConfigError(f"{self.file.path}: {key}={value!r} is invalid: {e}") from None

    def get(self, key: str, default: str = "") -> str:
        v = self.file.get(key)
        return default if v is None else v

    def set(self, key: str, value: str) -> None:
        check = VALIDATORS.get(key)
        if check is not None:
            try:
                check(value)
            except (ValueError, UsageError, ConfigError) as e:
                raise UsageError(f"{key}={value!r} is invalid: {e}") from None
        self.file.set(key, value)

    def save(self) -> None:
        self.file.save()

    # Typed views of the keys the runtime uses.
    @property
    def name(self) -> str:
        return self.get("NAME")

    @property
    def hostname(self) -> str:
        return self.get("HOSTNAME")

    @property
    def ostemplate(self) -> str:
        return self.get("OSTEMPLATE")

    @property
    def ips(self) -> list[str]:
        return self.get("IP_ADDRESS").split()

    @property
    def netifs(self) -> list[Netif]:
        from vzbackup.config.net import parse_netif

        return parse_netif(self.get("NETIF"))

    @property
    def nameservers(self) -> list[str]:
        return self.get("NAMESERVER").split()

    @property
    def searchdomains(self) -> list[str]:
        return self.get("SEARCHDOMAIN").split()

    @property
    def onboot(self) -> bool:
        return self.get("ONBOOT") == "yes"

    def _int(self, key: str) -> int | None:
        v = self.get(key)
        return int(v) if v.isdigit() else None

    @property
    def cpus(self) -> int | None:
        return self._int("CPUS")

    @property
    def cpulimit(self) -> int | None:
        return self._int("CPULIMIT")

    @property
    def cpuunits(self) -> int | None:
        return self._int("CPUUNITS")

    def _limit_bytes(self, key: str) -> int | None:
        v = self.get(key)
        return _barrier_limit(v)[1] * PAGE if v else None

    @property
    def memory_bytes(self) -> int | None:
        """Memory limit from PHYSPAGES (limit part, pages); 0 = unlimited."""
        return self._limit_bytes("PHYSPAGES")

    @property
    def swap_bytes(self) -> int | None:
        return self._limit_bytes("SWAPPAGES")

    @property
    def bindmounts(self) -> list[BindMount]:
        return parse_bindmounts(self.get("BINDMOUNT"))

    @property
    def idmap(self) -> IdMap:
        """The CT's user-namespace id map; a CT without UNPRIVILEGED (made before user
        namespaces) is privileged, so its files keep their ownership."""
        from vzbackup.ct import idmap  # (with the tree shifting) not needed to back a CT up

        return idmap.from_values(
            self.get(idmap.KEY_UNPRIVILEGED, "no"),
            self.get(idmap.KEY_BASE),
            self.get(idmap.KEY_SIZE),
        )

    def set_idmap(self, m: IdMap) -> None:
        """Record the mode and map (they travel with the config: backups, migration)."""
        from vzbackup.ct import idmap

        self.set(idmap.KEY_UNPRIVILEGED, "yes" if m.unprivileged else "no")
        for key, value in ((idmap.KEY_BASE, m.base), (idmap.KEY_SIZE, m.size)):
            if m.unprivileged:
                self.set(key, str(value))
            else:
                self.file.delete(key)

    @property
    def diskspace(self) -> tuple[int, int]:
        """DISKSPACE (soft, hard) in KiB; 0 = none."""
        v = self.get("DISKSPACE")
        return diskspace_kib(v) if v else (0, 0)

    @property
    def diskinodes(self) -> tuple[int, int]:
        """DISKINODES (soft, hard); 0 = none."""
        v = self.get("DISKINODES")
        return diskinodes(v) if v else (0, 0)

    @property
    def numproc(self) -> int | None:
        v = self.get("NUMPROC")
        return _barrier_limit(v)[1] if v else None


class BindMount(NamedTuple):
    """A host directory bound into the CT (BINDMOUNT="host:ct[:ro] ...")."""

    host: str
    ct: str
    readonly: bool = False

    @property
    def key(self) -> str:
        """CRIU's external-mount key for this bind mount."""
        return "bm" + self.ct.strip("/").replace("/", "_")


def parse_bindmounts(value: str) -> list[BindMount]:
    out = []
    for item in value.split():
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ValueError(f"bad bind mount {item!r} (want /host/dir:/ct/dir[:ro])")
        host, ct = parts[0], parts[1]
        if not host.startswith("/") or not ct.startswith("/") or ".." in ct.split("/"):
            raise ValueError(f"bad bind mount {item!r}: paths must be absolute, no '..'")
        out.append(BindMount(host, ct, len(parts) == 3 and parts[2] == "ro"))
    return out


def validate_name(name: str) -> str:
    if not _NAME.match(name) or name.isdigit():
        raise UsageError(
            f"invalid CT name {name!r}",
            hint="letters, digits, '.', '_' and '-', not all digits, at most 64 characters",
        )
    return name
