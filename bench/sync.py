"""Benchmark: private-area push A->B on the two-node bed, in one run:

  baseline      rsync -aHAXS --numeric-ids over the OpenSSH client (what a user would type)
  vzbackup      vzbackup's push_tree, rsync method (OpenSSH client, shared master connection)
  session       the same rsync through the paramiko session (the bridge, no OpenSSH)
  stream        the tar+zstd stream through the paramiko session

full and after a small change. The tree: --size-mb MB, half incompressible (random) and half
text-like, in 1 MiB files plus 2000 small configs and a 256 MiB sparse file with one data
island. Prints MB/s of tree data (sparse holes not counted), bytes sent, the ratio to the
baseline and PASS/FAIL for issue 13's target (first sync >= 0.9x the baseline's rate). The
machine is shared: numbers are noisy, compare within one run.

    python bench/sync.py [--size-mb 200]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
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


TARGET = 0.9  # first sync at >= 0.9x rsync over OpenSSH


def baseline(bed: twonode.TwoNodes, src: Path, dst: str) -> float:
    ssh = shlex.join(["ssh", "-i", str(bed.ssh_key), "-o",
                      f"UserKnownHostsFile={bed.known_hosts}", "-o", "BatchMode=yes"])
    t0 = time.monotonic()
    subprocess.run(["rsync", "-aHAXS", "--numeric-ids", "--delete", "-e", ssh, f"{src}/",
                    f"{bed.dest(bed.b)}:{dst}/"], check=True, capture_output=True)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=200)
    args = ap.parse_args()
    bed = twonode.up(f"bsync{os.getpid()}", None)
    full: dict[str, float] = {}
    try:
        src = Path(tempfile.mkdtemp(dir=bed.dir))
        make_tree(src / "t", args.size_mb)
        data_mb = args.size_mb + 1 + 0.02
        target = SSHTarget.parse(bed.dest(bed.b), key=str(bed.ssh_key),
                                 opts=[f"UserKnownHostsFile={bed.known_hosts}"])
        print(f"{'method':9} {'pass':12} {'seconds':>8} {'MB/s':>8} {'MB sent':>9}")
        with Session(target) as s:
            for method in ("baseline", "vzbackup", "session", "stream"):
                dst = str(bed.b.prefix / f"dst-{method}")
                for label in ("full", "1% changed"):
                    if label != "full":
                        for i in range(0, args.size_mb, 100):
                            (src / "t/data" / f"f{i:05d}").write_bytes(os.urandom(MIB))
                    os.sync()
                    if method == "baseline":
                        secs, sent = baseline(bed, src / "t", dst), float("nan")
                    else:
                        st = push_tree(s, src / "t", dst,
                                       method="stream" if method == "stream" else "rsync",
                                       via="session" if method == "session" else "auto")
                        secs, sent = st.seconds, st.bytes_sent / MIB
                    if label == "full":
                        full[method] = data_mb / secs
                    rate = f"{data_mb / secs:.1f}" if label == "full" else "-"
                    print(f"{method:9} {label:12} {secs:8.2f} {rate:>8} {sent:9.1f}", flush=True)
    finally:
        bed.cleanup()
    print()
    for method in ("vzbackup", "session", "stream"):
        ratio = full[method] / full["baseline"]
        verdict = ("PASS" if ratio >= TARGET else "FAIL") if method == "vzbackup" else "info"
        print(f"first sync {method:9} {full[method]:7.1f} MB/s = {ratio:.2f}x rsync over "
              f"OpenSSH (target >= {TARGET}x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
