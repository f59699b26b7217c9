"""The CT's own network settings across a checkpoint: its firewall and its netns sysctls.

A restore builds the CT's network itself (CRIU's ``empty_ns``: an empty netns the
setup-namespaces step fills), so CRIU restores none of the netns's iptables/nftables rules
or sysctls, and the migration's dump leaves them out. Without this a tenant's firewall
silently vanished on every restore, live migration and restore --with-state, and settings
such as Debian's ``ping_group_range`` (ping as a user) or ``rp_filter`` went back to the
kernel's defaults.

dump: the ruleset of the CT's network namespace (``nft list ruleset``: nftables and
iptables-nft, Debian's iptables since 10) goes to RULESET_FILE in the images, the legacy
iptables tables (only when the CT loaded any) to LEGACY_FILES, and the NETNS_SYSCTLS to
SYSCTL_FILE.
restore: loaded into the new netns once the network is set up, before any task runs. A
ruleset that doesn't load fails the restore (a migrating CT keeps running at the source):
a CT never comes back without its firewall. Sysctls are written as the CT's root (inside
its user namespace, so nothing the CT couldn't set itself); one that won't take is logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from pathlib import Path

from vzbackup import syscalls as S
from vzbackup.errors import CheckpointError
from vzbackup.nsexec import run_in_ns

logger = logging.getLogger(__name__)

RULESET_FILE = "vzbackup-nftables.conf"
SYSCTL_FILE = "vzbackup-netns-sysctls.json"
# legacy (x_tables) table list in the netns -> the images file, save and restore tools
LEGACY_FILES = {
    "ip_tables_names": ("vzbackup-iptables-legacy", "iptables-legacy-save",
                        "iptables-legacy-restore"),
    "ip6_tables_names": ("vzbackup-ip6tables-legacy", "ip6tables-legacy-save",
                         "ip6tables-legacy-restore"),
}
# per-netns sysctls a CT's root may set (below /proc/sys); per-device ones are left out:
# the CT's devices are made anew by the restore
NETNS_SYSCTLS = (
    "net/ipv4/ip_forward", "net/ipv4/ping_group_range", "net/ipv4/ip_local_port_range",
    "net/ipv4/ip_unprivileged_port_start", "net/ipv4/tcp_syncookies",
    "net/ipv4/tcp_keepalive_time", "net/ipv4/tcp_keepalive_intvl",
    "net/ipv4/tcp_keepalive_probes", "net/ipv4/tcp_fin_timeout",
    "net/ipv4/conf/all/rp_filter", "net/ipv4/conf/default/rp_filter",
    "net/ipv4/conf/all/accept_source_route", "net/ipv4/conf/default/accept_source_route",
    "net/ipv4/conf/all/promote_secondaries", "net/ipv4/conf/default/promote_secondaries",
    "net/ipv6/conf/all/forwarding", "net/core/somaxconn", "net/unix/max_dgram_qlen",
)
_VALUE = re.compile(r"[0-9\t -]{1,64}")  # what these sysctls hold; anything else is refused
_WRITE = 'while IFS="=" read -r k v; do printf "%s" "$v" > "/proc/sys/$k" || echo "$k"; done'


def _in_netns(pid: int, argv: list[str], stdin: str | None = None, *, as_ct: bool = False,
              check: bool = True) -> str:
    """Run *argv* (a node tool) in the network namespace of host *pid*; *as_ct*: in its user
    namespace too, as its root. Returns the output."""
    res = run_in_ns(pid, ("net",), argv, stdin=stdin, as_ct=as_ct)
    if res.returncode and check:
        raise CheckpointError(f"{argv[0]} in the CT's network namespace failed: "
                              f"{res.stderr.strip() or res.returncode}")
    return res.stdout


def _legacy_tables(pid: int, names: str) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/net/{names}").read_text().strip())
    except OSError:  # the module isn't loaded: no legacy tables anywhere
        return False


def save(pid: int, images_dir: Path) -> None:
    """Write the firewall and sysctls of the CT whose init is host *pid* into *images_dir*."""
    (images_dir / RULESET_FILE).write_text(_in_netns(pid, ["nft", "list", "ruleset"]))
    for names, (file, save_tool, _) in LEGACY_FILES.items():
        if _legacy_tables(pid, names):
            (images_dir / file).write_text(_in_netns(pid, [save_tool]))
    # read in-process, as the restore reads them (one missing on this kernel is left out)
    values = _read_sysctls(pid, list(NETNS_SYSCTLS))
    (images_dir / SYSCTL_FILE).write_text(json.dumps(values))


def load(pid: int, images_dir: Path) -> None:
    """Load the saved firewall and sysctls into the (new) network namespace of host *pid*."""
    for file, _, restore_tool in LEGACY_FILES.values():
        path = images_dir / file
        if path.exists():
            _in_netns(pid, [restore_tool], path.read_text())
    path = images_dir / RULESET_FILE
    ruleset = path.read_text() if path.exists() else ""
    if ruleset.strip():
        _in_netns(pid, ["nft", "-f", "-"], ruleset)
    _load_sysctls(pid, images_dir / SYSCTL_FILE)


def _read_sysctls(pid: int, keys: list[str]) -> dict[str, str]:
    """The values of *keys* (below /proc/sys) in the network namespace of host *pid*, read by
    a thread that joins that netns (no process): /proc/sys/net shows the reading thread's
    namespace. Unreadable ones are left out."""
    values: dict[str, str] = {}

    def read() -> None:
        with contextlib.suppress(OSError):
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                S.setns(fd, S.CLONE_NEWNET)
            finally:
                os.close(fd)
            for key in keys:
                with contextlib.suppress(OSError):
                    values[key] = Path("/proc/sys", key).read_text().rstrip("\n")

    reader = threading.Thread(target=read, name="netns-sysctls")
    reader.start()
    reader.join()
    return values


def _load_sysctls(pid: int, path: Path) -> None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # images of an older vzbackup, or damaged: kernel defaults
        return
    wanted = {k: v for k, v in saved.items() if isinstance(v, str)
              and k in NETNS_SYSCTLS and _VALUE.fullmatch(v)}
    now = _read_sysctls(pid, list(wanted))
    lines = [f"{k}={v}" for k, v in wanted.items() if now.get(k) != v]
    if not lines:  # all as the new netns has them (a busybox CT's): no process in the freeze
        return
    failed = _in_netns(pid, ["sh", "-c", _WRITE], "\n".join(lines) + "\n", as_ct=True,
                       check=False).split()
    if failed:
        logger.warning("CT network sysctls not restored (kept the kernel's defaults): %s",
                       ", ".join(failed))
