"""bench/floors.py: the CPU floors bench/backup.py bounds issue 14's speed targets with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_repository import backup
from vzbackup.storage.local import DirBackend

from vzbackup.engine.extract import load_tree
from vzbackup.engine.repo import Repository

ROOT = Path(__file__).resolve().parent.parent


def test_floors_count_every_file_read_and_each_distinct_chunk_once(tmp_path: Path):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    big = os.urandom(3 << 20)
    (src / "big").write_bytes(big)
    (src / "big-copy").write_bytes(big)  # read twice, its chunks stored (and counted) once
    for i in range(40):
        (src / "etc" / f"conf{i}").write_text(f"key{i} = {'value ' * i}\n")
    (src / "link").symlink_to("big")  # not read: a symlink
    repo = Repository.init(DirBackend(tmp_path / "repo"))
    m, _ = backup(repo, src)

    r = subprocess.run([sys.executable, str(ROOT / "bench/floors.py"), str(tmp_path / "repo"),
                        str(src), m.id], capture_output=True, text=True, check=True)
    got = json.loads(r.stdout)

    files = [p for p in src.rglob("*") if p.is_file() and not p.is_symlink()]
    assert got["read_bytes"] == sum(p.stat().st_size for p in files)
    distinct = {cid for e in load_tree(repo, repo.tree_of(m)) for cid, _, _ in e.chunks}
    assert got["chunks"] == len(distinct)
    assert got["chunk_bytes"] == sum(len(repo.get_chunk(c)) for c in distinct)
    assert got["chunk_bytes"] < got["read_bytes"] - len(big) + 4096  # the copy deduplicated
    assert got["stored_bytes"] == sum(repo.locate(c)[1].length for c in distinct)
    assert got["compress"] > 0 and got["decompress"] > 0 and got["walk_read"] >= 0
    assert got["compress_all_cpus"] > 0
    assert got["cut_bytes"] == got["read_bytes"]  # every file cut, the copy too
    assert got["cut"] > 0 and got["name"] > 0
