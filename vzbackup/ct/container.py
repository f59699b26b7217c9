"""One container on a node: its config, private area, root mount, cgroups and status."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vzbackup import constants as C
from vzbackup import syscalls as S
from vzbackup.config.ct import CTConfig
from vzbackup.config.node import Node, expand
from vzbackup.ct.state import CTState, read_state
from vzbackup.errors import NotFoundError, RuntimeFailure, StateError
from vzbackup.lock import Lock

if TYPE_CHECKING:  # the runtime parts load where they are used: a backup needs none of them
    import subprocess

    from vzbackup.ct import network, quota
    from vzbackup.ct.cgroups import CgroupSet, Limits

CT_LOCK_WAIT = 30.0
CT_TEXT_MAX = 16 * 1024 * 1024  # a CT file the node edits (hosts, resolv.conf) at most

log = logging.getLogger(__name__)


@dataclass
class Container:
    """A CT of a node, by CTID: its configuration, paths and state."""

    node: Node
    ctid: int

    # --- configuration -------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.node.ct_conf_path(self.ctid)

    @property
    def exists(self) -> bool:
        return self.conf_path.exists()

    @property
    def conf(self) -> CTConfig:
        if not self.exists:
            raise NotFoundError(f"CT {self.ctid} does not exist", hint="see 'vzbackup list -a'")
        return CTConfig.load(self.ctid, self.conf_path)

    def setting(self, key: str, conf: CTConfig | None = None) -> str:
        """*key* of CTID.conf (*conf* when given), else vz.conf's, else the node default."""
        return (conf.get(key) if conf else "") or self.node.value(key)

    def _path(self, key: str, conf: CTConfig | None = None) -> Path:
        return Path(expand(self.setting(key, conf), prefix=self.node.prefix, ctid=self.ctid))

    def ve_root(self, conf: CTConfig | None = None) -> Path:
        return self._path("VE_ROOT", conf or (self.conf if self.exists else None))

    def ve_private(self, conf: CTConfig | None = None) -> Path:
        return self._path("VE_PRIVATE", conf or (self.conf if self.exists else None))

    def lock(self, wait: float = CT_LOCK_WAIT) -> Lock:
        return Lock(self.node.lockdir / f"{self.ctid}.lck", wait=wait, what=f"CT {self.ctid}")

    def backup_lock(self, wait: float = 0.0) -> Lock:
        """One backup (or migration) of the CT at a time; held beside :meth:`lock`."""
        return Lock(self.node.lockdir / f"{self.ctid}.backup.lock", wait=wait,
                    what=f"backup of CT {self.ctid}")

    # --- runtime views -------------------------------------------------------------
    def state(self) -> CTState | None:
        return read_state(self.node, self.ctid)

    @property
    def running(self) -> bool:
        return self.state() is not None

    @property
    def mounted(self) -> bool:
        root = self.ve_root()
        return root.is_dir() and S.is_mountpoint(str(root))

    def cgroup(self) -> CgroupSet:
        from vzbackup.ct.cgroups import open_cgroups

        return open_cgroups(f"{self.node.cgroup_parent}/{self.ctid}")

    def status(self, state: CTState | None = None) -> str:
        """vzctl-like status word: running, suspended or stopped (*state*: already read)."""
        st = state or self.state()
        if st is None:
            return "stopped"
        with contextlib.suppress(OSError, RuntimeFailure):
            if self.cgroup().is_frozen():
                return "suspended"
        return st.status

    def require_running(self) -> CTState:
        st = self.state()
        if st is None or st.status != "running":
            raise StateError(f"CT {self.ctid} is not running")
        return st

    def require_thawed(self) -> CTState:
        """The running CT's state; StateError if it is suspended (a process put into its
        frozen cgroups would freeze with whatever it holds, e.g. the CT's lock)."""
        st = self.require_running()
        if self.status(st) == "suspended":
            raise StateError(f"CT {self.ctid} is suspended", hint="resume it first")
        return st

    def require_stopped(self, action: str) -> None:
        if self.running:
            raise StateError(f"CT {self.ctid} is running: stop it before {action}")

    def limits(self, conf: CTConfig | None = None) -> Limits:
        from vzbackup.ct.cgroups import Limits

        c = conf or self.conf
        return Limits(
            memory_bytes=c.memory_bytes,
            swap_bytes=c.swap_bytes,
            cpus=c.cpus,
            cpulimit_percent=c.cpulimit,
            cpuunits=c.cpuunits,
            pids_max=c.numproc,
        )

    def quota_limits(self, conf: CTConfig | None = None) -> quota.Limits:
        """DISKSPACE and DISKINODES, or none when DISK_QUOTA (CT's, else vz.conf's) is no."""
        from vzbackup.ct import quota

        c = conf or self.conf
        if self.setting("DISK_QUOTA", c) == "no":
            return quota.Limits()
        return quota.Limits(*c.diskspace, *c.diskinodes)

    def apply_quota(self, conf: CTConfig | None = None) -> list[str]:
        """Put the CT's disk limits on its private area; logs and returns what stays
        unenforced (and why)."""
        from vzbackup.ct import quota

        c = conf or self.conf
        limits = self.quota_limits(c)
        problems = quota.apply(self.ve_private(c), self.ctid, limits).unenforced(limits)
        for problem in problems:
            log.warning("CT %s: %s", self.ctid, problem)
        return problems

    def quota_problems(self, conf: CTConfig | None = None) -> list[str]:
        """What of the CT's disk limits its private area's filesystem leaves unenforced."""
        from vzbackup.ct import quota

        c = conf or self.conf
        limits = self.quota_limits(c)
        return quota.detect(self.ve_private(c)).unenforced(limits) if limits else []

    def net_config(self, conf: CTConfig | None = None) -> network.NetConfig:
        from vzbackup.ct import network

        c = conf or self.conf
        return network.NetConfig(
            ctid=self.ctid,
            ips=tuple(c.ips),
            netifs=tuple(c.netifs),
            neighbour_devs=self.node.value("NEIGHBOUR_DEVS"),
        )

    def nproc(self) -> int:
        """Processes in the CT's cgroups (0 when they don't exist)."""
        with contextlib.suppress(OSError, RuntimeFailure):
            return len(self.cgroup().pids())
        return 0

    # --- root mount ----------------------------------------------------------------
    def mount(self) -> bool:
        """Bind VE_PRIVATE onto VE_ROOT (simfs-like); False if it already was mounted."""
        conf = self.conf
        private, root = self.ve_private(conf), self.ve_root(conf)
        if not private.is_dir():
            raise NotFoundError(f"CT {self.ctid}: private area {private} is missing")
        root.mkdir(parents=True, exist_ok=True)
        if S.is_mountpoint(str(root)):
            return False
        S.mount(str(private), str(root), None, S.MS_BIND)
        S.mount("none", str(root), None, S.MS_PRIVATE)
        return True

    def umount(self) -> None:
        root = self.ve_root()
        if root.is_dir() and S.is_mountpoint(str(root)):
            try:
                S.umount(str(root))
            except OSError:
                S.umount(str(root), S.MNT_DETACH)

    # --- files inside the CT (what vzctl's dist scripts do) --------------------------
    def write_dist_files(self, conf: CTConfig | None = None) -> None:
        """Hostname, resolv.conf and hosts in the private area, from the config."""
        c = conf or self.conf
        etc = self.ve_private(c) / "etc"
        if not etc.is_dir() or etc.is_symlink():
            return
        owner = c.idmap.root
        files: dict[str, str | None] = {}
        if c.hostname:
            old = (_read_in_ct(etc / "hostname") or "").strip()
            ip = c.ips[0].split("/")[0] if c.ips else "127.0.0.1"
            files["hostname"] = c.hostname + "\n"
            files["hosts"] = _hosts(etc / "hosts", c.hostname, ip, old)
        if c.nameservers or c.searchdomains:
            files["resolv.conf"] = _resolv_conf(etc / "resolv.conf", c)
        for name, text in files.items():
            if text is None:
                log.warning("CT %s: /etc/%s is over %d bytes; left as it is", self.ctid,
                            name, CT_TEXT_MAX)
            else:
                _write_in_ct(etc / name, text, owner)
        self._write_systemd_dropin(etc, c)

    def systemd_checkpoint(self, conf: CTConfig | None = None) -> bool:
        """SYSTEMD_CHECKPOINT of CTID.conf, else vz.conf's, default yes."""
        setting = self.setting("SYSTEMD_CHECKPOINT", conf or self.conf)
        return setting.lower() not in ("no", "off", "0")

    def _write_systemd_dropin(self, etc: Path, c: CTConfig) -> None:
        """The drop-ins that keep a systemd CT checkpointable (SYSTEMD_CHECKPOINT of CTID.conf,
        else vz.conf's, default yes); removed again when switched off. Nothing for a CT
        without systemd."""
        units = etc / "systemd/system"
        if any(p.is_symlink() for p in (etc / "systemd", units)) or not units.is_dir():
            return
        wanted = self.systemd_checkpoint(c)
        for rel, text in C.SYSTEMD_DROPINS.items():
            dropin = etc / "systemd" / rel
            if not wanted:
                if dropin.parent.is_dir() and not dropin.parent.is_symlink():
                    dropin.unlink(missing_ok=True)
                    with contextlib.suppress(OSError):  # ours alone: leave no empty .d
                        dropin.parent.rmdir()
                continue
            if dropin.parent.is_symlink():
                dropin.parent.unlink()
            if not dropin.parent.is_dir():
                dropin.parent.mkdir()
                os.chown(dropin.parent, c.idmap.root, c.idmap.root)
            _write_in_ct(dropin, text, c.idmap.root)

    def remove_private(self) -> None:
        import shutil

        from vzbackup.ct import fs, quota

        private = self.ve_private()
        if private.resolve() in (Path("/"), Path(self.node.prefix).resolve()):
            raise RuntimeFailure(f"refusing to remove {private}")
        if fs.fs_type(private.parent) == "btrfs":
            for snap in fs.leftover_snapshots(private, self.ctid):
                fs.delete_subvolume(snap)
        with quota.removal(private, self.ctid):
            if fs.is_btrfs_subvolume(private) and not fs.is_mount_point(private):
                fs.delete_subvolume(private)
            elif private.exists():
                shutil.rmtree(private)
        with contextlib.suppress(OSError):
            self.ve_root().rmdir()

    # --- entering --------------------------------------------------------------------
    def _nsenter_argv(self, st: CTState) -> list[str]:
        return [
            "nsenter",
            f"--target={st.init_pid}",
            "--user",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--cgroup",
            "--root",
            "--wd",
        ]

    def _env(self, tty: bool) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "TERM": os.environ.get("TERM", "linux") if tty else "dumb",
        }

    def enter(self, argv: list[str]) -> int:
        """Run *argv* inside the CT on a new pty of the CT's own devpts (like vzctl enter),
        relaying this process's terminal to it; returns the command's exit code (-N: signal N).

        The session is a child of this process, not of the CT's init, so a checkpoint of
        the CT neither needs nor dumps it (a chkpnt ends it, a leave-running dump doesn't)."""
        import subprocess

        from vzbackup.ct import fencing, syscall_filter
        from vzbackup.ct.console import relay_pty

        st = self.require_thawed()
        cg = self.cgroup()
        confine = syscall_filter.build()
        pts = f"/proc/{st.init_pid}/root/dev/pts"
        master, index = S.open_pty(f"{pts}/ptmx")
        try:
            slave = os.open(f"{pts}/{index}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            os.fchown(slave, _host_id(st.init_pid, "uid", 0), _host_id(st.init_pid, "gid", 5))

            def in_ct_session() -> None:
                cg.attach(os.getpid(), existing_only=True)
                _join_namespaces(st.init_pid)
                for cap in fencing.CAPS_DROPPED.values():  # as for the CT's init
                    S.capbset_drop(cap)
                os.setsid()  # the session and its leader are inside the CT's pid namespace
                S.set_controlling_tty(0)
                confine.load()

            try:
                proc = subprocess.Popen(
                    argv,
                    env=self._env(tty=True),
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    preexec_fn=in_ct_session,
                    close_fds=True,
                )
            finally:
                os.close(slave)
            relay_pty(master)
            return proc.wait()
        finally:
            os.close(master)

    def exec(
        self,
        argv: list[str],
        *,
        tty: bool = False,
        input_: bytes | None = None,
        capture: bool = False,
    ) -> subprocess.CompletedProcess:
        """Run *argv* inside the running CT (its namespaces, root and cgroups)."""
        import subprocess

        from vzbackup.ct import syscall_filter

        st = self.require_thawed()
        cg = self.cgroup()
        confine = syscall_filter.build()

        def enter_ct() -> None:
            cg.attach(os.getpid(), existing_only=True)
            confine.load()

        env = self._env(tty)
        kwargs: dict = {}
        if capture:
            kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        return subprocess.run(
            [*self._nsenter_argv(st), "--", *argv],
            env=env,
            input=input_,
            check=False,
            preexec_fn=enter_ct,
            close_fds=True,
            **kwargs,
        )


# Namespaces joined by enter, the user namespace first (it owns the others).
ENTER_NAMESPACES = ("user", "cgroup", "ipc", "uts", "net", "pid", "mnt")


def _join_namespaces(pid: int) -> None:
    """Join the namespaces of *pid*, then fork: the child (in its pid namespace) returns,
    this process waits for it and exits with its status (what nsenter does). Runs in a
    preexec_fn: every other descriptor is closed so Popen sees the exec of the child."""
    for ns in ENTER_NAMESPACES:
        path = f"/proc/{pid}/ns/{ns}"
        if os.stat(path).st_ino == os.stat(f"/proc/self/ns/{ns}").st_ino:
            continue
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            S.setns(fd)
        finally:
            os.close(fd)
        if ns == "user":
            os.setgroups([])
            os.setgid(0)
            os.setuid(0)
    os.chdir("/")
    child = os.fork()
    if child == 0:
        return
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    for fd in (0, 1, 2):
        os.close(fd)
    _, status = os.waitpid(child, 0)
    os._exit(
        os.waitstatus_to_exitcode(status) & 0xFF
        if os.WIFEXITED(status)
        else 128 + os.WTERMSIG(status)
    )


def _host_id(pid: int, kind: str, ct_id: int) -> int:
    """The node's uid/gid (*kind*) for id *ct_id* in the user namespace of *pid*."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/{kind}_map").read_text().splitlines():
            inside, outside, count = (int(x) for x in line.split())
            if inside <= ct_id < inside + count:
                return outside + ct_id - inside
    return ct_id


def _hosts(path: Path, hostname: str, ip: str, old: str) -> str | None:
    """The CT's /etc/hosts ending in "IP HOSTNAME": HOSTNAME and the *old* hostname are taken
    out of its other lines (a line left without a name goes), the rest stays, and a localhost
    line is added if there is none, as vzctl's change_hostname does; None: left as it is
    (over CT_TEXT_MAX)."""
    names = {hostname, old} - {"", "localhost"}
    text = _read_in_ct(path)
    if text is None:
        return None
    lines = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if names & set(fields[1:]):
            rest = [f for f in fields[1:] if f not in names]
            if not rest:
                continue
            line = "\t".join([fields[0], *rest])
        lines.append(line)
    if not any(line.split()[:1] == ["127.0.0.1"] for line in lines):
        lines.insert(0, "127.0.0.1 localhost")
    return "\n".join([*lines, f"{ip} {hostname}"]) + "\n"


def _resolv_conf(path: Path, c: CTConfig) -> str | None:
    """The CT's resolv.conf with the config's search and nameserver lines; its own lines of a
    kind the config leaves unset (and options, comments) are kept, as vzctl's set_dns does;
    None: left as it is (over CT_TEXT_MAX)."""
    ours = ({"search", "domain"} if c.searchdomains else set()) | (
        {"nameserver"} if c.nameservers else set())
    text = _read_in_ct(path)
    if text is None:
        return None
    kept = [ln for ln in text.splitlines() if (ln.split() or [""])[0] not in ours]
    lines = [f"search {' '.join(c.searchdomains)}"] if c.searchdomains else []
    lines += kept + [f"nameserver {ns}" for ns in c.nameservers]
    return "\n".join(lines) + "\n"


def _read_in_ct(path: Path) -> str | None:
    """A regular file of a CT's tree, '' for anything else (no symlink followed, no fifo
    waited on: the CT may have planted either), None when it is over CT_TEXT_MAX: too big
    to read into the node's memory, and to rewrite with only what was read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ""
        data = f.read(CT_TEXT_MAX + 1)
        return None if len(data) > CT_TEXT_MAX else data.decode(errors="replace")


def _write_in_ct(path: Path, text: str, owner: int) -> None:
    """Write a file inside a CT's tree, owned by the CT's root (node id *owner*), without
    following a symlink the CT may have planted."""
    if path.is_symlink():
        path.unlink()
    if _read_in_ct(path) == text:
        return  # unchanged: keep its mtime (backups and migrations see no change)
    tmp = path.with_name(f".{path.name}.vzbackup")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        os.fchown(f.fileno(), owner, owner)
        f.write(text)
    os.replace(tmp, path)
