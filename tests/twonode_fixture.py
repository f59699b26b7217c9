"""Two-node bed fixtures (scripts/twonode.py): ``two_nodes`` per test, ``shared_two_nodes`` per
module (for tests that leave the nodes as they found them), and an SSHTarget helper."""

from __future__ import annotations

import importlib
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from vzbackup.migrate.ssh import SSHTarget

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
twonode = importlib.import_module("twonode")
_beds = itertools.count()


def _bed(template_cache: Path) -> Iterator[twonode.TwoNodes]:
    bed = twonode.up(f"t{os.getpid()}-{next(_beds)}", template_cache)
    try:
        yield bed
    finally:
        bed.cleanup()


@pytest.fixture
def two_nodes(template_cache: Path) -> Iterator[twonode.TwoNodes]:
    """Nodes A and B with sshd each; everything is removed afterwards, even on failure."""
    yield from _bed(template_cache)


@pytest.fixture(scope="module")
def shared_two_nodes(template_cache: Path) -> Iterator[twonode.TwoNodes]:
    """Like two_nodes, shared by the tests of one module."""
    yield from _bed(template_cache)


def ssh_target(bed: twonode.TwoNodes, *opts: str, known: Path | None = None,
               **kw) -> SSHTarget:
    """A target for node B with the bed's client key and known_hosts (or *known*)."""
    return SSHTarget.parse(bed.dest(bed.b), key=str(bed.ssh_key),
                           opts=[f"UserKnownHostsFile={known or bed.known_hosts}", *opts], **kw)
