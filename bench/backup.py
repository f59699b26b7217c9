"""Benchmark: vzbackup dump/restore vs tar|zstd (vzdump's pipeline), restic and borg, in one run.

A stopped CT (busybox template) gets a generated private area of --size-mb MB on top of the
template's files (kept, so the CT stays a real, bootable CT): ELF binaries and libraries
copied (some truncated) from the host's /usr/bin and /usr/lib/x86_64-linux-gnu, Python
sources and /usr/share/doc files from the host as text, ~1500 small generated configs in
etc/, two logs, symlinks, a hardlink pair, a few owners, modes and a user xattr, and a
database file of 8 KiB pages with structured records (var/lib/db/, --size-mb / 3). The tree
is deterministic for a seed on a given host (above ~800 MB the host's distinct binaries run
out and the tree stays smaller: the table shows the real size). No file is under tmp/,
var/tmp/ or var/run/ so vzdump's standard excludes (on by default in vzbackup) remove nothing.

Each round starts with empty repositories; before every measured command the source is
read once (tar into a pipe: caches warm, as on a node that was just used) and os.sync()
flushes what earlier steps left dirty. Nothing is timed twice in one round:

  full        vzbackup dump | tar -cf - . | zstd -3 -T0 (plain, and with vzdump's flags) |
              restic init + backup (repository version 2, compression auto) |
              borg init -e none + create --compression zstd,3
  1% change   rewrite scattered 64 KiB runs of db pages, 1% of the small text files in place
              and append to the syslog (about 1% of the bytes in all; undone after the round)
  incremental vzbackup dump vs restic backup (time, repository growth); tar|zstd full again
  unchanged   vzbackup dump vs restic backup with nothing changed
  restore     vzbackup restore SNAPSHOT NEWCTID | zstd -dc | tar -x | restic restore latest,
              in a rotating order; each result is compared with the source (path, type,
              mode, owner, size, sha256, symlink target, hardlink group, user xattrs); the
              run's first is preceded by an untimed copy of the tree onto a new file
              system (see ``Bench.first_fill``)
  floors      bench/floors.py after the full backups: the CPU of walking and reading the
              tree, of compressing each distinct chunk of vzbackup's full snapshot (alone,
              and on every CPU at once: the backup's floor) and of opening it again, and of
              cutting the files into chunks and naming each (a deduplicating backup's
              floor: that on top); with ``tar -x`` of an uncompressed tar (one more restore
              in the rotation, its system time) the CPU no backup or restore of this tree
              can skip. The floors over the CPUs bound what the speed targets can ask
              here: the table's last lines print that ceiling as a ratio to tar|zstd's time,
              also for a command that starts as vzbackup's do (the ``status`` start-up,
              serial, before the floor's work), and what each cheaper zstd level would save
              in CPU and cost in size on the same chunks

Wall time, CPU time and peak RSS (os.wait4 of the measured command; for a pipeline the largest
process) are taken per command; the table shows medians over --rounds (each round's seconds of
the full, 1% and restore rows follow it). Ratios: time rows are baseline/vzbackup (> 1:
vzbackup is faster), size and RSS rows are vzbackup/baseline (< 1: vzbackup is smaller). Every
restore goes onto a new journaled ext4 (a loop device, made before and removed after the timed
command): an empty file system, as a restore onto a node's /vz usually finds, and none of the
tools pays for what an earlier step deleted (ext4 without a journal, like this machine's root
file system, steps over every inode freed in the last minute at each file creation: several
seconds for a 10k-file restore right after another was deleted). Compare restores within one
run only. With --py-spy PATH, one more pass records the vzbackup full and incremental backup
and the restore with py-spy and prints the top functions. Results go to
bench/results/backup-TIMESTAMP.json. Run as root after scripts/setup.sh:

    .venv/bin/python bench/backup.py [--size-mb 300] [--rounds 3] [--py-spy /path/py-spy]
    .venv/bin/python bench/backup.py --dataset debian   # the Debian 12 template's rootfs
    .venv/bin/python bench/backup.py --rss-area-gb 10   # peak RSS backing up a 10 GiB area

The vzbackup code is byte-compiled first (as a package install does), so the timings
include process start as a user sees it, not compiling the sources.

Every target of issue 14 is printed as PASS/FAIL (S3 ones: bench/s3.py).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import platform
import random
import resource
import shlex
import shutil
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench/results"
TEMPLATE = Path("/var/lib/vzbackup/demo/vz/template/cache/busybox-1.0-x86_64.tar.zst")
DEBIAN_TEMPLATE = TEMPLATE.with_name("debian-12-x86_64.tar.zst")  # scripts/setup.sh builds it
MARKER = ".vzbench-backup"
RESTORE_FS = "restore-fs"  # under the prefix: where each restore's new file system is mounted
MB = 1024 * 1024
PAGE = 8192
# vzdump's tar flags for a CT (PVE's VZDump::LXC, less --totals/--one-file-system/warnings)
VZDUMP_TAR = [
    "--numeric-owner",
    "--acls",
    "--xattrs",
    "--xattrs-include=user.*",
    "--xattrs-include=security.capability",
    "--sparse",
]


def _words(text: str) -> list[str]:
    return text.split()


WORDS = _words(
    "alpha beta gamma delta server client cache proxy worker queue socket timeout retry "
    "listen address port user group enable disable path root home data log level debug info "
    "warning error file size limit memory buffer thread pool max min default local remote "
    "host name domain interface route gateway mask mirror update package source binary "
    "module driver kernel option value key secret token session cookie header request "
    "response status backup restore archive compress encrypt verify mount device volume "
    "network bridge firewall rule chain accept drop reject policy schedule daily weekly"
)
FIRST = _words("anna ben carla david elena frank greta hugo ines jonas karin lukas mia noah olga")
LAST = _words("meyer schmidt fischer weber wagner becker hoffmann koch richter klein wolf neumann")
CITIES = _words("berlin hamburg munich cologne frankfurt stuttgart leipzig dresden bremen essen")
SERVICES = _words("sshd cron nginx postgres systemd kernel dhclient rsyslogd app-worker")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- measuring ---------------------------------------------------------------------------------
@contextlib.contextmanager
def fresh_fs(mountpoint: Path, size: int) -> Iterator[Path]:
    """A new journaled ext4 of *size* bytes (sparse image, loop device) mounted at *mountpoint*
    while the block runs; unmounted and deleted after it, whatever happens."""
    image = mountpoint.with_name(mountpoint.name + ".img")
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        # inode tables and journal written now, not by a kernel thread during the restore
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True,
                       capture_output=True)
        try:
            yield mountpoint
        finally:
            if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)  # busy
    finally:
        image.unlink(missing_ok=True)


def restores_on_fresh_fs(prefix: Path) -> None:
    """CTs created under *prefix* from now on (the restored ones) live on the file system
    restore_fs mounts; the CTs already there keep their configs' paths."""
    vz_conf = prefix / "etc/vz/vz.conf"
    vz_conf.parent.mkdir(parents=True, exist_ok=True)
    with open(vz_conf, "a") as f:
        f.write(f'\nVE_PRIVATE="${{PREFIX}}/{RESTORE_FS}/private/$VEID"\n')


def restore_fs(prefix: Path, private: Path) -> contextlib.AbstractContextManager[Path]:
    """A new file system at PREFIX/RESTORE_FS for one restore of *private* (fresh_fs)."""
    return fresh_fs(prefix / RESTORE_FS, 2 * tree_size(private)["allocated"] + (512 << 20))


@dataclass
class Run:
    seconds: float
    rss_mb: float
    cpu_s: float  # user + system time of the command and its children
    out: str
    err: str
    sys_s: float = 0.0  # the system (kernel) part of cpu_s
    faults: int = 0  # page faults (minor and major) of the command and its children

    def record(self, **more: object) -> dict:
        """The numbers a round keeps of a timed command, and *more*."""
        return {"s": self.seconds, "rss_mb": self.rss_mb, "cpu_s": self.cpu_s,
                "sys_s": self.sys_s, "faults": self.faults, **more}


def measure(cmd: list[str] | str, *, env: dict | None = None, cwd: Path | None = None) -> Run:
    """Run *cmd* (a str runs in bash with pipefail); wall time and peak RSS via wait4."""
    argv = ["bash", "-c", "set -o pipefail; " + cmd] if isinstance(cmd, str) else cmd
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=fo, stderr=fe, env=env, cwd=cwd)
        _, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    if p.returncode:
        shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
        raise RuntimeError(f"{shown} failed (exit {p.returncode}):\n{err[-3000:]}{out[-2000:]}")
    return Run(dt, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime, out, err, ru.ru_stime,
               ru.ru_minflt + ru.ru_majflt)


def busy_cpu_s() -> float:
    """CPU seconds all CPUs of the machine spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def own_cpu_s() -> float:
    """CPU seconds of this process and of the children it has waited for."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def tree_size(path: Path) -> dict[str, int]:
    """Apparent bytes of files and allocated bytes of everything under *path*."""
    apparent = allocated = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            allocated += st.st_blocks * 512
            if stat.S_ISREG(st.st_mode):
                apparent += st.st_size
    return {"bytes": apparent, "allocated": allocated}


def manifest(root: Path) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, size, sha256, link target, hardlink group, user xattrs)."""
    out: dict[str, list] = {}
    inodes: dict[tuple[int, int], list[str]] = collections.defaultdict(list)

    def add(abs_p: str, rel: str) -> None:
        st = os.lstat(abs_p)
        m = st.st_mode
        kind = stat.S_IFMT(m)
        size, digest, link = 0, "", ""
        if stat.S_ISREG(m):
            size = st.st_size
            h = hashlib.sha256()
            with open(abs_p, "rb") as f:
                while block := f.read(MB):
                    h.update(block)
            digest = h.hexdigest()
            if st.st_nlink > 1:
                inodes[(st.st_dev, st.st_ino)].append(rel)
        elif stat.S_ISLNK(m):
            link = os.readlink(abs_p)
        xattrs = []
        with contextlib.suppress(OSError):
            for n in sorted(os.listxattr(abs_p, follow_symlinks=False)):
                if n.startswith("user."):
                    xattrs.append((n, os.getxattr(abs_p, n, follow_symlinks=False).hex()))
        out[rel] = [kind, stat.S_IMODE(m), st.st_uid, st.st_gid, size, digest, link, "",
                    tuple(xattrs)]
        if stat.S_ISDIR(m):
            with os.scandir(abs_p) as it:
                names = sorted(e.name for e in it)
            for n in names:
                add(os.path.join(abs_p, n), n if rel == "." else f"{rel}/{n}")

    add(str(root), ".")
    for group in inodes.values():
        for p in group:
            out[p][7] = min(group)
    return {k: tuple(v) for k, v in out.items()}


def compare(src: dict[str, tuple], got: dict[str, tuple]) -> dict:
    diffs = []
    for p in sorted(set(src) | set(got)):
        a, b = src.get(p), got.get(p)
        if a == b:
            continue
        if a is None or b is None:
            diffs.append(f"{p}: {'missing' if b is None else 'extra'}")
            continue
        names = ("type", "mode", "uid", "gid", "size", "sha256", "link", "hardlink", "xattrs")
        bad = [f"{n} {x!r}!={y!r}" for n, x, y in zip(names, a, b, strict=True) if x != y]
        diffs.append(f"{p}: {', '.join(bad)}")
    return {"ok": not diffs, "entries": len(src), "differences": len(diffs), "first": diffs[:8]}


# --- the data set ------------------------------------------------------------------------------
REC = struct.Struct("<QqIB3xq16s24s16s")  # id, created_us, user, status, amount, uuid, name, city
PAGE_HDR = struct.Struct("<4sIQHHI")  # magic, page no, lsn, records, free offset, crc32
PER_PAGE = (PAGE - PAGE_HDR.size) // REC.size


def db_page(rng: random.Random, no: int, lsn: int, first_id: int) -> bytes:
    n = rng.randint(PER_PAGE * 6 // 10, PER_PAGE)
    t = 1_700_000_000_000_000 + first_id * 1_500_000
    recs = []
    for i in range(n):
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}".ljust(24).encode()
        recs.append(
            REC.pack(first_id + i, t + i * rng.randint(1, 3_000_000), rng.randrange(1, 50_000),
                     rng.choice((1, 1, 1, 2, 3)), rng.randrange(-10**6, 10**8),
                     rng.randbytes(16), name, rng.choice(CITIES).ljust(16).encode())
        )
    body = b"".join(recs).ljust(PAGE - PAGE_HDR.size, b"\0")
    return PAGE_HDR.pack(b"PGDB", no, lsn, n, PAGE_HDR.size + n * REC.size,
                         zlib.crc32(body)) + body


def config_text(rng: random.Random, name: str, size: int) -> bytes:
    lines = [f"# {name}: generated configuration", "# see the manual for details", ""]
    n = 0
    while n < size:
        if rng.random() < 0.12:
            line = f"\n[{rng.choice(WORDS)}.{rng.choice(WORDS)}]"
        elif rng.random() < 0.15:
            line = "# " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        else:
            v = rng.choice((str(rng.randrange(0, 65536)), rng.choice(WORDS),
                            f"/{rng.choice(WORDS)}/{rng.choice(WORDS)}", "yes", "no",
                            f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"))
            line = f"{rng.choice(WORDS)}_{rng.choice(WORDS)} = {v}"
        lines.append(line)
        n += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def log_lines(rng: random.Random, nbytes: int, t0: int, host: str) -> bytes:
    out, n, t = [], 0, t0
    while n < nbytes:
        t += rng.randint(0, 4)
        svc = rng.choice(SERVICES)
        ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        msg = rng.choice((
            f"Accepted publickey for {rng.choice(FIRST)} from {ip} port "
            f"{rng.randrange(1024, 65535)} ssh2: ED25519 SHA256:{rng.randbytes(9).hex()}",
            f"GET /{rng.choice(WORDS)}/{rng.randrange(10**6)} HTTP/1.1 200 "
            f"{rng.randrange(100, 90000)} \"-\" \"curl/7.88.1\" {ip}",
            f"({rng.choice(WORDS)}) CMD (run-parts /etc/cron.{rng.choice(('hourly', 'daily'))})",
            f"checkpoint complete: wrote {rng.randrange(9999)} buffers "
            f"({rng.random() * 10:.1f}%); sync={rng.random():.3f} s",
            f"{rng.choice(WORDS)} {rng.choice(WORDS)}: {rng.choice(WORDS)} {rng.choice(WORDS)} "
            f"{rng.randrange(100000)}",
        ))
        line = f"{time.strftime('%b %d %H:%M:%S', time.gmtime(t))} {host} {svc}" \
               f"[{rng.randrange(100, 40000)}]: {msg}"
        out.append(line)
        n += len(line) + 1
    return ("\n".join(out) + "\n").encode()


def host_files(tops: list[Path], want, limit: int) -> list[Path]:
    """Regular files under *tops* accepted by *want*, sorted, without inode/content twins."""
    seen_ino, seen_head, out = set(), set(), []
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for n in sorted(filenames):
                p = Path(dirpath, n)
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or not want(p, st):
                    continue
                if (st.st_dev, st.st_ino) in seen_ino:
                    continue
                seen_ino.add((st.st_dev, st.st_ino))
                try:
                    with open(p, "rb") as f:
                        head = (st.st_size, hashlib.sha256(f.read(65536)).digest())
                except OSError:
                    continue
                if head in seen_head:
                    continue
                seen_head.add(head)
                out.append(p)
                if len(out) >= limit:
                    return out
    return out


class DataSet:
    """Generates the CT's files, applies the 1% change and undoes it."""

    def __init__(self, private: Path, size_mb: int, seed: int) -> None:
        self.private = private
        self.size = size_mb * MB
        self.seed = seed
        self.small_text: list[str] = []  # rewritable small text files (rel paths)
        self.db = "var/lib/db/base/16384/2619"
        self.syslog = "var/log/syslog"
        self.db_pages = 0
        self.undo: list[tuple] = []
        self.counts = collections.Counter()
        self.mtime = 1_700_000_000

    def _write(self, rel: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
               text: bool = False) -> bool:
        p = self.private / rel
        if os.path.lexists(p):  # a template file: keep it
            return False
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chown(p, uid, gid)
        os.chmod(p, mode)
        t = self.mtime + (zlib.crc32(rel.encode()) % 10_000_000)
        os.utime(p, (t, t))
        self.counts["files"] += 1
        self.counts["bytes"] += len(data)
        if text and len(data) < 65536:
            self.small_text.append(rel)
        return True

    def _copy(self, src: Path, rel: str, nbytes: int, mode: int, text: bool = False) -> int:
        with open(src, "rb") as f:
            data = f.read(nbytes)
        return len(data) if self._write(rel, data, mode, text=text) else 0

    def generate(self) -> dict:
        rng = random.Random(self.seed)
        t0 = time.perf_counter()
        self._etc(rng)
        self._binaries(rng, int(self.size * 0.46))
        self._texts(rng, int(self.size * 0.12), int(self.size * 0.05))
        self._database(rng, self.size // 3 // PAGE * PAGE)
        log_bytes = int(self.size * 0.03)
        self._write(self.syslog, log_lines(rng, log_bytes * 2 // 3, self.mtime, "ct"), 0o640,
                    0, 4)
        self._write("var/log/nginx/access.log", log_lines(rng, log_bytes // 3, self.mtime, "ct"),
                    0o640, 33, 4)
        self._specials(rng)
        self.small_text.sort()
        return {"generate_seconds": round(time.perf_counter() - t0, 2), **self.counts,
                "small_text_files": len(self.small_text)}

    def _etc(self, rng: random.Random) -> None:
        """etc/: many small configs (~1500 for 300 MB; at least 200), ssh host keys."""
        n_etc = max(200, self.size // MB * 5)
        pkgs = sorted({f"{rng.choice(WORDS)}-{rng.choice(WORDS)}" for _ in range(150)})
        for i in range(n_etc):
            pkg = pkgs[i % len(pkgs)]
            size = int(min(16384, max(60, rng.lognormvariate(6.8, 1.0))))
            rel = f"etc/{pkg}/{rng.choice(WORDS)}-{i}.conf"
            mode = 0o600 if rng.random() < 0.05 else 0o644
            self._write(rel, config_text(rng, rel, size), mode, text=True)
        for i in range(8):
            self._write(f"etc/ssh/ssh_host_{i}_key", rng.randbytes(400).hex().encode(), 0o600)

    def _binaries(self, rng: random.Random, budget: int) -> None:
        """Binaries and libraries: real ELF bytes from the host, some truncated, with
        ldconfig-like symlinks."""
        libs = host_files([Path("/usr/lib/x86_64-linux-gnu")],
                          lambda p, st: ".so" in p.name and st.st_size > 4096, 100_000)
        bins = host_files([Path("/usr/bin")], lambda p, st: st.st_size > 4096, 100_000)
        pool = [(p, "usr/lib/x86_64-linux-gnu/" + str(p.relative_to("/usr/lib/x86_64-linux-gnu")))
                for p in libs] + [(p, f"usr/bin/{p.name}") for p in bins]
        rng.shuffle(pool)
        used, copied = 0, []
        for src, rel in pool:
            if used >= budget:
                break
            size = src.stat().st_size
            n = size if size <= 6 * MB else rng.randint(2 * MB, 6 * MB)
            n = min(n, budget - used + 4096)
            mode = 0o755 if rel.startswith("usr/bin/") or rng.random() < 0.5 else 0o644
            got = self._copy(src, rel, n, mode)
            if got:
                used += got
                copied.append(rel)
        for rel in copied[::4]:  # libfoo.so.1.2 <- libfoo.so.1, like ldconfig's links
            if ".so." in rel:
                link = rel[: rel.rindex(".so.") + 3]
                if not os.path.lexists(self.private / link):
                    os.symlink(os.path.basename(rel), self.private / link)
                    self.counts["symlinks"] += 1

    def _texts(self, rng: random.Random, budget_py: int, budget_doc: int) -> None:
        """Text: Python sources and package docs from the host."""
        pylib = Path(sys.base_prefix) / f"lib/python{sys.version_info[0]}.{sys.version_info[1]}"
        srcs = host_files([pylib], lambda p, st: p.suffix == ".py", 100_000)
        rng.shuffle(srcs)
        used = 0
        for src in srcs:
            if used >= budget_py:
                break
            used += self._copy(src, f"usr/lib/python3/dist-packages/{src.relative_to(pylib)}",
                               budget_py, 0o644, text=True)
        docs = host_files([Path("/usr/share/doc")], lambda p, st: True, 100_000)
        rng.shuffle(docs)
        used = 0
        for src in docs:
            if used >= budget_doc:
                break
            used += self._copy(src, f"usr/share/doc/{src.relative_to('/usr/share/doc')}",
                               budget_doc, 0o644, text=not src.name.endswith(".gz"))

    def _database(self, rng: random.Random, db_bytes: int) -> None:
        """The database: fixed-size pages of records, owned by the db user."""
        db = self.private / self.db
        db.parent.mkdir(parents=True, exist_ok=True)
        self.db_pages = db_bytes // PAGE
        with open(db, "wb") as f:
            rid = 1
            for no in range(self.db_pages):
                page = db_page(rng, no, 1000 + no, rid)
                rid += PER_PAGE
                f.write(page)
        self.counts["files"] += 1
        self.counts["bytes"] += db_bytes
        for d in ("var/lib/db", "var/lib/db/base", "var/lib/db/base/16384"):
            os.chown(self.private / d, 105, 110)
            os.chmod(self.private / d, 0o700)
        os.chown(db, 105, 110)
        os.chmod(db, 0o600)
        self._write("var/lib/db/PG_VERSION", b"15\n", 0o600, 105, 110)

    def _specials(self, rng: random.Random) -> None:
        """A home, symlinks, a hardlink pair, a setuid binary, an xattr."""
        for i in range(20):
            self._write(f"home/anna/notes/{i:02d}.txt", config_text(rng, f"note {i}", 2000),
                        0o640, 1000, 1000, text=True)
        os.chown(self.private / "home/anna", 1000, 1000)
        os.chown(self.private / "home/anna/notes", 1000, 1000)
        tool = self.private / "usr/libexec/vzbench/tool"
        if self._write(str(tool.relative_to(self.private)), rng.randbytes(300_000), 0o755):
            os.link(tool, tool.with_name("tool-hardlink"))
            self.counts["hardlinks"] += 1
        for link, target in (("lib", "usr/lib"), ("lib64", "usr/lib/x86_64-linux-gnu"),
                             ("etc/localtime", "/usr/share/zoneinfo/Etc/UTC"),
                             ("var/lib/db/current", "base/16384"),
                             ("usr/libexec/vzbench/tool-link", "tool")):
            if not os.path.lexists(self.private / link):
                os.symlink(target, self.private / link)
                self.counts["symlinks"] += 1
        if self._write("usr/bin/sudo-like", rng.randbytes(200_000), 0o4755):
            os.chmod(self.private / "usr/bin/sudo-like", 0o4755)
        with contextlib.suppress(OSError):
            os.setxattr(self.private / "etc/ssh/ssh_host_0_key", "user.origin", b"bench")

    def change(self) -> dict:
        """Change ~1% of the bytes: db page runs, 1% of the small text files, the syslog."""
        assert not self.undo
        rng = random.Random(self.seed + 1)
        target = self.size // 100
        changed = collections.Counter()
        for rel in rng.sample(self.small_text, max(1, len(self.small_text) // 100)):
            p = self.private / rel
            old = p.read_bytes()
            lines = old.split(b"\n")
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(lines))
                lines[i] = (f"# changed {rng.choice(WORDS)} = {rng.randrange(10**9)}").encode()
            new = b"\n".join(lines)
            with open(p, "r+b") as f:
                f.truncate(0)
                f.write(new)
            self.undo.append(("file", p, old))
            changed["small_files"] += 1
            changed["small_bytes"] += len(new)
        log_p = self.private / self.syslog
        old_len = log_p.stat().st_size
        extra = log_lines(rng, target // 20, self.mtime + 10**8, "ct")
        with open(log_p, "ab") as f:
            f.write(extra)
        self.undo.append(("truncate", log_p, old_len))
        changed["log_bytes"] += len(extra)
        run = 8  # pages: 64 KiB, a typical extent
        want = max(run, (target - changed["small_bytes"] - changed["log_bytes"]) // PAGE)
        starts = sorted(rng.sample(range(self.db_pages // run), max(1, want // run)))
        fd = os.open(self.private / self.db, os.O_RDWR)
        try:
            for s in starts:
                off = s * run * PAGE
                old = os.pread(fd, run * PAGE, off)
                new = b"".join(db_page(rng, s * run + k, 10**9 + s * run + k,
                                       10**8 + (s * run + k) * PER_PAGE) for k in range(run))
                os.pwrite(fd, new, off)
                self.undo.append(("pages", self.private / self.db, (off, old)))
                changed["db_pages"] += run
                changed["db_bytes"] += len(new)
        finally:
            os.close(fd)
        changed["total_bytes"] = changed["small_bytes"] + changed["log_bytes"] + changed[
            "db_bytes"]
        return dict(changed)

    def revert(self) -> None:
        for kind, p, what in reversed(self.undo):
            if kind == "file":
                with open(p, "r+b") as f:
                    f.truncate(0)
                    f.write(what)
            elif kind == "truncate":
                os.truncate(p, what)
            else:
                off, old = what
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.pwrite(fd, old, off)
                finally:
                    os.close(fd)
        self.undo.clear()


# --- the benchmark -----------------------------------------------------------------------------
class RootfsChange:
    """A real root filesystem (the Debian 12 template) as the data set: nothing generated;
    the 1% change appends a line to every 100th regular file (undone by revert)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.saved: list[tuple[Path, bytes, int, int]] = []

    def _files(self) -> list[Path]:
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            for f in sorted(files):
                p = Path(dirpath) / f
                if p.is_file() and not p.is_symlink():
                    out.append(p)
        return sorted(out)

    def generate(self) -> dict:
        return {"files": len(self._files()), "dataset": "debian-12 root filesystem"}

    def change(self) -> dict:
        picked = self._files()[::100]
        for p in picked:
            st = p.stat()
            self.saved.append((p, p.read_bytes(), st.st_atime_ns, st.st_mtime_ns))
            with open(p, "ab") as f:
                f.write(b"# changed by bench/backup.py\n")
        return {"files_changed": len(picked)}

    def revert(self) -> None:
        for p, data, at, mt in self.saved:
            p.write_bytes(data)
            os.utime(p, ns=(at, mt))
        self.saved = []


class BigArea:
    """A large private area for the peak-RSS target, generated on the fly (--rss-area-gb):
    a quarter incompressible data in 64-256 MiB files, a tenth compressible logs, the rest
    sparse 1 GiB files with a few data islands, and 20k small files. Apparent size *gb* GiB."""

    def __init__(self, root: Path, gb: int, seed: int) -> None:
        self.root = root
        self.size = gb << 30
        self.seed = seed

    def generate(self) -> dict:
        rng = random.Random(self.seed)
        t0 = time.perf_counter()
        counts = collections.Counter()
        big = self.root / "srv/data"
        big.mkdir(parents=True, exist_ok=True)
        left = self.size // 4
        i = 0
        while left > 0:  # incompressible, unique (no dedup helps)
            n = min(left, rng.randint(64, 256) * MB)
            with open(big / f"blob{i:03d}.bin", "wb") as f:
                for _ in range(0, n, 16 * MB):
                    f.write(os.urandom(16 * MB))
            left -= n
            i += 1
            counts["random_bytes"] += n
        logs = self.root / "var/log/app"
        logs.mkdir(parents=True, exist_ok=True)
        left = self.size // 10
        i = 0
        text = log_lines(rng, 4 * MB, 1_700_000_000, "ct")
        while left > 0:  # compressible text, every 64 KiB different (a numbered line)
            n = min(left, 128 * MB)
            with open(logs / f"app{i:02d}.log", "wb") as f:
                for k in range(0, n, 64 * 1024):
                    at = (k * 7919) % (len(text) - 64 * 1024)
                    f.write(f"{i}:{k}\n".encode() + text[at : at + 64 * 1024 - 24])
            left -= n
            i += 1
            counts["log_bytes"] += n
        sparse = self.root / "var/lib/images"
        sparse.mkdir(parents=True, exist_ok=True)
        left = self.size - counts["random_bytes"] - counts["log_bytes"]
        i = 0
        while left > 0:  # sparse: 1 GiB apparent, 4 islands of 1 MiB
            n = min(left, 1 << 30)
            with open(sparse / f"disk{i:02d}.img", "wb") as f:
                for k in range(4):
                    f.seek(k * (n // 4))
                    f.write(os.urandom(MB))
                f.truncate(n)
            left -= n
            i += 1
            counts["sparse_apparent"] += n
        small = self.root / "usr/share/small"
        for k in range(20_000):
            d = small / f"d{k // 500:02d}"
            if k % 500 == 0:
                d.mkdir(parents=True, exist_ok=True)
            (d / f"f{k:05d}.conf").write_bytes(config_text(rng, f"f{k}", rng.randint(200, 8000)))
        counts["small_files"] = 20_000
        return {"generate_seconds": round(time.perf_counter() - t0, 1), **counts}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = Path(args.prefix).absolute()
        self.ctid, self.rctid = args.ctid, args.restore_ctid
        self.private = self.prefix / "vz/private" / str(self.ctid)
        self.backupdir = self.prefix / "vz/backup"
        self.cachedir = self.prefix / "var/cache/vzbackup"
        self.work = self.prefix / "bench"
        self.restic_repo = self.work / "restic-repo"
        self.restic_env = {
            **os.environ,
            "RESTIC_PASSWORD": "vzbench",
            "RESTIC_REPOSITORY": str(self.restic_repo),
            "RESTIC_CACHE_DIR": str(self.work / "restic-cache"),
        }
        exe = Path(sys.executable).parent / "vzbackup"
        self.vz_cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vzbackup.cli"]
        self.borg_repo = self.work / "borg-repo"
        self.borg_env = {**os.environ, "BORG_REPO": str(self.borg_repo),
                         "BORG_BASE_DIR": str(self.work / "borg-home"),
                         "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
        self.borg_n = 0
        self.template = DEBIAN_TEMPLATE if args.dataset == "debian" else TEMPLATE
        self.data = (RootfsChange(self.private) if args.dataset == "debian"
                     else DataSet(self.private, args.size_mb, args.seed))
        if args.rss_area_gb:
            self.template = TEMPLATE
            self.data = BigArea(self.private, args.rss_area_gb, args.seed)

    # --- helpers
    def vz(self, *args: str, wrap: list[str] | None = None) -> Run:
        return measure([*(wrap or []), *self.vz_cmd, "--prefix", str(self.prefix), *args])

    def restic(self, *args: str) -> Run:
        return measure(["restic", *args], env=self.restic_env)

    def warm(self) -> None:
        """Read the source once, and flush what earlier steps left dirty (not timed)."""
        measure(f"tar -C {shlex.quote(str(self.private))} -cf - . | cat >/dev/null")
        os.sync()

    def first_fill(self) -> None:
        """Copy the tree onto a new file system once, not timed, before the run's first
        restore. The first file system a run fills can cost the kernel far more (on this VM,
        whose balloon driver hands freed memory back to the host, new page cache cost up to
        10x the system time): a Debian restore that came first took 2.24 s of system time
        against 0.42-0.46 s (85k page faults against 60-68k), no restore after it did; the
        rotation had vzbackup's restore first in round 1 (3 of 12 runs: 1.4-1.8 s instead of
        0.7-0.8 s; none in 5 runs with this)."""
        with restore_fs(self.prefix, self.private) as fs:
            dest = fs / "first-fill"
            dest.mkdir()
            r = measure(f"tar -C {shlex.quote(str(self.private))} -cf - . | "
                        f"tar -C {shlex.quote(str(dest))} -xpf -")
        log(f"first fill of a file system (not timed): {r.seconds:.2f} s, "
            f"system time {r.sys_s:.2f} s")

    def setup(self) -> dict:
        if self.prefix.exists():
            if not (self.prefix / MARKER).exists():
                raise SystemExit(f"{self.prefix} exists and is not a bench prefix; not touching it")
            log(f"removing the leftovers of an earlier run in {self.prefix}")
            self.cleanup()
        cache = self.prefix / "vz/template/cache"
        cache.mkdir(parents=True)
        (self.prefix / MARKER).touch()
        if not self.template.exists():
            raise SystemExit(f"{self.template} is missing: run scripts/setup.sh first")
        shutil.copy(self.template, cache / self.template.name)
        self.work.mkdir()
        log(f"creating CT {self.ctid} under {self.prefix}")
        self.vz("create", str(self.ctid), "--ostemplate",
                self.template.name.removesuffix(".tar.zst"))
        restores_on_fresh_fs(self.prefix)
        what = (f"{self.args.rss_area_gb} GiB" if self.args.rss_area_gb
                else "the data set" if self.args.dataset == "debian" else f"{self.args.size_mb} MB")
        log(f"generating {what} into {self.private}")
        info = self.data.generate()
        info.update(tree_size(self.private))
        info["entries"] = 1 + sum(len(d) + len(f) for _, d, f in os.walk(self.private))
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "vzbackup"),
                        str(ROOT / "storage"), str(ROOT / "migrate"), str(ROOT / "scheduler")],
                       check=True, capture_output=True)
        # what any vzbackup command costs before it does anything (interpreter, imports)
        info["cli_startup_s"] = statistics.median(
            self.vz("status", str(self.ctid)).seconds for _ in range(5))
        log(f"data set: {info}")
        return info

    def reset_repos(self) -> None:
        for p in (self.backupdir, self.cachedir, self.restic_repo, self.work / "restic-cache",
                  self.borg_repo, self.work / "borg-home"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.work.glob("*.tar.zst"):
            p.unlink()

    def vz_dump(self, wrap: list[str] | None = None) -> dict:
        self.warm()
        extra = shlex.split(self.args.dump_args)
        r = self.vz("dump", str(self.ctid), "--json", *extra, wrap=wrap)
        out = "\n".join(ln for ln in r.out.splitlines() if not ln.startswith("py-spy>"))
        res = json.loads(out)["results"][0]
        if not res.get("ok"):
            raise RuntimeError(f"vzbackup dump failed: {res}")
        return r.record(snapshot=res["snapshot"], repo=tree_size(self.backupdir),
                        stats=res.get("stats", {}))

    def tar(self, name: str, flags: list[str]) -> dict:
        self.warm()
        out = self.work / name
        out.unlink(missing_ok=True)
        r = measure(f"tar -C {shlex.quote(str(self.private))} {shlex.join(flags)} -cf - . | "
                    f"zstd -q -3 -T0 -o {shlex.quote(str(out))}")
        return r.record(size=out.stat().st_size)

    def restic_backup(self) -> dict:
        self.warm()
        r = self.restic("backup", "--json", "--compression", "auto", "--host", "vzbench",
                       str(self.private))
        summary = {}
        for line in r.out.splitlines():
            with contextlib.suppress(ValueError):
                d = json.loads(line)
                if d.get("message_type") == "summary":
                    summary = d
        return r.record(repo=tree_size(self.restic_repo), data_added=summary.get("data_added"),
                        snapshot=summary.get("snapshot_id"))

    def borg(self, *args: str) -> Run:
        return measure(["borg", *args], env=self.borg_env)

    def borg_backup(self) -> dict:
        self.warm()
        self.borg_n += 1
        r = self.borg("create", "--compression", "zstd,3", f"::b{self.borg_n}",
                      str(self.private))
        return r.record(repo=tree_size(self.borg_repo))

    # --- one round
    def round(self, n: int) -> dict:
        rec: dict = {"round": n}
        t0, busy0, own0 = time.monotonic(), busy_cpu_s(), own_cpu_s()
        if n:
            self.data.revert()
        self.reset_repos()
        log(f"round {n + 1}: full backups")
        rec["vz_full"] = self.vz_dump()
        rec["tar_full"] = self.tar("full.tar.zst", [])
        rec["tar_full_vzdump"] = self.tar("full-vzdump.tar.zst", VZDUMP_TAR)
        rec["floor"] = self.floors(rec["vz_full"]["snapshot"])
        rec["restic_init_s"] = self.restic("init", "--repository-version", "2").seconds
        rec["restic_full"] = self.restic_backup()
        self.borg("init", "--encryption", "none")
        rec["borg_full"] = self.borg_backup()
        rec["change"] = self.data.change()
        log(f"round {n + 1}: changed {rec['change']}; incremental backups")
        rec["vz_incr"] = self.vz_dump()
        rec["restic_incr"] = self.restic_backup()
        rec["borg_incr"] = self.borg_backup()
        rec["tar_full2"] = self.tar("full2.tar.zst", [])
        rec["tar_full2_vzdump"] = self.tar("full2-vzdump.tar.zst", VZDUMP_TAR)
        log(f"round {n + 1}: unchanged backups")
        rec["vz_unchanged"] = self.vz_dump()
        rec["restic_unchanged"] = self.restic_backup()
        rec["borg_unchanged"] = self.borg_backup()
        log(f"round {n + 1}: restores")
        if n == 0:
            self.first_fill()
        src = manifest(self.private)
        restores = [
            ("vz_restore", lambda: self.vz_restore(rec["vz_unchanged"]["snapshot"], src)),
            ("tar_restore", lambda: self.tar_restore(self.work / "full2-vzdump.tar.zst", src)),
            ("restic_restore", lambda: self.restic_restore(src)),
            ("files_restore", lambda: self.files_restore(src)),
        ]
        for key, fn in restores[n % 4:] + restores[: n % 4]:  # a different order each round
            self.warm()
            rec[key] = fn()
        # CPU used by anything but this benchmark (other jobs: noisy timings)
        foreign = (busy_cpu_s() - busy0) - (own_cpu_s() - own0)
        rec["foreign_cpu_share"] = max(0.0, foreign) / ((time.monotonic() - t0) * os.cpu_count())
        return rec

    def vz_restore(self, snapshot: str, src: dict, wrap: list[str] | None = None) -> dict:
        with restore_fs(self.prefix, self.private) as fs:
            r = self.vz("restore", snapshot, str(self.rctid), "--json", wrap=wrap)
            got = fs / "private" / str(self.rctid)
            res = r.record(verify=compare(src, manifest(got)))
            self.vz("destroy", str(self.rctid))
        return res

    def tar_restore(self, archive: Path, src: dict) -> dict:
        with restore_fs(self.prefix, self.private) as fs:
            dest = fs / "restore-tar"
            dest.mkdir()
            r = measure(f"zstd -q -dc {shlex.quote(str(archive))} | "
                        f"tar -C {shlex.quote(str(dest))} -xpf - {shlex.join(VZDUMP_TAR)}")
            res = r.record(verify=compare(src, manifest(dest)))
        return res

    def floors(self, snapshot: str) -> dict:
        """The CPU a backup and a restore of the tree can't avoid (bench/floors.py), measured
        right after tar|zstd's full backup."""
        self.warm()
        r = measure([sys.executable, str(ROOT / "bench/floors.py"), str(self.backupdir),
                     str(self.private), snapshot])
        return json.loads(r.out)

    def files_restore(self, src: dict) -> dict:
        """``tar -x`` of an uncompressed tar of the tree (unpacked beforehand, not timed):
        creating and writing the files alone, the part of a restore's floor floors.py
        leaves to the kernel (its system time)."""
        plain = self.work / "tree.tar"
        measure(f"zstd -q -dc {shlex.quote(str(self.work / 'full2-vzdump.tar.zst'))} "
                f"> {shlex.quote(str(plain))}")
        os.sync()
        try:
            with restore_fs(self.prefix, self.private) as fs:
                dest = fs / "restore-files"
                dest.mkdir()
                r = measure(["tar", "-C", str(dest), "-xpf", str(plain), *VZDUMP_TAR])
                res = r.record(verify=compare(src, manifest(dest)))
        finally:
            plain.unlink(missing_ok=True)
        return res

    def restic_restore(self, src: dict) -> dict:
        with restore_fs(self.prefix, self.private) as fs:
            dest = fs / "restore-restic"
            r = self.restic("restore", "latest", "--host", "vzbench", "--target", str(dest))
            got = dest / self.private.relative_to("/")
            res = r.record(verify=compare(src, manifest(got)))
        return res

    # --- the peak-RSS pass (--rss-area-gb)
    def rss_area(self) -> dict:
        """Full and unchanged backups of the big area: peak RSS of each (wait4's maxrss)."""
        out = {}
        for name in ("full", "unchanged"):
            log(f"{name} backup of the {self.args.rss_area_gb} GiB area")
            out[name] = self.vz_dump()
        out["peak_rss_mb"] = max(out[k]["rss_mb"] for k in ("full", "unchanged"))
        out["target_peak_rss"] = out["peak_rss_mb"] <= 300
        return out

    # --- profiling pass
    def profile(self, py_spy: str, stamp: str) -> dict:
        self.data.revert()
        self.reset_repos()
        out: dict = {}
        snap = ""
        for phase in ("full", "incremental", "restore"):
            raw = RESULTS / f"backup-{stamp}-profile-{phase}.txt"
            wrap = [py_spy, "record", "--rate", "250", "--format", "raw", "--subprocesses",
                    "-o", str(raw), "--"]
            log(f"profiling the vzbackup {phase} with py-spy")
            if phase == "incremental":
                self.data.change()
            if phase == "restore":
                r = self.vz_restore(snap, manifest(self.private), wrap=wrap)
            else:
                r = self.vz_dump(wrap=wrap)
                snap = r["snapshot"]
            out[phase] = {"s_under_py_spy": r["s"], "raw": str(raw), **summarise_profile(raw)}
        return out

    def cleanup(self) -> None:
        for ctid in (self.rctid, self.ctid):
            with contextlib.suppress(Exception):
                subprocess.run([*self.vz_cmd, "--prefix", str(self.prefix), "destroy",
                                str(ctid)], capture_output=True, timeout=120, check=False)
        with open("/proc/self/mountinfo") as f:
            mounts = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(self.prefix))]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, check=False)
        shutil.rmtree(self.prefix, ignore_errors=True)


def summarise_profile(raw: Path, top: int = 15) -> dict:
    """Top functions by own samples and by inclusive samples from py-spy's raw output."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") and ":" in f else f
                  for f in stack.split(";")]
        frames = [f.replace(str(ROOT) + "/", "").replace(sys.base_prefix + "/lib/", "")
                  for f in frames]
        own[frames[-1]] += n
        for f in set(frames):  # inclusive: the project's own functions only
            if f.split(" (", 1)[-1].startswith(("vzbackup/", "storage/")) and \
                    not f.startswith(("<module>", "main ", "run_guarded ")):
                incl[f] += n
    pct = (lambda c: [(f, round(100 * v / total, 1)) for f, v in c.most_common(top)]) if total \
        else (lambda c: [])
    return {"samples": total, "self": pct(own), "inclusive_project": pct(incl)}


# --- report ------------------------------------------------------------------------------------
def summarise(rounds: list[dict], startup_s: float) -> dict:
    def med(*keys: str) -> float:
        vals = []
        for r in rounds:
            v = r
            for k in keys:
                v = v[k]
            vals.append(v)
        return statistics.median(vals)

    s = {
        "vz_full_s": med("vz_full", "s"),
        "vz_full_repo": med("vz_full", "repo", "bytes"),
        "tar_full_s": med("tar_full", "s"),
        "tar_full_size": med("tar_full", "size"),
        "tar_vzdump_s": med("tar_full_vzdump", "s"),
        "tar_vzdump_size": med("tar_full_vzdump", "size"),
        "restic_full_s": med("restic_full", "s"),
        "restic_full_repo": med("restic_full", "repo", "bytes"),
        "vz_incr_s": med("vz_incr", "s"),
        "vz_incr_repo": med("vz_incr", "repo", "bytes"),
        "restic_incr_s": med("restic_incr", "s"),
        "restic_incr_repo": med("restic_incr", "repo", "bytes"),
        "tar_full2_s": med("tar_full2", "s"),
        "tar_full2_size": med("tar_full2", "size"),
        "vz_unch_s": med("vz_unchanged", "s"),
        "vz_unch_own_s": med("vz_unchanged", "stats", "duration"),
        "vz_unch_repo": med("vz_unchanged", "repo", "bytes"),
        "restic_unch_s": med("restic_unchanged", "s"),
        "restic_unch_repo": med("restic_unchanged", "repo", "bytes"),
        "vz_restore_s": med("vz_restore", "s"),
        "tar_restore_s": med("tar_restore", "s"),
        "restic_restore_s": med("restic_restore", "s"),
        "borg_full_s": med("borg_full", "s"),
        "borg_full_repo": med("borg_full", "repo", "bytes"),
        "borg_incr_s": med("borg_incr", "s"),
        "borg_incr_repo": med("borg_incr", "repo", "bytes"),
        "borg_unch_s": med("borg_unchanged", "s"),
    }
    for k in ("vz_full", "tar_full", "restic_full", "vz_incr", "restic_incr", "vz_unchanged",
              "restic_unchanged", "vz_restore", "tar_restore", "restic_restore"):
        s[f"{k}_cpu_s"] = med(k, "cpu_s")
    for k in ("vz_full", "vz_incr", "vz_unchanged", "vz_restore", "restic_full", "restic_incr",
              "restic_unchanged", "restic_restore", "tar_full", "tar_full_vzdump",
              "tar_restore"):
        s[f"{k}_rss_mb"] = max(r[k]["rss_mb"] for r in rounds)
    s["max_foreign_cpu_share"] = max(r["foreign_cpu_share"] for r in rounds)
    s["floor"] = summarise_floors(rounds, startup_s)
    s["vz_incr_growth"] = s["vz_incr_repo"] - s["vz_full_repo"]
    s["restic_incr_growth"] = s["restic_incr_repo"] - s["restic_full_repo"]
    s["borg_incr_growth"] = s["borg_incr_repo"] - s["borg_full_repo"]
    s["vz_unch_growth"] = s["vz_unch_repo"] - s["vz_incr_repo"]
    s["restic_unch_growth"] = s["restic_unch_repo"] - s["restic_incr_repo"]
    s["vz_peak_rss_mb"] = max(s[f"{k}_rss_mb"] for k in ("vz_full", "vz_incr", "vz_unchanged",
                                                          "vz_restore"))
    s["verified"] = {t: all(r[f"{t}_restore"]["verify"]["ok"] for r in rounds)
                     for t in ("vz", "tar", "restic", "files")}
    s["targets"] = {  # issue 14
        "full_speed_vs_tar": s["tar_full_s"] / s["vz_full_s"] >= 1.2,
        "full_size_vs_tar": s["vz_full_repo"] / s["tar_full_size"] <= 1.02,
        "incr_speed_vs_restic": s["restic_incr_s"] / s["vz_incr_s"] >= 2.0,
        "incr_speed_vs_borg": s["borg_incr_s"] / s["vz_incr_s"] >= 2.0,
        "incr_growth_vs_restic": s["vz_incr_growth"] <= s["restic_incr_growth"],
        "incr_growth_vs_borg": s["vz_incr_growth"] <= s["borg_incr_growth"],
        "unchanged_wall": s["vz_unch_s"] <= 0.15,
        "restore_vs_tar": s["tar_restore_s"] / s["vz_restore_s"] >= 1.2,
        "restore_identical": s["verified"]["vz"],
        "peak_rss": s["vz_peak_rss_mb"] <= 300,
    }
    return s


def summarise_floors(rounds: list[dict], startup_s: float) -> dict:
    """Medians of the floors (bench/floors.py) and of what they allow per round: the
    fastest any tool doing the same work could be on this machine's CPUs (all busy, nothing
    but the floor's work), as a ratio to tar|zstd's time, the issue's measure; and the same
    for a command that first starts as vzbackup does (*startup_s*, serial: a Python
    interpreter and the CLI's imports)."""
    cpus = len(os.sched_getaffinity(0))
    per_round = []
    for r in rounds:
        f = r["floor"]
        full = f["walk_read"] + f["compress_all_cpus"]  # (compress: one thread alone)
        dedup = full + f["cut"] + f["name"]
        restore = f["decompress"] + r["files_restore"]["sys_s"]
        per_round.append({
            "walk_read": f["walk_read"], "compress": f["compress"],
            "compress_all_cpus": f["compress_all_cpus"], "cut": f["cut"], "name": f["name"],
            "decompress": f["decompress"], "files": r["files_restore"]["sys_s"],
            "full": full, "dedup": dedup, "restore": restore,
            "full_ceiling": cpus * r["tar_full"]["s"] / full,
            "dedup_ceiling": cpus * r["tar_full"]["s"] / dedup,
            "restore_ceiling": cpus * r["tar_restore"]["s"] / restore,
            "dedup_ceiling_started": r["tar_full"]["s"] / (startup_s + dedup / cpus),
            "restore_ceiling_started": r["tar_restore"]["s"] / (startup_s + restore / cpus),
            "full_over_floor": r["vz_full"]["cpu_s"] / full,
            "restore_over_floor": r["vz_restore"]["cpu_s"] / restore,
            **level_ratios(f["levels"]),
        })
    out = {k: statistics.median(x[k] for x in per_round) for k in per_round[0]}
    out["cpus"], out["startup_s"] = cpus, startup_s
    return out


def level_ratios(levels: dict[str, dict]) -> dict[str, float]:
    """Per zstd level below the repository's (floors.py's ``levels``): its compression CPU
    and its compressed bytes, each as a ratio to the repository's level."""
    top = levels[max(levels, key=int)]
    out = {}
    for level, got in levels.items():
        if got is not top:
            out[f"level{level}_cpu"] = got["cpu"] / top["cpu"]
            out[f"level{level}_bytes"] = got["bytes"] / top["bytes"]
    return out


def print_floors(f: dict) -> None:
    print(f"floors (bench/floors.py: CPU no tool can skip; on {f['cpus']} CPUs at best "
          "floor / CPUs of wall time):")
    print(f"  full backup  {f['full']:5.2f} CPU s = walk and read {f['walk_read']:.2f} + zstd "
          f"of each chunk on {f['cpus']} threads at once {f['compress_all_cpus']:.2f} (alone "
          f"{f['compress']:.2f}): at most {f['full_ceiling']:.2f}x tar|zstd's speed "
          f"(target 1.2x); vzbackup used {f['full_over_floor']:.2f}x the floor")
    print(f"  deduplicating {f['dedup']:4.2f} CPU s = that + cutting the files into chunks "
          f"(FastCDC) {f['cut']:.2f} + naming each (BLAKE3) {f['name']:.2f}: at most "
          f"{f['dedup_ceiling']:.2f}x tar|zstd's speed for any backup that deduplicates")
    cheaper = [f"zstd -{n} {f[f'level{n}_cpu']:.2f}x the CPU for {f[f'level{n}_bytes']:.3f}x "
               "the bytes" for n in range(1, 23) if f"level{n}_cpu" in f]  # (zstd: 1-22)
    if cheaper:
        print(f"  a cheaper compressor (the same chunks, one thread): {', '.join(cheaper)} "
              "(the size target allows 1.02x tar|zstd's bytes)")
    print(f"  restore      {f['restore']:5.2f} CPU s = opening each chunk {f['decompress']:.2f} "
          f"+ creating the files (tar -x, system) {f['files']:.2f}: at most "
          f"{f['restore_ceiling']:.2f}x zstd|tar's speed (target 1.2x); vzbackup used "
          f"{f['restore_over_floor']:.2f}x the floor")
    print(f"  started      as a vzbackup command starts ({f['startup_s']:.2f} s before any "
          f"work): at most {f['dedup_ceiling_started']:.2f}x tar|zstd's speed for a "
          f"deduplicating backup, {f['restore_ceiling_started']:.2f}x zstd|tar's for a restore")


def print_table(s: dict, rounds: int, data: dict) -> None:
    t = s["targets"]
    ok = {True: "PASS", False: "FAIL"}
    mb = 1 / MB
    rows = [
        ("full backup, s (vs tar|zstd -3 -T0)", s["vz_full_s"], s["tar_full_s"], "speed",
         ">= 1.2x", t["full_speed_vs_tar"]),
        ("full backup, MB (vs tar|zstd)", s["vz_full_repo"] * mb, s["tar_full_size"] * mb,
         "size", "<= 1.02x", t["full_size_vs_tar"]),
        ("full backup, s (vs borg)", s["vz_full_s"], s["borg_full_s"], "speed", "", None),
        ("full backup, MB (vs borg repo)", s["vz_full_repo"] * mb, s["borg_full_repo"] * mb,
         "size", "", None),
        ("full backup, s (vs tar, vzdump flags)", s["vz_full_s"], s["tar_vzdump_s"], "speed",
         "", None),
        ("full backup, MB (vs tar, vzdump flags)", s["vz_full_repo"] * mb,
         s["tar_vzdump_size"] * mb, "size", "", None),
        ("full backup, CPU s (vs tar|zstd)", s["vz_full_cpu_s"], s["tar_full_cpu_s"], "speed",
         "", None),
        ("full backup, s (vs restic)", s["vz_full_s"], s["restic_full_s"], "speed", "", None),
        ("full backup, CPU s (vs restic)", s["vz_full_cpu_s"], s["restic_full_cpu_s"], "speed",
         "", None),
        ("full backup, MB (vs restic repo)", s["vz_full_repo"] * mb,
         s["restic_full_repo"] * mb, "size", "", None),
        ("1% incremental, s (vs restic)", s["vz_incr_s"], s["restic_incr_s"], "speed",
         ">= 2.0x", t["incr_speed_vs_restic"]),
        ("1% incremental, s (vs borg)", s["vz_incr_s"], s["borg_incr_s"], "speed",
         ">= 2.0x", t["incr_speed_vs_borg"]),
        ("1% incremental, CPU s (vs restic)", s["vz_incr_cpu_s"], s["restic_incr_cpu_s"],
         "speed", "", None),
        ("1% incremental, repo MB (vs restic)", s["vz_incr_repo"] * mb,
         s["restic_incr_repo"] * mb, "size", "", None),
        ("1% incremental, growth MB (vs restic)", s["vz_incr_growth"] * mb,
         s["restic_incr_growth"] * mb, "size", "<= 1.0x", t["incr_growth_vs_restic"]),
        ("1% incremental, growth MB (vs borg)", s["vz_incr_growth"] * mb,
         s["borg_incr_growth"] * mb, "size", "<= 1.0x", t["incr_growth_vs_borg"]),
        ("1% incremental, s (vs tar|zstd full)", s["vz_incr_s"], s["tar_full2_s"], "speed",
         "", None),
        ("unchanged, s (vs restic)", s["vz_unch_s"], s["restic_unch_s"], "speed", "", None),
        ("unchanged, s (vs borg)", s["vz_unch_s"], s["borg_unch_s"], "speed", "", None),
        ("unchanged, growth KB (vs restic)", s["vz_unch_growth"] / 1000,
         s["restic_unch_growth"] / 1000, "size", "", None),
        ("unchanged, s incl. start (vs 0.15 s)", s["vz_unch_s"], 0.15, "size", "<= 0.15 s",
         t["unchanged_wall"]),
        ("restore, s (vs zstd -dc|tar -x)", s["vz_restore_s"], s["tar_restore_s"], "speed",
         ">= 1.2x", t["restore_vs_tar"]),
        ("restore, s (vs restic restore)", s["vz_restore_s"], s["restic_restore_s"], "speed",
         "", None),
        ("restore, CPU s (vs zstd -dc|tar -x)", s["vz_restore_cpu_s"], s["tar_restore_cpu_s"],
         "speed", "", None),
        ("peak RSS full, MB (vs tar|zstd)", s["vz_full_rss_mb"], s["tar_full_rss_mb"], "size",
         "", None),
        ("peak RSS full, MB (vs restic)", s["vz_full_rss_mb"], s["restic_full_rss_mb"], "size",
         "", None),
        ("peak RSS incr, MB (vs restic)", s["vz_incr_rss_mb"], s["restic_incr_rss_mb"], "size",
         "", None),
        ("peak RSS restore, MB (vs restic)", s["vz_restore_rss_mb"],
         s["restic_restore_rss_mb"], "size", "", None),
        ("peak RSS any vzbackup run, MB", s["vz_peak_rss_mb"], 300.0, "size", "<= 300 MB",
         t["peak_rss"]),
    ]
    print(f"\ndata: {data['bytes'] * mb:.0f} MB in {data['entries']} entries "
          f"({data['files']} generated files); median of {rounds} round(s)")
    print("ratio: speed rows = baseline s / vzbackup s (> 1: vzbackup faster); "
          "size rows = vzbackup / baseline")
    print(f"{'operation':<40} {'vzbackup':>9} {'baseline':>9} {'ratio':>7}  "
          f"{'target':<10} result")
    for name, ours, base, kind, target, passed in rows:
        ratio = base / ours if kind == "speed" else ours / base
        res = "" if passed is None else ok[passed]
        print(f"{name:<40} {ours:>9.2f} {base:>9.2f} {ratio:>6.2f}x  {target:<10} {res}")
    print(f"{'(vzbackup CLI start-up: status)':<40} {data['cli_startup_s']:>9.2f}")
    print(f"{'(vzbackup unchanged, own duration)':<40} {s['vz_unch_own_s']:>9.2f}")
    # what the wall time is made of when other processes hold the CPUs (wall >> CPU)
    print(f"{'(vzbackup unchanged, CPU user+sys)':<40} {s['vz_unchanged_cpu_s']:>9.2f}")
    print_floors(s["floor"])
    foreign = s["max_foreign_cpu_share"]
    print(f"other processes used up to {100 * foreign:.0f}% of the CPUs during a round"
          + (": timings are noisy" if foreign > 0.1 else ""))
    v = s["verified"]
    print("restored trees equal the source: " + ", ".join(
        f"{k} {'yes' if x else 'NO'}" for k, x in v.items())
        + f"  [{ok[t['restore_identical']]}]")


ROUND_ROWS = [  # the timed commands of the judged speed rows, each round's seconds shown
    ("full backup", "vz_full", "tar_full", "tar|zstd"),
    ("1% incremental", "vz_incr", "restic_incr", "restic"),
    ("restore", "vz_restore", "tar_restore", "zstd|tar"),
]


def print_rounds(rounds: list[dict]) -> None:
    """Each round's seconds of the judged speed rows: a median hides one slow round."""
    if len(rounds) < 2:
        return
    print("per round, s:")
    for name, ours, other, label in ROUND_ROWS:
        mine = " ".join(f"{r[ours]['s']:.2f}" for r in rounds)
        theirs = " ".join(f"{r[other]['s']:.2f}" for r in rounds)
        print(f"  {name:<16} vzbackup {mine}  |  {label} {theirs}")


def print_rss_area(r: dict, data: dict) -> None:
    print(f"\narea: {data['bytes'] / (1 << 30):.1f} GiB apparent, "
          f"{data['allocated'] / (1 << 30):.1f} GiB allocated, {data['entries']} entries")
    for name in ("full", "unchanged"):
        x = r[name]
        print(f"{name + ' backup':<20} {x['s']:7.1f} s  peak RSS {x['rss_mb']:6.0f} MB  "
              f"repo {x['repo']['bytes'] / MB:7.0f} MB")
    res = "PASS" if r["target_peak_rss"] else "FAIL"
    print(f"{'peak RSS, MB':<20} {r['peak_rss_mb']:7.0f}    target <= 300 MB  {res}")


def print_profile(prof: dict) -> None:
    for phase, p in prof.items():
        print(f"\nprofile {phase} ({p['samples']} samples, {p['s_under_py_spy']:.1f} s "
              f"under py-spy; {p['raw']})")
        print("  own time:")
        for f, pc in p["self"][:12]:
            print(f"    {pc:5.1f}%  {f}")
        print("  inclusive (vzbackup's functions):")
        for f, pc in p["inclusive_project"][:12]:
            print(f"    {pc:5.1f}%  {f}")


def environment() -> dict:
    def out(*cmd: str) -> str:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            return subprocess.run(cmd, capture_output=True, text=True, check=True,
                                  cwd=ROOT).stdout.strip().splitlines()[0]
        return ""

    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "restic": out("restic", "version"),
        "borg": out("borg", "--version"),
        "tar": out("tar", "--version"),
        "zstd": out("zstd", "--version"),
        "git_head": out("git", "rev-parse", "HEAD"),
        "git_dirty_files": len(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT,
                                              capture_output=True, text=True).stdout.split("\n"))
        - 1,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=300, help="size of the generated data")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dataset", choices=("generated", "debian"), default="generated",
                    help="generated data on busybox, or the Debian 12 template's rootfs")
    ap.add_argument("--prefix", default="/var/tmp/vzbench-backup", help="private node prefix")
    ap.add_argument("--ctid", type=int, default=9101)
    ap.add_argument("--restore-ctid", type=int, default=9102)
    ap.add_argument("--dump-args", default="", help="extra 'vzbackup dump' options")
    ap.add_argument("--py-spy", help="py-spy binary: add a profiling pass of vzbackup")
    ap.add_argument("--keep", action="store_true", help="keep the prefix and the CT")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    ap.add_argument("--rss-area-gb", type=int, default=0,
                    help="instead: peak RSS while backing up a generated area of this many GiB")
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("run as root")
    for tool in ("restic", "borg", "tar", "zstd"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"backup-{stamp}.json"
    bench = Bench(args)
    doc: dict = {"benchmark": "backup", "time": stamp, "args": vars(args),
                 "env": environment(), "rounds": []}
    try:
        doc["data"] = bench.setup()
        if args.rss_area_gb:
            doc["rss_area"] = bench.rss_area()
            args.rounds = 0
        for n in range(args.rounds):
            doc["rounds"].append(bench.round(n))
        if args.rounds:
            doc["summary"] = summarise(doc["rounds"], doc["data"]["cli_startup_s"])
        if args.py_spy and args.rounds:
            try:
                doc["profile"] = bench.profile(args.py_spy, stamp)
            except Exception as e:  # the measurements stand without it
                doc["profile_error"] = f"{type(e).__name__}: {e}"
                log(f"profiling failed: {doc['profile_error']}")
    except BaseException as e:
        doc["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        if args.keep:
            log(f"kept {bench.prefix}")
        else:
            bench.cleanup()
        out_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        log(f"results: {out_path}")
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
        return
    if args.rss_area_gb:
        print_rss_area(doc["rss_area"], doc["data"])
        print(f"\nJSON: {out_path}")
        return
    if not args.rounds:  # set up (and kept, with --keep) only
        print(f"\nno rounds run; JSON: {out_path}")
        return
    print_table(doc["summary"], args.rounds, doc["data"])
    print_rounds(doc["rounds"])
    if "profile" in doc:
        print_profile(doc["profile"])
    print(f"\nJSON: {out_path}")


if __name__ == "__main__":
    main()
