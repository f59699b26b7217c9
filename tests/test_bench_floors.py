"""bench/floors.py: the CPU floors bench/backup.py bounds issue 14's speed targets with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    levels = got["levels"]  # every level up to the repository's, on the same chunks
    assert sorted(levels) == [str(n) for n in range(1, repo.codec.level + 1)]
    assert all(v["cpu"] > 0 for v in levels.values())
    top = levels[str(repo.codec.level)]["bytes"]
    assert abs(top - got["stored_bytes"]) <= 64 * got["chunks"]  # as the repository stores
    assert len({v["bytes"] for v in levels.values()}) == len(levels)  # each its own level


def test_ceilings_count_the_start_and_cheaper_levels_their_cost(monkeypatch):
    """bench/backup.py's ceilings: the floor's CPU over the CPUs, a command's start-up on
    top (serial); each cheaper zstd level as ratios to the repository's level."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import backup as bench_backup

    monkeypatch.setattr(bench_backup.os, "sched_getaffinity", lambda _pid: {0, 1})
    levels = {"1": {"cpu": 0.5, "bytes": 120}, "2": {"cpu": 0.8, "bytes": 105},
              "3": {"cpu": 1.0, "bytes": 100}}
    floor = {"walk_read": 0.1, "compress": 1.8, "compress_all_cpus": 1.9, "cut": 0.3,
             "name": 0.2, "decompress": 0.6, "levels": levels}
    rnd = {"floor": floor, "files_restore": {"sys_s": 0.4}, "tar_full": {"s": 1.5},
           "tar_restore": {"s": 1.0}, "vz_full": {"cpu_s": 3.0}, "vz_restore": {"cpu_s": 1.5}}

    got = bench_backup.summarise_floors([rnd], startup_s=0.25)

    assert got["dedup"] == pytest.approx(2.5)  # 0.1 + 1.9 + 0.3 + 0.2
    assert got["dedup_ceiling"] == pytest.approx(2 * 1.5 / 2.5)
    assert got["dedup_ceiling_started"] == pytest.approx(1.5 / (0.25 + 2.5 / 2))
    assert got["restore_ceiling_started"] == pytest.approx(1.0 / (0.25 + 1.0 / 2))
    assert got["level1_cpu"] == pytest.approx(0.5) and got["level1_bytes"] == pytest.approx(1.2)
    assert got["level2_cpu"] == pytest.approx(0.8) and got["level2_bytes"] == pytest.approx(1.05)
    assert "level3_cpu" not in got  # the repository's own level is the reference
