"""``vzbackup dump``: back up containers, one snapshot each, like a vzdump job.

Per CT: backup-start hook, per-CT lock, repository backup lock, a consistent source
(stop / suspend / snapshot / checkpoint), the tree (and CRIU images) into the repository,
the manifest published last, the files cache saved, backup-end hook. A failure aborts
only that CT (backup-abort hook), leaves no snapshot, and the repository stays valid.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vzbackup import syscalls as S
from vzbackup.backup import modes, session
from vzbackup.backup.defaults import DumpDefaults, ExcludeMatcher
from vzbackup.backup.hooks import HookScript
from vzbackup.ct.container import Container
from vzbackup.engine import knowncache
from vzbackup.engine import locks as L
from vzbackup.engine.archiver import ChunkStore, Stats, TreeWriter, manifest_lists
from vzbackup.engine.filescache import FilesCache
from vzbackup.engine.repo import TIME_FMT, Manifest, Repository
from vzbackup.errors import StorageError, VzError
from vzbackup.storage.local import DirBackend


class BackupLog:
    """Timestamped lines kept for the snapshot and echoed to *echo*."""

    def __init__(self, echo: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self.echo = echo

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        self.lines.append(line)
        if self.echo:
            self.echo(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class DumpResult:
    """The outcome of one CT's backup, as ``dump --json`` reports it."""

    def __init__(self, ctid: int, mode: str = "") -> None:
        self.ctid = ctid
        self.ok = False
        self.snapshot = ""
        self.mode = mode
        self.error = ""
        self.exit_code = 0
        self.pruned: list[str] = []
        self.stats: dict[str, Any] = {}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def backup_ct(ct: Container, repo: Repository, opts: DumpDefaults, hooks: HookScript,
              log: BackupLog, progress: Callable[[int, int], None] | None = None) -> Manifest:
    """One CT into *repo*; returns the published manifest."""
    t0 = time.monotonic()
    conf = ct.conf
    conf_text = ct.conf_path.read_text()
    mode = opts.mode
    log(f"INFO: starting backup of CT {ct.ctid} ({conf.hostname or 'no hostname'}), mode {mode}")
    tmpdir = Path(opts.tmpdir) if opts.tmpdir else ct.node.dumpdir
    tmpdir.mkdir(parents=True, exist_ok=True)
    # a checkpoint's processes may hold files in /tmp open: keep the tree whole for CRIU
    matcher = ExcludeMatcher(opts.exclude_path) if mode == "checkpoint" else opts.matcher()
    exclude = matcher.excluded if matcher else None
    stats = Stats()
    requests_before = repo.backend.requests
    with ct.backup_lock(wait=opts.lockwait * 60), \
            L.RepoLock(repo, L.BACKUP, what=f"CT {ct.ctid} on {os.uname().nodename}",
                       wait=opts.lockwait * 60):
        known_path = session.known_chunks_path(ct.node, repo)
        known, known_sizes = knowncache.load_known(repo, known_path)
        log(f"INFO: repository {repo.backend.url}: {len(known)} chunks known")
        store = ChunkStore(repo, known, threads=worker_threads(opts.zstd), stats=stats,
                           bwlimit_kbps=opts.bwlimit or None)
        try:
            with modes.consistent_source(
                ct, mode, tmpdir=tmpdir, stopwait=opts.stopwait * 60,
                phase=lambda p: hooks.call(p, ctid=ct.ctid, mode=mode), log=log,
                bwlimit_kbps=opts.bwlimit or None,
            ) as src:
                cache = FilesCache(session.files_cache_path(ct.node, repo, ct.ctid),
                                   use_inode=src.same_inodes,
                                   key="\n".join(matcher.patterns) if matcher else "")
                log(f"INFO: backing up {src.root}")
                t1 = time.monotonic()
                tree = TreeWriter(repo, store, cache=cache, exclude=exclude, progress=progress,
                                  log=log).write(src.root)
                state_tree = None
                if src.state_dir:
                    log(f"INFO: backing up CRIU images from {src.state_dir}")
                    state_tree = TreeWriter(repo, store, log=log).write(src.state_dir)
                read_s = time.monotonic() - t1
            with ThreadPoolExecutor(1, thread_name_prefix="snapshot-name") as naming:
                # the snapshot's name is checked for a clash while the last pack is written
                named = naming.submit(repo.free_time, ct.ctid, datetime.now(UTC))
                store.wait()
                chunk_lists = manifest_lists(repo, store, tree, state_tree)
                store.finish()
        finally:
            store.close()
        gone = store.vanished()
        if gone:
            raise StorageError(
                f"{len(gone)} reused chunks vanished while the backup ran (a concurrent gc?)",
                hint="run the backup again; it will store them anew",
            )
        for s in stats.skipped[:20]:
            log(f"INFO: skipped {s} (socket or unknown type)")
        refs = sorted(store.refs)  # the lists' own chunks too
        st = dict(stats.__dict__)
        st.pop("skipped")
        st.update(
            chunks_total=len(refs),
            duration=round(time.monotonic() - t0, 3),
            read_seconds=round(read_s, 3),
            frozen_seconds=round(src.frozen_seconds, 3),  # final only after the with block
            was_running=src.was_running,
            # object storage requests so far; publishing adds about four more
            storage_requests=repo.backend.requests - requests_before,
            dedup_ratio=(
                round(stats.bytes_total / stats.stored_new, 2) if stats.stored_new else None
            ),
        )
        manifest = Manifest(
            id="",
            ctid=ct.ctid,
            time=named.result().strftime(TIME_FMT),
            hostname=conf.hostname or "",
            mode=mode,
            notes=notes(opts.notes_template or "", ct.ctid, conf.hostname or ""),
            ct_config=conf_text,
            **chunk_lists,
            stats=st,
            node=os.uname().nodename,
        )
        log(
            f"INFO: {stats.files} files, {stats.bytes_total} bytes; read {stats.bytes_read}, "
            f"new {stats.bytes_new} stored as {stats.stored_new} in {stats.chunks_new} new chunks "
            f"({stats.cache_hits} files unchanged)"
        )
        log(f"INFO: finished backup of CT {ct.ctid} in {st['duration']:.2f} s")
        # the files cache is written while the snapshot is published (round trips to the
        # storage): should publishing fail, a cache ahead of it is harmless, since the next
        # backup trusts a cached file's chunks only if a published snapshot has them
        with ThreadPoolExecutor(1, thread_name_prefix="files-cache") as meanwhile:
            saved = meanwhile.submit(cache.save)
            with repo.consolidating_index():
                manifest = repo.publish(manifest, log.text, free=True)
            saved.result()  # (publish's error wins: raised before this)
        # (store.known: the chunks known at the start, plus the new ones, all in refs)
        knowncache.remember(known_path, known_sizes, store.known, manifest.id,
                            repo.published[manifest.id], refs)
    return manifest


def run(node_ctids: list[Container], opts: DumpDefaults, *,
        echo: Callable[[str], None] | None = None,
        progress_factory: Callable[[Container], Callable[[int, int], None] | None] | None = None,
        ) -> list[DumpResult]:
    """The whole job: hooks job-start/job-end, each CT in turn; results per CT."""
    if not node_ctids:
        return []
    node = node_ctids[0].node
    set_io_priority(opts.ionice)
    hooks = HookScript(opts.script, {"STOREID": opts.storage or "local",
                                     "HOSTNAME": os.uname().nodename},
                       log_line=echo, on_warning=echo)
    repo = session.open_repository(node, opts.storage, opts.encryption_key, create=True,
                                   level=opts.zstd_level)
    repo.chunkers()  # a damaged config fails the job before any CT is stopped or frozen
    if isinstance(repo.backend, DirBackend):  # as vzdump: a directory storage's path only
        hooks.base_env["DUMPDIR"] = str(repo.backend.root)
    results: list[DumpResult] = []
    hooks.call("job-start")
    try:
        for ct in node_ctids:
            res = DumpResult(ct.ctid, mode=opts.mode)
            log = BackupLog(echo)
            try:
                hooks.call("backup-start", ctid=ct.ctid, mode=opts.mode)
                progress = progress_factory(ct) if progress_factory else None
                m = backup_ct(ct, repo, opts, hooks, log, progress)
                res.ok, res.snapshot, res.stats = True, m.id, m.stats
                hooks.call("backup-end", ctid=ct.ctid, mode=opts.mode,
                           extra_env={"TARGET": m.id})
                if opts.remove and not opts.prune_backups.keep_all:
                    from vzbackup.engine import maintenance  # only with --remove

                    pruned = maintenance.prune(repo, opts.prune_backups, ctids=[ct.ctid],
                                               lockwait=opts.lockwait * 60, log=log)
                    res.pruned = [d.item.id for d in pruned.get(ct.ctid, []) if not d.keep]
            except VzError as e:
                res.error, res.exit_code = str(e), e.exit_code
                log(f"ERROR: backup of CT {ct.ctid} failed: {e}")
                hooks.call("backup-abort", ctid=ct.ctid, mode=opts.mode)
            except OSError as e:
                res.error, res.exit_code = f"{e.strerror or e}", 10
                log(f"ERROR: backup of CT {ct.ctid} failed: {e}")
                hooks.call("backup-abort", ctid=ct.ctid, mode=opts.mode)
            results.append(res)
    except BaseException:
        hooks.call("job-abort")
        raise
    hooks.call("job-end")
    return results


def notes(template: str, ctid: int, hostname: str) -> str:
    """*template* with vzdump's variables filled in; {{cluster}} is empty (no clusters)."""
    values = {"vmid": str(ctid), "guestname": hostname, "node": os.uname().nodename,
              "cluster": ""}
    return re.sub(r"\{\{(vmid|guestname|node|cluster)\}\}", lambda m: values[m[1]], template)


def set_io_priority(level: int) -> None:
    """vzdump's ionice: best-effort class at *level* (0-7), 8 = idle; threads inherit it."""
    if level >= 8:  # best effort, like vzdump
        S.ioprio_set(S.IOPRIO_CLASS_IDLE)
    else:
        S.ioprio_set(S.IOPRIO_CLASS_BE, level)


def worker_threads(zstd: int) -> int:
    """Chunk workers (hash, compress, encrypt, store): vzdump's zstd threads, 0 = all CPUs."""
    return zstd if zstd > 0 else max(2, os.cpu_count() or 2)
