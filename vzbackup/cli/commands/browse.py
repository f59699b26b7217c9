"""vzbackup ls / extract / export / log: look into snapshots without restoring a CT."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from vzbackup.backup import vzdump_archive as V
from vzbackup.cli.common import emit, json_option
from vzbackup.cli.repo_common import human, open_repo, repo_options
from vzbackup.engine import tree as T
from vzbackup.engine.extract import ChunkReader, file_pieces, find, load_tree, restore_tree
from vzbackup.engine.repo import snapshot_time
from vzbackup.errors import ExistsError, NotFoundError
from vzbackup.syscalls import malloc_large_with_mmap


@click.command(name="ls")
@click.argument("snapshot")
@click.argument("path", default="/")
@repo_options
@click.option("--state", is_flag=True, help="List the CRIU images instead of the files.")
@json_option
@click.pass_context
def ls(ctx: click.Context, snapshot: str, path: str, storage: str | None, keyfile: str | None,
       state: bool, as_json: bool) -> None:
    """List files of SNAPSHOT under PATH (like ls -lR)."""
    repo = open_repo(ctx, storage, keyfile)
    m = repo.resolve(snapshot)
    if state and not m.has_state:
        raise NotFoundError(f"snapshot {m.id} has no running state")
    entries = find(load_tree(repo, repo.state_tree_of(m) if state else repo.tree_of(m)), path)
    if not entries:
        raise NotFoundError(f"{path} is not in snapshot {m.id}")
    if as_json:
        emit(True, [
            {"path": "/" + e.path if e.path != "." else "/", "type": T.KIND_NAMES[e.kind],
             "mode": oct(e.mode), "uid": e.uid, "gid": e.gid, "size": e.size,
             "mtime": e.mtime_ns / 1e9, "link": e.link or None}
            for e in entries
        ])
        return
    for e in entries:
        click.echo(e.ls_line())


@click.command()
@click.argument("snapshot")
@click.argument("path")
@click.argument("dest", type=click.Path(file_okay=False))
@repo_options
@click.pass_context
def extract(ctx: click.Context, snapshot: str, path: str, dest: str, storage: str | None,
            keyfile: str | None) -> None:
    """Copy PATH (a file or a directory) out of SNAPSHOT into the new directory DEST."""
    repo = open_repo(ctx, storage, keyfile)
    m = repo.resolve(snapshot)
    entries = find(load_tree(repo, repo.tree_of(m)), path)
    if not entries:
        raise NotFoundError(f"{path} is not in snapshot {m.id}")
    base = path.strip("/")
    if base and base != ".":
        # re-root the selection at its parent so DEST/<name> is what was asked for
        parent = base.rpartition("/")[0]
        cut = len(parent) + 1 if parent else 0
        root_entry = T.Entry(".", T.DIR, 0o755, 0, 0, entries[0].mtime_ns)
        picked = [root_entry]
        for e in entries:
            e = T.Entry(**{**e.__dict__, "path": e.path[cut:]})
            if e.kind == T.HARDLINK:
                if not e.link.startswith(base + "/") and e.link != base:
                    raise NotFoundError(f"{e.path} is a hard link to {e.link}, outside {path}")
                e.link = e.link[cut:]
            picked.append(e)
        entries = picked
    target = Path(dest)
    if target.exists():
        raise ExistsError(f"{dest} already exists; extract creates it")
    n = restore_tree(repo, entries, target)
    click.echo(f"extracted {path} of {m.id} to {dest} ({human(n)})")


@click.command()
@click.argument("snapshot")
@click.option("--dumpdir", type=click.Path(file_okay=False), default=".",
              help="Where the archive goes (default: current directory).")
@repo_options
@click.option("--zstd-level", type=click.IntRange(1, 19), default=3)
@json_option
@click.pass_context
def export(ctx: click.Context, snapshot: str, dumpdir: str, storage: str | None,
           keyfile: str | None, zstd_level: int, as_json: bool) -> None:
    """Write SNAPSHOT as a classic vzdump archive (vzdump-openvz-CTID-DATE.tar.zst)."""
    repo = open_repo(ctx, storage, keyfile)
    m = repo.resolve(snapshot)
    entries = [e for e in load_tree(repo, repo.tree_of(m)) if e.path != "."]
    malloc_large_with_mmap()  # read buffers go back to the kernel when freed
    reader = ChunkReader(repo, entries)
    kinds = {T.DIR: "dir", T.FILE: "file", T.SYMLINK: "symlink", T.HARDLINK: "hardlink",
             T.CHAR: "chardev", T.BLOCK: "blockdev", T.FIFO: "fifo"}

    def content(e: T.Entry):
        def read():
            regions = e.extents if e.extents is not None else [[0, e.size]]
            pos = 0
            pieces = file_pieces(reader, e)
            for off, ln in regions:
                if off > pos:
                    yield bytes(off - pos)
                left = ln
                while left > 0:
                    piece = next(pieces)
                    yield piece
                    left -= len(piece)
                pos = off + ln
            if e.size > pos:
                yield bytes(e.size - pos)
        return read

    items = V.preorder(
        V.ExportEntry(path=e.path, kind=kinds[e.kind], mode=e.mode, uid=e.uid, gid=e.gid,
                      mtime_ns=e.mtime_ns, size=e.size, link_target=e.link or None, rdev=e.rdev,
                      xattrs=e.xattrs, read=content(e) if e.kind == T.FILE else None)
        for e in entries
    )
    when = snapshot_time(m.id).astimezone(dt.UTC)
    out = Path(dumpdir) / V.archive_name(m.ctid, when)
    if out.exists():
        raise ExistsError(f"{out} already exists")
    Path(dumpdir).mkdir(parents=True, exist_ok=True)
    try:
        size = V.export_tar(out, items, m.ct_config, level=zstd_level)
    finally:
        reader.close()
    emit(as_json, {"snapshot": m.id, "archive": str(out), "bytes": size},
         f"exported {m.id} to {out} ({human(size)})")


@click.command()
@click.argument("snapshot")
@repo_options
@click.pass_context
def log(ctx: click.Context, snapshot: str, storage: str | None, keyfile: str | None) -> None:
    """Show the log kept with SNAPSHOT."""
    repo = open_repo(ctx, storage, keyfile)
    m = repo.resolve(snapshot)
    click.echo(repo.read_log(m.id), nl=False)


COMMANDS = [ls, extract, export, log]
