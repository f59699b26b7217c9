"""vzctl verbs as functions: each validates first, locks the CT, and undoes partial work.

``start``, ``stop`` and ``restore`` run under the CT lock their caller holds
(``with ct.lock(): ops.start(ct)``): backups, migrations and restores compose them inside
their own locked section, and the lock is not re-entrant. The other verbs lock themselves.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vzbackup import constants as C
from vzbackup import errors as E
from vzbackup.config.ct import CTConfig, diskinodes, diskspace_kib, parse_size, validate_name
from vzbackup.config.net import ip_addr, unique_ips, validate_ip
from vzbackup.config.node import Node
from vzbackup.config.vzfile import VzFile
from vzbackup.criu import blockers, driver
from vzbackup.criu.check import criu_binary, pycriu_module
from vzbackup.ct import admission, fencing, fs, idmap, network, registry, rootfs
from vzbackup.ct.container import Container
from vzbackup.ct.state import read_state
from vzbackup.template import cache as template_cache
from vzbackup.template.extract import extract_template

log = logging.getLogger(__name__)


def create(
    node: Node,
    ctid: int,
    *,
    ostemplate: str | None = None,
    sample: str | None = None,
    ipadd: list[str] | None = None,
    hostname: str | None = None,
    name: str | None = None,
    privileged: bool | None = None,
) -> Container:
    """Create CT *ctid* from an OS template: private area, CTID.conf, name link.

    The CT is unprivileged unless *privileged* (or vz.conf's UNPRIVILEGED="no") says so; the
    mode and id map are recorded in CTID.conf and the template's files shifted to the map."""
    ct = Container(node, ctid)
    ips = unique_ips(ipadd or [])
    if name:
        validate_name(name)
    node.ensure_dirs()
    with ct.lock():
        for clash in admission.clashes(node, ctid, name=name or "", ips=ips):
            raise clash.error()
        ostemplate = ostemplate or node.value("DEF_OSTEMPLATE")
        archive = template_cache.find_template(node.template_cache, ostemplate)
        sample = sample or node.value("CONFIGFILE")
        sample_path = next((p for p in node.sample_paths(sample) if p.exists()), None)
        if sample_path is None:
            raise E.NotFoundError(
                f"sample config {sample!r} not found",
                hint=f"looked for {', '.join(map(str, node.sample_paths(sample)))}",
            )
        conf = CTConfig(ctid, VzFile(node.ct_conf_path(ctid), sample_path.read_text()))
        conf.validate()
        conf.set("VE_ROOT", node.value("VE_ROOT"))
        conf.set("VE_PRIVATE", node.value("VE_PRIVATE"))
        conf.set("OSTEMPLATE", ostemplate)
        conf.set("ORIGIN_SAMPLE", sample)
        ids = node.new_ct_idmap(privileged)
        conf.set_idmap(ids)
        if hostname:
            conf.set("HOSTNAME", hostname)
        if ips:
            conf.set("IP_ADDRESS", " ".join(ips))
        if name:
            conf.set("NAME", name)
        private = ct.ve_private(conf)
        for clash in admission.clashes(node, ctid, new=False, private=private):
            raise clash.error()
        private.parent.mkdir(parents=True, exist_ok=True)
        fs.private_subvolume(private)  # else extraction renames a new directory into place
        try:
            extract_template(archive, private)
            idmap.shift_tree(private, idmap.IDENTITY, ids)
            problem = rootfs.init_problem(private)
            if problem:
                raise E.UsageError(
                    f"OS template {ostemplate!r} is not a root filesystem: {problem}",
                    hint=f"{archive} must hold a whole OS tree (./sbin/init, ./etc, ...)",
                )
        except BaseException:
            fs.remove_tree(private, ignore_errors=True)
            raise
        try:
            conf.save()
            if name:
                registry.set_name(node, ctid, name)
            ct.write_dist_files(conf)
            ct.apply_quota(conf)
        except BaseException:
            fs.remove_tree(private, ignore_errors=True)
            ct.conf_path.unlink(missing_ok=True)
            raise
    return ct


def convert(ct: Container, target: idmap.IdMap, *, dry_run: bool = False) -> dict:
    """Switch a stopped CT between privileged and unprivileged: shift its private area's
    ownership (ACLs, file capabilities) to *target* and record the new map in CTID.conf.

    Refuses while CRIU images of the CT exist (they hold the old ids). *dry_run* only counts
    what would change. Returns a report (from, to, entries, acls, fcaps)."""
    with ct.lock():
        conf = ct.conf
        ct.require_stopped("converting it")
        current = conf.idmap
        images = dump_dir(ct, None)
        if (images / "inventory.img").exists():
            raise E.StateError(
                f"CT {ct.ctid} has a checkpoint in {images} made with its current ids",
                hint="restore it and stop the CT, or remove the checkpoint first",
            )
        report = {"ctid": ct.ctid, "from": current.describe(), "to": target.describe()}
        if current == target:
            return {**report, "entries": 0, "acls": 0, "fcaps": 0, "changed": False}
        stats = idmap.shift_tree(ct.ve_private(conf), current, target, dry_run=dry_run)
        if not dry_run:
            conf.set_idmap(target)
            conf.save()
        return {
            **report,
            "entries": stats.entries,
            "acls": stats.acls,
            "fcaps": stats.fcaps,
            "changed": not dry_run,
        }


def destroy(ct: Container) -> None:
    """Remove a stopped CT: private area, root dir, config (kept as .destroyed), name, and
    its checkpoint in DUMPDIR (as vzctl: else a new CT with this CTID would resume it)."""
    with ct.lock():
        conf = ct.conf
        ct.require_stopped("destroying it")
        ct.umount()
        ct.remove_private()
        shutil.rmtree(dump_dir(ct, None), ignore_errors=True)
        registry.remove_name(ct.node, conf.name)
        os.replace(ct.conf_path, ct.conf_path.with_suffix(".conf.destroyed"))


def _spawn_supervisor(ct: Container, mode: str, extra: list[str]) -> int:
    """Start the detached supervisor and wait for its verdict; returns the init pid."""
    return int(_await_verdict(ct, mode, _launch_supervisor(ct, mode, extra))["pid"])


def _launch_supervisor(ct: Container, mode: str, extra: list[str],
                       pass_fds: tuple[int, ...] = ()) -> int:
    """Start the detached supervisor; returns the read end of its verdict pipe."""
    ct.node.rundir.mkdir(parents=True, exist_ok=True)
    logf = open(ct.node.rundir / C.SUPERVISOR_LOG.format(ctid=ct.ctid), "ab")  # noqa: SIM115
    r, w = os.pipe()
    try:
        subprocess.Popen(
            [sys.executable, "-m", "vzbackup.ct.supervisor", mode, str(ct.ctid),
             "--prefix", ct.node.prefix, "--ready-fd", str(w), *extra],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            pass_fds=(w, *pass_fds),
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
        logf.close()
    return r


def _await_verdict(ct: Container, mode: str, r: int) -> dict:
    """The supervisor's report: ``pid`` of the CT's init, ``steps`` (seconds per sub-step)."""
    chunks = []
    try:
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
    try:
        verdict = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        verdict = {}
    if not verdict.get("ok"):
        err = verdict.get("error") or f"supervisor died; see {ct.node.rundir}/{ct.ctid}.log"
        cls = getattr(E, verdict.get("kind", ""), E.RuntimeFailure)
        raise cls(f"CT {ct.ctid}: {mode} failed: {err}")
    return verdict


class StandbyRestore:
    """A restore supervisor started ahead of time (its Python and CRIU bindings loaded),
    waiting on a pipe: :meth:`go` restores, :meth:`cancel` (or our death) makes it exit."""

    def __init__(self, ct: Container, images: Path, extra: list[str]) -> None:
        self.ct = ct
        self.images = images
        self.steps: dict[str, float] = {}  # the restore's sub-steps, once go() returned
        go_r, self._go = os.pipe()
        try:
            self._verdict = _launch_supervisor(
                ct, "restore", [*extra, "--go-fd", str(go_r)], pass_fds=(go_r,))
        except BaseException:
            os.close(self._go)
            raise
        finally:
            os.close(go_r)

    def wait_ready(self, timeout: float) -> None:
        """Until the supervisor stands by (Python, CRIU's bindings and criu loaded, the CT
        root mounted, its cgroups made): its start then stays out of a migration's freeze,
        where it took 30-330 ms on a busy node when the word came first."""
        ready, _, _ = select.select([self._verdict], [], [], timeout)
        said = os.read(self._verdict, 1) if ready else None
        if said == C.SUPERVISOR_STANDING_BY:
            return
        self.cancel()
        why = f"did not stand by within {timeout:.0f}s" if said is None else "ended"
        raise E.RuntimeFailure(f"CT {self.ct.ctid}: the restore supervisor {why}",
                               hint=f"see {self.ct.node.rundir}/{self.ct.ctid}.log")

    def go(self) -> int:
        """Restore now (the images must be complete); returns the restored init's pid."""
        if not (self.images / "inventory.img").exists():
            self.cancel()
            raise E.NotFoundError(f"no CRIU images in {self.images}")
        if self.ct.running:
            self.cancel()
            raise E.StateError(f"CT {self.ct.ctid} is running: nothing to restore into")
        os.write(self._go, b"g")
        os.close(self._go)
        self._go = -1
        verdict = _await_verdict(self.ct, "restore", self._verdict)
        self.steps = {k: float(v) for k, v in verdict.get("steps", {}).items()}
        return int(verdict["pid"])

    def apply_quota(self) -> None:
        """The CT's disk limits, once restored: not before, where a migration's final sync
        (rsync's temporary copies of changed files) would hit them, and not in the freeze
        (a migration applies them after its answer to the source)."""
        try:
            self.ct.apply_quota()
        except (E.VzError, OSError) as e:
            log.warning("CT %s runs without its disk quota: %s", self.ct.ctid, e)

    def cancel(self) -> None:
        if self._go >= 0:
            os.close(self._go)  # EOF on the go pipe: the supervisor exits untouched
            os.close(self._verdict)
            self._go = -1


def standby_restore(ct: Container, dumpfile: str, *, keep_dump: bool = False,
                    lazy: bool = False, criu_log_level: int = C.CRIU_LOG_LEVEL
                    ) -> StandbyRestore:
    """Start a restore supervisor for *ct* that waits for StandbyRestore.go(). The caller
    holds ``ct.lock()``."""
    _require_lock(ct)
    criu_binary()
    pycriu_module()
    check_start_inputs(ct.conf)
    extra = _restore_args(dumpfile, keep_dump=keep_dump, lazy=lazy, level=criu_log_level)
    return StandbyRestore(ct, Path(dumpfile), extra)


def _restore_args(images: str, *, keep_dump: bool, lazy: bool, level: int,
                  tcp_close: bool = False) -> list[str]:
    """The restore supervisor's options (vzbackup.ct.supervisor)."""
    flags = {"--keep-dump": keep_dump, "--tcp-close": tcp_close, "--lazy-pages": lazy}
    return ["--dumpdir", images, "--criu-log-level", str(level),
            *(flag for flag, on in flags.items() if on)]


def check_start_inputs(conf: CTConfig) -> None:
    """Refuse before anything is set up: IPs taken on the host, missing bind mount sources."""
    used = network.ips_in_use_on_host(conf.ips)
    if used:
        raise E.ExistsError(f"IP address(es) {', '.join(used)} already in use on this host")
    for b in conf.bindmounts:
        if not os.path.isdir(b.host):
            raise E.NotFoundError(f"CT {conf.ctid}: bind mount source {b.host} is not a directory")


def _require_lock(ct: Container) -> None:
    if not ct.lock().held:
        raise AssertionError(f"CT {ct.ctid}: the caller must hold ct.lock()")


def start(ct: Container) -> int:
    """Start a stopped CT; returns its init pid. The caller holds ``ct.lock()``."""
    _require_lock(ct)
    conf = ct.conf
    if ct.running:
        raise E.StateError(f"CT {ct.ctid} is already running")
    check_start_inputs(conf)
    problem = rootfs.init_problem(ct.ve_private(conf))
    if problem:
        raise E.NotFoundError(
            f"CT {ct.ctid} cannot start: {problem} in {ct.ve_private(conf)}",
            hint="restore the CT's files, or recreate it from a root filesystem template",
        )
    ct.apply_quota(conf)
    pid = _spawn_supervisor(ct, "start", [])
    _set_aside_checkpoint(ct)
    return pid


def _set_aside_checkpoint(ct: Container) -> None:
    """A fresh start outdates the CT's checkpoint in DUMPDIR: it goes to Dump.CTID.old, else
    boot or 'restore CTID' would later resume its processes on files they no longer match
    (and chkpnt would find the directory taken)."""
    images = dump_dir(ct, None)
    if images.is_dir() and any(images.iterdir()):
        aside = images.with_name(images.name + ".old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(images, aside)
        log.warning("CT %s started afresh: its checkpoint moved to %s", ct.ctid, aside)


def _wait_gone(ct: Container, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_state(ct.node, ct.ctid) is None:
            return True
        time.sleep(0.05)
    return False


# How to ask an init for a clean halt, by the name of its executable; other inits get
# /sbin/halt run inside the CT, then SIGTERM.
HALT_SIGNALS = {
    "systemd": signal.SIGRTMIN + 3,  # systemd's "halt" in a container
    "busybox": signal.SIGUSR1,  # busybox init's halt
}


def init_kind(init_pid: int) -> str:
    """The base name of the CT init's executable (systemd, busybox, ...), '' if unknown."""
    try:
        return os.path.basename(os.readlink(f"/proc/{init_pid}/exe")).removesuffix(" (deleted)")
    except OSError:
        return ""


def _ask_halt(ct: Container, init_pid: int) -> None:
    sig = HALT_SIGNALS.get(init_kind(init_pid))
    if sig is None:
        if ct.exec(["/sbin/halt"], capture=True).returncode == 0:
            return
        sig = signal.SIGTERM
    with contextlib.suppress(ProcessLookupError):
        os.kill(init_pid, sig)


def stop(ct: Container, *, timeout: float | None = None, fast: bool = False) -> None:
    """Graceful halt inside the CT (the signal its init expects), then SIGKILL of its init
    after *timeout* seconds. The caller holds ``ct.lock()``."""
    _require_lock(ct)
    ct.conf  # noqa: B018 - raises NotFoundError for an unknown CT
    st = ct.state()
    if st is None:
        raise E.StateError(f"CT {ct.ctid} is not running")
    timeout = ct.node.stop_timeout if timeout is None else timeout
    with contextlib.suppress(Exception):
        ct.cgroup().thaw()
    if not fast and st.init_pid:
        _ask_halt(ct, st.init_pid)
        if _wait_gone(ct, timeout):
            return
        log.warning("CT %s did not halt within %ss: killing it", ct.ctid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(st.init_pid, signal.SIGKILL)
    if not _wait_gone(ct, 30):
        raise E.RuntimeFailure(f"CT {ct.ctid}: supervisor {st.supervisor_pid} did not finish")


def dump_dir(ct: Container, dumpfile: str | None) -> Path:
    """The images' directory: *dumpfile* (relative to our cwd, not the supervisor's /) or
    DUMPDIR/Dump.CTID."""
    return (
        Path(dumpfile).absolute() if dumpfile
        else ct.node.dumpdir / C.CRIU_IMAGE_SUBDIR.format(ctid=ct.ctid)
    )


def dump_external(conf: CTConfig) -> list[str]:
    """CRIU ``external`` entries for a dump of the CT: its bind mounts, by key, and the
    node's files bound in by the runtime (devices, masks)."""
    return [f"mnt[{b.ct}]:{b.key}" for b in conf.bindmounts] + fencing.criu_dump_externals()


def chkpnt(ct: Container, dumpfile: str | None = None) -> tuple[Path, float]:
    """CRIU dump of a running CT (it stops); a failed dump leaves it running."""
    criu_binary()
    pycriu_module()
    with ct.lock():
        st = ct.require_running()
        if ct.status() == "suspended":
            ct.cgroup().thaw()
        final = dump_dir(ct, dumpfile)
        if final.exists() and any(final.iterdir()):
            raise E.ExistsError(
                f"dump directory {final} is not empty", hint="restore from it or remove it first"
            )
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            blockers.reopen_detached(ct, st.init_pid)
            ext = dump_external(ct.conf)
            took = driver.dump(st.init_pid, partial, driver.DumpOptions(external=ext))
        except E.CheckpointError:
            failed_log = final.with_name(final.name + ".failed.log")
            with contextlib.suppress(OSError):
                shutil.copy(partial / driver.DUMP_LOG, failed_log)
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if final.exists():
            final.rmdir()
        os.replace(partial, final)
        if not _wait_gone(ct, 30):
            raise E.RuntimeFailure(f"CT {ct.ctid} did not stop after the dump")
        return final, took


def restore(
    ct: Container,
    dumpfile: str | None = None,
    *,
    keep_dump: bool = False,
    tcp_close: bool = False,
    lazy: bool = False,
    criu_log_level: int = C.CRIU_LOG_LEVEL,
) -> int:
    """Restore the CT from CRIU images; *tcp_close*: images whose TCP peers are gone (backups);
    *lazy*: memory is pulled by a ``criu lazy-pages`` daemon already serving the images dir.
    The caller holds ``ct.lock()``."""
    _require_lock(ct)
    criu_binary()
    pycriu_module()
    conf = ct.conf
    if ct.running:
        raise E.StateError(f"CT {ct.ctid} is running: nothing to restore into")
    images = dump_dir(ct, dumpfile)
    if not (images / "inventory.img").exists():
        raise E.NotFoundError(f"no CRIU images in {images}")
    check_start_inputs(conf)
    ct.apply_quota(conf)
    extra = _restore_args(str(images), keep_dump=keep_dump, lazy=lazy, level=criu_log_level,
                          tcp_close=tcp_close)
    return _spawn_supervisor(ct, "restore", extra)


def mount(ct: Container) -> None:
    with ct.lock():
        ct.mount()


def umount(ct: Container) -> None:
    with ct.lock():
        ct.require_stopped("unmounting it")
        ct.umount()


def suspend(ct: Container) -> None:
    with ct.lock():
        ct.require_running()
        if ct.status() == "suspended":
            raise E.StateError(f"CT {ct.ctid} is already suspended")
        ct.cgroup().freeze()


def resume(ct: Container) -> None:
    with ct.lock():
        if ct.status() != "suspended":
            raise E.StateError(f"CT {ct.ctid} is not suspended")
        ct.cgroup().thaw()


def _pages(size: object) -> str:
    return f"0:{parse_size(str(size)) // 4096}"


def _limit_pair(parse: Callable[[str], tuple[int, int]], what: str) -> Callable[[object], str]:
    """soft[:hard] given to set, written as vzctl does: both numbers."""
    def text(value: object) -> str:
        try:
            return "{}:{}".format(*parse(str(value)))
        except ValueError as e:
            raise E.UsageError(f"--{what} {value}: {e}", hint="SOFT[:HARD]") from None

    return text


def _words(values: object) -> str:
    return " ".join(values)  # type: ignore[call-overload]


def _nameservers(values: object) -> str:
    """--nameserver: addresses, each written to the CT's resolv.conf as it is."""
    for ns in values:  # type: ignore[attr-defined]
        try:
            ipaddress.ip_address(ns)
        except ValueError:
            raise E.UsageError(f"--nameserver {ns}: not an IP address", hint="vzctl's "
                               "'inherit' (the node's resolvers) is not supported") from None
    return _words(values)


# vzctl set option -> (CTID.conf key, how its value is written)
_SETTINGS: dict[str, tuple[str, Callable[[object], str]]] = {
    "hostname": ("HOSTNAME", str),
    "onboot": ("ONBOOT", str),
    "bootorder": ("BOOTORDER", str),
    "stop_mode": ("VE_STOP_MODE", str),
    "cpus": ("CPUS", str),
    "cpulimit": ("CPULIMIT", str),
    "cpuunits": ("CPUUNITS", str),
    "diskspace": ("DISKSPACE", _limit_pair(diskspace_kib, "diskspace")),
    "diskinodes": ("DISKINODES", _limit_pair(diskinodes, "diskinodes")),
    "diskquota": ("DISK_QUOTA", str),
    "numproc": ("NUMPROC", str),
    "nameserver": ("NAMESERVER", _nameservers),
    "searchdomain": ("SEARCHDOMAIN", _words),
    "bindmount": ("BINDMOUNT", _words),
    "ram": ("PHYSPAGES", _pages),
    "swap": ("SWAPPAGES", _pages),
}
_CGROUP_KEYS = {"PHYSPAGES", "SWAPPAGES", "CPUS", "CPULIMIT", "CPUUNITS", "NUMPROC"}
_DIST_KEYS = {"HOSTNAME", "NAMESERVER", "SEARCHDOMAIN"}
_QUOTA_KEYS = {"DISKSPACE", "DISKINODES", "DISK_QUOTA"}
# set options a running CT has no use for until they are saved (boot, shutdown, start, names)
_SAVED_ONLY = ("onboot", "bootorder", "stop_mode", "bindmount", "name")


def set_params(ct: Container, params: dict[str, object], *, save: bool) -> list[str]:
    """vzctl set: apply to the running CT and/or save to CTID.conf; returns what changed."""
    with ct.lock():
        conf = ct.conf
        running = ct.running
        if not running and not save:
            raise E.UsageError(f"CT {ct.ctid} is not running: use --save to store the settings")
        unsaved = [f"--{o.replace('_', '-')}" for o in _SAVED_ONLY if o in params]
        if unsaved and not save:
            raise E.UsageError(f"{', '.join(unsaved)} can't be applied to running CT "
                               f"{ct.ctid}, only saved: add --save")
        if running and "hostname" in params:  # set inside the CT, before anything changes
            ct.require_thawed()
        changed: list[str] = []
        ipadd = unique_ips(params.pop("ipadd", None) or [])
        ipdel = list(params.pop("ipdel", None) or [])
        if ipadd or ipdel:
            _set_ips(ct, conf, ipadd, ipdel, running=running)
            changed.append("IP_ADDRESS")
        name = params.pop("name", None)
        if name is not None:
            _set_name(ct, conf, validate_name(str(name)))
            changed.append("NAME")
        for opt, (key, text) in _SETTINGS.items():
            value = params.pop(opt, None)
            if value is None or (isinstance(value, list | tuple) and not value):
                continue
            conf.set(key, text(value))
            changed.append(key)
        if params:
            raise E.UsageError(f"unknown setting(s): {', '.join(params)}")
        if running:
            _apply_running(ct, conf, set(changed))
        if _QUOTA_KEYS & set(changed):  # on the files, so a stopped CT's too
            ct.apply_quota(conf)
        if save:
            conf.save()
        return changed


def _set_ips(ct: Container, conf: CTConfig, ipadd: list[str], ipdel: list[str], *,
             running: bool) -> None:
    for clash in admission.clashes(ct.node, ct.ctid, new=False, ips=ipadd):
        raise clash.error()
    current = conf.ips
    # an address matches whatever prefix it is written with ('--ipdel 10.0.0.5/32' deletes
    # '10.0.0.5'), and a CT has each address once
    if "all" in ipdel:
        deleted = set(map(ip_addr, current))
    else:
        deleted = {ip_addr(validate_ip(i)) for i in ipdel}
        missing = sorted(deleted - set(map(ip_addr, current)))
        if missing:
            raise E.UsageError(f"CT {ct.ctid} has no IP {', '.join(missing)}")
    kept = [i for i in dict.fromkeys(current) if ip_addr(i) not in deleted]
    have = set(map(ip_addr, kept))
    added = [i for i in ipadd if ip_addr(i) not in have]  # deleted first, as vzctl
    if running:
        st = ct.require_running()
        net = ct.net_config(conf)
        # as configured; one deleted and added again as it was stays up
        gone = [i for i in dict.fromkeys(current) if ip_addr(i) in deleted and i not in added]
        if gone:
            network.del_ips(net, st.init_pid, gone)
        if new := [i for i in added if i not in current]:
            network.add_ips(net, st.init_pid, new)
    conf.set("IP_ADDRESS", " ".join(kept + added))


def _set_name(ct: Container, conf: CTConfig, name: str) -> None:
    registry.set_name(ct.node, ct.ctid, name)
    if conf.name and conf.name != name:
        registry.remove_name(ct.node, conf.name)
    conf.set("NAME", name)


def _apply_running(ct: Container, conf: CTConfig, changed: set[str]) -> None:
    """Apply changed settings to the running CT: cgroup limits, files inside, hostname."""
    if _CGROUP_KEYS & changed:
        ct.cgroup().apply(ct.limits(conf))
    if _DIST_KEYS & changed:
        ct.write_dist_files(conf)
    if "HOSTNAME" in changed:
        ct.exec(["hostname", conf.hostname], capture=True)
