"""The online move: one CRIU dump whose notify steps drive the whole hand-over.

CRIU calls back at each step of its dump; :class:`OnlineDump` has one method per step::

    pre-dump      the tasks are about to freeze: start the clock
    network-lock  every task is seized, files are final: the last tree sync starts
    post-dump     images written, tasks still frozen: finish the sync, send the images,
                  restore at DEST (or, with lazy pages, stage DEST's page daemon)

A step that raises makes CRIU resume the tasks here. With lazy pages CRIU then serves the
memory on a TCP port until DEST's daemon has pulled every page: the restore at DEST runs
beside it (:meth:`OnlineDump.restore_lazy`), and a failure there fails the page server so
that CRIU resumes the tasks here instead of killing them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from typing import TYPE_CHECKING

from vzbackup.migrate.imagestream import ImagePipe, ImageStream
from vzbackup.migrate.priority import urgent
from vzbackup.migrate.tls import Identity

from vzbackup import constants as C
from vzbackup import errors as E
from vzbackup.criu import blockers, driver
from vzbackup.criu.check import criu_check, criu_fixes, pycriu_module
from vzbackup.ct import network, ops
from vzbackup.nsexec import run_in_ns
from vzbackup.timer import Timer

if TYPE_CHECKING:
    from vzbackup.migrate.phases import Migration

    from vzbackup.ct.container import Container

LISTEN_TIMEOUT = 30.0  # for CRIU's page server to start listening after post-dump


class OnlineDump:
    """One checkpoint-and-move of a running CT; attributes hold its clock and its errors."""

    def __init__(self, mig: Migration, *, lazy: bool) -> None:
        self.mig = mig
        self.lazy = lazy
        ct = mig.ct
        self.pid = ct.require_running().init_pid
        self.images = ct.node.dumpdir / f"Dump.{ct.ctid}.migrate-out"
        self.port = (mig.opts.lazy_port or _free_port()) if lazy else 0
        self.tls = None if mig.opts.plain_pages else Identity.create("source", ct.node.rundir)
        self.reply_within = _freeze_reply_bound(ct)  # for DEST's answers in the freeze
        self.page_server: tuple[str, int] | None = None  # DEST's, without lazy pages
        self.dest_daemon = False  # DEST's lazy-pages daemon runs from the stage on
        self.clock: dict[str, float] = {}  # freeze, staged, restored: monotonic seconds
        self.frozen = Timer()  # the sub-steps of the freeze, for -t
        self.errors: list[BaseException] = []  # from the sync and restore threads
        self.syncer: threading.Thread | None = None
        self.restorer: threading.Thread | None = None
        self.stream: ImageStream | None = None  # images to DEST while CRIU writes them
        self.pipe: ImagePipe | None = None  # ... through OpenSSH, where there is a client

    # ------------------------------------------------------------ before the freeze
    def stage(self) -> None:
        """DEST gets ready while the CT still runs: CT registered, CRIU's page receiver and
        a restore supervisor started, one-time TLS certificates swapped over SSH."""
        mig = self.mig
        with mig.phase("stage"):
            reply = mig.dest.call(
                "stage", lazy=self.lazy, page_address=mig.dest.my_address(),
                page_port=self.port, tls_cert=self.tls.cert_pem if self.tls else None,
            )
        if self.tls is not None:
            self.tls.trust(reply["tls_cert"])
        if not self.lazy:
            self.page_server = (mig.dest.peer_address(), int(reply["page_port"]))
        self.dest_daemon = reply.get("lazy_daemon") == "running"
        mig.report.dest_steps.update({f"stage.{k}": v for k, v in reply.get("steps", {}).items()})

    # ------------------------------------------------------------ CRIU's notify steps
    def pre_dump(self) -> None:
        self.clock["freeze"] = time.monotonic()
        self.frozen = Timer()

    def network_lock(self) -> None:
        self.syncer = self._thread(self.final_sync)

    def post_dump(self) -> None:
        try:
            self._hand_over()
        except BaseException:
            if self.lazy:  # CRIU starts its page server even after a failed post-dump:
                # fail it as soon as it listens, or the dump would wait for ever
                threading.Thread(target=_poke_when_listening, args=(self.port,),
                                 daemon=True).start()
            raise

    def status_ready(self) -> None:
        """CRIU's lazy page server listens: DEST may restore (its daemon connects to it)."""
        if self.lazy and "staged" in self.clock and self.restorer is None:
            self.frozen.lap("page_server_start")
            self.restorer = self._thread(self.restore_lazy)

    def steps(self) -> dict[str, object]:
        return {"pre-dump": self.pre_dump, "network-lock": self.network_lock,
                "post-dump": self.post_dump, "status-ready": self.status_ready}

    # ------------------------------------------------------------ the work of the steps
    def final_sync(self) -> None:
        """The last tree sync, beside the dump (started at network-lock), at the freeze's
        priority at both ends: with a quicker dump it is often what ends the freeze (the
        Debian CT at load ~4.6: rsync 1.28 s beside a 0.86 s dump)."""
        with self.mig.phase("final_sync"):
            self.mig.push_private(final=True, urgent=True)

    def _hand_over(self) -> None:
        mig = self.mig
        now = self.frozen.lap("dump")
        mig.report.times["dump"] = now - self.clock.get("freeze", now)
        if self.syncer is None:
            self.final_sync()
        else:
            self.syncer.join()
        self.frozen.lap("final_sync_wait")
        self._raise_first()
        with mig.phase("image_transfer"):
            self.send_images()
        self.frozen.lap("images")
        if not self.lazy:
            self.restore()
            return
        self.clock["staged"] = time.monotonic()  # status_ready() starts the restore

    def send_images(self) -> None:
        """The images the stream has not sent yet (CRIU's last ones, pages aside); DEST then
        has the whole set. The reply to the last ones is awaited here, in "post-dump": a
        failure at DEST then (its lazy-pages daemon not starting, where DEST's CRIU can't
        start it at the stage) still aborts the dump with the CT's TCP connections intact,
        which a failure after CRIU starts serving pages can't."""
        stream = self.stream
        assert stream is not None  # run() starts it before CRIU's dump calls any step
        rest = stream.rest()  # after the stream's batch in flight, if any
        self.frozen.lap("images_stream")
        if self.pipe is not None:
            n = self.pipe.send(rest)
            self.pipe.finish()
            self.mig.count("images_ssh", self.pipe.bytes)
            if not self.dest_daemon:  # DEST starts it on the complete set
                self._put([], last=True)
        else:
            n = self._put(rest, last=True)
        self.mig.count("images", n + stream.bytes)
        self.mig.count("images_frozen", n)  # what crossed after "post-dump"

    def _send(self, names: list[str]) -> int:
        """The stream's sender: into the OpenSSH pipe, else over the agent channel."""
        return self.pipe.send(names) if self.pipe is not None else self._put(names)

    def _put(self, names: list[str], *, last: bool = False) -> int:
        """Send the images *names* to DEST in one payload over the agent channel; the
        number of bytes sent. With *last* DEST has them all (its lazy-pages daemon
        starts)."""
        sizes, blobs = [], []
        for name in names:
            data = (self.images / name).read_bytes()
            sizes.append([name, len(data)])
            blobs.append(data)
        blob = b"".join(blobs)
        reply = self.mig.dest.call("put_images", data=blob, names=sizes, last=last,
                                   reply_within=self.reply_within)
        if last:
            steps = reply.get("steps", {})
            self.mig.report.dest_steps.update({f"images.{k}": v for k, v in steps.items()})
        return len(blob)

    def _open_pipe(self) -> ImagePipe | None:
        """The OpenSSH stream into DEST's image dir, on the sync's master connection; None
        without an OpenSSH client."""
        ssh = self.mig.session.openssh_command()
        if ssh is None:
            return None
        target = self.mig.session.target
        pipe = ImagePipe([*ssh, target.host], [*target.remote_vzbackup, C.RECV_IMAGES_COMMAND,
                                                self.mig.hello["images"]], self.images)
        pipe.boost_master()
        return pipe

    def restore(self) -> None:
        mig = self.mig
        with mig.phase("restore"):
            reply = mig.dest.call("restore", reply_within=self.reply_within)
        mig.report.dest_steps["restore"] = float(reply.get("seconds", 0.0))
        mig.report.dest_steps.update(
            {f"restore.{k}": float(v) for k, v in reply.get("steps", {}).items()})
        self.frozen.lap("restore")
        self.clock["restored"] = time.monotonic()
        with mig.phase("commit"):
            mig.commit()
        self.frozen.lap("commit")

    def restore_lazy(self) -> None:
        """Beside CRIU's page server (it listens): restore at DEST, commit."""
        mig = self.mig
        try:
            self.restore()
        except BaseException:
            mig.dest.abort(keep_private=mig.opts.keep_dst)
            _poke(self.port)  # the page server gets a torn request: CRIU resumes the tasks
            raise

    def _plain_tmpfs(self) -> bool:
        """Both CRIUs carry "tmpfsplain": no tar + gzip per tmpfs mount in the freeze."""
        fix = C.CRIU_FIX_TMPFS_PLAIN
        return fix in criu_fixes() and fix in self.mig.hello.get("criu_fixes", ())

    # ------------------------------------------------------------ the dump itself
    def run(self) -> None:
        """Stage, dump, move, restore; on failure the CT keeps running here."""
        mig = self.mig
        shutil.rmtree(self.images, ignore_errors=True)
        self.images.mkdir(parents=True, exist_ok=True)
        try:
            self.pipe = self._open_pipe()  # DEST's receiver starts up during the stage
            self.stage()
            if self.pipe is not None:
                self.pipe.wait_ready()
            self.stream = ImageStream(self.images, self._send)
            self.stream.start()
            opts = driver.DumpOptions(
                external=ops.dump_external(mig.ct.conf), lazy_port=self.port,
                page_server=self.page_server, tls=self.tls.files() if self.tls else None,
                network_lock=self._network_lock(),
                skip_netns_config=not nested_netns(self.pid), plain_tmpfs=self._plain_tmpfs(),
                log_level=C.CRIU_FREEZE_LOG_LEVEL)
            # CRIU (forked from this thread), the notify steps, and the SSH transport's
            # thread that carries DEST's answers (2-25 ms a reply on the busy bed)
            with urgent(getattr(mig.session.transport, "native_id", None)):
                driver.dump(self.pid, self.images, opts, notify=self.steps())
            t_served = time.monotonic()
            self._join()
            self._raise_first()
            if self.lazy:
                mig.report.times["lazy_pages"] = t_served - self.clock.get("restored", t_served)
                mig.dest.call("lazy_wait")
            self._count_pages()
        except BaseException as e:
            self._join()
            self._fail(e)
        finally:
            if self.stream is not None:
                self.stream.close()
            if self.pipe is not None:
                self.pipe.close()
            if "restored" in self.clock:
                mig.report.frozen = self.clock["restored"] - self.clock["freeze"]
                mig.report.frozen_steps = dict(self.frozen.laps)
            if self.tls is not None:
                self.tls.remove()
            if not mig.committed:
                shutil.rmtree(self.images, ignore_errors=True)

    def _network_lock(self) -> str:
        """nftables when both CRIUs can: CRIU locks and unlocks in-process, where iptables
        costs a process spawn at each end of the freeze (~10 ms at the lock, ~70 ms at the
        unlock on the loaded bed)."""
        both = self.mig.hello.get("nft_lock") and criu_check(C.CRIU_NFT_LOCK_FEATURE) is None
        return "nftables" if both else "iptables"

    def _count_pages(self) -> None:
        """Bytes CRIU moved itself (page server or lazy pages), from its dump statistics."""
        with contextlib.suppress(Exception):
            with open(self.images / "stats-dump", "rb") as f:
                st = pycriu_module().images.load(f)
            entry = st["entries"][0]["dump"]
            pages = entry.get("pages_lazy", 0) if self.lazy else (
                entry.get("pages_written", 0) + entry.get("shpages_written", 0))
            self.mig.count("pages", int(pages) * os.sysconf("SC_PAGE_SIZE"))

    def _fail(self, e: BaseException) -> None:
        mig = self.mig
        if self.lazy and "staged" in self.clock:
            _unlock_network(self.pid)
        if self.lazy and mig.committed:
            # Pages stopped flowing after DEST took over: CRIU resumed the tasks here (they
            # hold the only complete memory) and DEST drops its copy on its own.
            mig.uncommit()
        with contextlib.suppress(E.VzError, OSError):  # DEST may have announced the IPs
            network.announce(mig.ct.net_config())
        cause = self.errors[0] if self.errors else e
        raise mig.failed(
            f"online migration failed: {cause}; CT {mig.ct.ctid} keeps running here",
            hint=f"CRIU log: {self.images / driver.DUMP_LOG}",
        ) from e

    # ------------------------------------------------------------ helpers
    def _thread(self, fn) -> threading.Thread:
        def target() -> None:
            try:
                fn()
            except BaseException as e:
                self.errors.append(e)

        t = threading.Thread(target=target, daemon=True)
        t.start()
        return t

    def _join(self) -> None:
        for t in (self.syncer, self.restorer):
            if t is not None:
                t.join()

    def _raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]


def nested_netns(init_pid: int) -> bool:
    """Whether a task of the CT runs in a network namespace other than its init's (then CRIU
    must dump the network configuration: it can't leave out more than one)."""
    def netns(pid: int) -> str:
        try:
            return os.readlink(f"/proc/{pid}/ns/net")
        except OSError:  # gone meanwhile
            return ""

    mine = netns(init_pid)
    return any(netns(p) not in (mine, "") for p in blockers.tree(init_pid))


def tls_page_server_problem(pid: int) -> str | None:
    """Why this CRIU can't send the CT's memory to a page server over TLS, or None.

    CRIU dumps the IPC namespace in a forked child that sends the SysV shared memory pages
    with a copy of the parent's TLS session, which breaks the stream (scripts/criu-patches/
    tlsns.patch fixes it; setup.sh's build carries it). Lazy pages and plain TCP are fine."""
    if C.CRIU_FIX_TLS_NSDUMP in criu_fixes() or not _sysv_shm_segments(pid):
        return None
    return ("this CRIU sends SysV shared memory (held in the CT, e.g. by PostgreSQL) to the "
            f"page server over TLS wrongly (it lacks our '{C.CRIU_FIX_TLS_NSDUMP}' fix): use "
            "lazy pages, --plain-tcp on a trusted link, or the CRIU scripts/setup.sh builds")


def _sysv_shm_segments(pid: int) -> int:
    """SysV shared memory segments in the IPC namespace of *pid*."""
    res = run_in_ns(pid, ("ipc",), ["cat", "/proc/sysvipc/shm"])
    return max(0, len(res.stdout.splitlines()) - 1)


def _freeze_reply_bound(ct: Container) -> float:
    """Seconds DEST may take to answer a request in the freeze (C.FREEZE_REPLY_*)."""
    forced = os.environ.get(C.FREEZE_REPLY_ENV, "")
    if forced:
        try:
            return float(forced)
        except ValueError:
            why = f"{C.FREEZE_REPLY_ENV}={forced!r} is not a number of seconds"
            raise E.UsageError(why) from None
    memory = ct.cgroup().memory_usage() or 0
    return C.FREEZE_REPLY_BASE + C.FREEZE_REPLY_PER_GIB * memory / 2**30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    """Whether something in this network namespace listens on TCP *port*."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def _poke_when_listening(port: int) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while not _listening(port) and time.monotonic() < deadline:
        time.sleep(0.005)
    _poke(port)


def _poke(port: int) -> None:
    """Fail CRIU's lazy page server (a torn request, not a clean EOF, which it would take
    for success): the dump then resumes the tasks here instead of killing them."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2) as sk:
        sk.sendall(b"\0")


def _unlock_network(pid: int) -> None:
    """Drop CRIU's network lock in the CT's netns. CRIU leaves it in place when a lazy page
    transfer fails after "post-dump" (it resumes the tasks but skips its own unlock): an nft
    table ``inet CRIU-...`` or iptables' CRIU chain, whichever the dump used."""
    with contextlib.suppress(E.VzError):
        res = run_in_ns(pid, ("net",), ["nft", "-j", "list", "tables"])
        for item in json.loads(res.stdout or "{}").get("nftables", []):
            table = item.get("table", {})
            if table.get("family") == "inet" and str(table.get("name", "")).startswith("CRIU-"):
                run_in_ns(pid, ("net",), ["nft", "delete", "table", "inet", table["name"]])
    for tool in ("iptables", "ip6tables"):
        for rule in (["-D", "INPUT", "-j", "CRIU"], ["-D", "OUTPUT", "-j", "CRIU"],
                     ["-F", "CRIU"], ["-X", "CRIU"]):
            with contextlib.suppress(E.VzError):
                run_in_ns(pid, ("net",), [tool, "-w", *rule])
