"""The ``two_nodes`` fixture: a fresh two-node bed (scripts/twonode.py) per test."""

from __future__ import annotations

import importlib
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
twonode = importlib.import_module("twonode")
_beds = itertools.count()


@pytest.fixture
def two_nodes(template_cache: Path) -> Iterator[twonode.TwoNodes]:
    """Nodes A and B with sshd each; everything is removed afterwards, even on failure."""
    bed = twonode.up(f"t{os.getpid()}-{next(_beds)}", template_cache)
    try:
        yield bed
    finally:
        bed.cleanup()
