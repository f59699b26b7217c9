"""The CT's own firewall across a checkpoint.

A restore builds the CT's network itself (CRIU's ``empty_ns``: an empty netns the
setup-namespaces step fills), so CRIU restores none of the netns's iptables or nftables
rules, and the migration's dump leaves them out. Without this a tenant's firewall silently
vanished on every restore, live migration and restore --with-state.

dump: the ruleset of the CT's network namespace (``nft list ruleset``: nftables and
iptables-nft, Debian's iptables since 10) is written to RULESET_FILE in the images, and the
legacy iptables tables (only when the CT loaded any) to LEGACY_FILES.
restore: loaded into the new netns once the network is set up, before any task runs. A
ruleset that doesn't load fails the restore (a migrating CT keeps running at the source):
a CT never comes back without its firewall.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from vzbackup.errors import CheckpointError, DependencyError

RULESET_FILE = "vzbackup-nftables.conf"
# legacy (x_tables) table list in the netns -> the images file, save and restore tools
LEGACY_FILES = {
    "ip_tables_names": ("vzbackup-iptables-legacy", "iptables-legacy-save",
                        "iptables-legacy-restore"),
    "ip6_tables_names": ("vzbackup-ip6tables-legacy", "ip6tables-legacy-save",
                         "ip6tables-legacy-restore"),
}


def _in_netns(pid: int, argv: list[str], stdin: str | None = None) -> str:
    """Run *argv* in the network namespace of host *pid* (only that namespace: the node's
    tools, the CT's rules); returns its output."""
    try:
        res = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv], input=stdin,
                             capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DependencyError("nsenter is missing", hint="apt-get install util-linux") from None
    if res.returncode:
        raise CheckpointError(f"{argv[0]} in the CT's network namespace failed: "
                              f"{res.stderr.strip() or res.returncode}")
    return res.stdout


def _legacy_tables(pid: int, names: str) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/net/{names}").read_text().strip())
    except OSError:  # the module isn't loaded: no legacy tables anywhere
        return False


def save(pid: int, images_dir: Path) -> None:
    """Write the firewall of the CT whose init is host *pid* into *images_dir*."""
    (images_dir / RULESET_FILE).write_text(_in_netns(pid, ["nft", "list", "ruleset"]))
    for names, (file, save_tool, _) in LEGACY_FILES.items():
        if _legacy_tables(pid, names):
            (images_dir / file).write_text(_in_netns(pid, [save_tool]))


def load(pid: int, images_dir: Path) -> None:
    """Load the saved firewall into the (new) network namespace of host *pid*."""
    for file, _, restore_tool in LEGACY_FILES.values():
        path = images_dir / file
        if path.exists():
            _in_netns(pid, [restore_tool], path.read_text())
    path = images_dir / RULESET_FILE
    ruleset = path.read_text() if path.exists() else ""
    if ruleset.strip():
        _in_netns(pid, ["nft", "-f", "-"], ruleset)
