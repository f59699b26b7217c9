"""Benchmark: private-area push A->B on the two-node bed, rsync (over the paramiko session)
vs the tar+zstd stream, full and after a small change, in one run.

The tree: --size-mb MB, half incompressible (random) and half text-like (repeating lines),
in 1 MiB files plus 2000 small configs and a 256 MiB sparse file with one data island.
Prints MB/s of tree data per method (sparse holes not counted) and bytes sent.

    python bench/sync.py [--size-mb 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import twonode  # noqa: E402
from vzbackup.migrate.ssh import Session, SSHTarget  # noqa: E402
from vzbackup.migrate.sync import push_tree  # noqa: E402

MIB = 1 << 20


def make_tree(root: Path, size_mb: int) -> None:
    (root / "data").mkdir(parents=True)
    (root / "etc").mkdir()
    line = b"key_%05d = some value that repeats across the text files\n"
    for i in range(size_mb):
        if i % 2:
            body = os.urandom(MIB)
        else:
            body = b"".join(line % (j % 997) for j in range(MIB // len(line % 0)))
        (root / "data" / f"f{i:05d}").write_bytes(body)
    for i in range(2000):
        (root / "etc" / f"c{i}").write_text(f"option_{i % 40} = {i}\n" * (1 + i % 9))
    with open(root / "sparse", "wb") as f:
        f.seek(128 * MIB)
        f.write(os.urandom(MIB))
        f.truncate(256 * MIB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=200)
    args = ap.parse_args()
    bed = twonode.up(f"bsync{os.getpid()}", None)
    try:
        src = Path(tempfile.mkdtemp(dir=bed.dir))
        make_tree(src / "t", args.size_mb)
        data_mb = args.size_mb + 1 + 0.02
        target = SSHTarget.parse(bed.dest(bed.b), key=str(bed.ssh_key),
                                 opts=[f"UserKnownHostsFile={bed.known_hosts}"])
        print(f"{'method':8} {'pass':12} {'seconds':>8} {'MB/s':>8} {'MB sent':>9}")
        with Session(target) as s:
            for method in ("rsync", "stream"):
                dst = str(bed.b.prefix / f"dst-{method}")
                for label in ("full", "1% changed"):
                    if label != "full":
                        for i in range(0, args.size_mb, 100):
                            (src / "t/data" / f"f{i:05d}").write_bytes(os.urandom(MIB))
                    os.sync()
                    st = push_tree(s, src / "t", dst, method=method)
                    rate = f"{data_mb / st.seconds:.1f}" if label == "full" else "-"
                    print(f"{method:8} {label:12} {st.seconds:8.2f} {rate:>8} "
                          f"{st.bytes_sent / MIB:9.1f}")
    finally:
        bed.cleanup()


if __name__ == "__main__":
    main()
