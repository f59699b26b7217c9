"""The source layout's import rules (README "Source layout") and the source habits, checked on
the source text."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"storage": ROOT / "storage", "migrate": ROOT / "migrate",
           "scheduler": ROOT / "scheduler"}
FOLDERS |= {p.name: p for p in (ROOT / "vzbackup").iterdir() if (p / "__init__.py").exists()}
LEAVES = {"errors", "constants", "syscalls", "lock", "safetar", "timer", "nsexec", "__version__"}

# folder -> the other folders it may import (leaf modules are always allowed, except in storage)
MAY_IMPORT: dict[str, set[str]] = {
    "storage": set(),
    "config": {"storage"},
    "criu": set(),
    "template": set(),
    "ct": {"config", "criu", "template"},
    "engine": {"storage"},
    "backup": {"engine", "ct", "config", "criu", "storage"},
    "migrate": {"ct", "config", "criu", "storage"},
    "scheduler": {"backup", "engine", "config"},
    "observe": {"engine", "backup", "config", "scheduler", "migrate"},
    "cli": set(FOLDERS),
    "classic": {"cli", "config", "ct"},
}
# what the README lists as still to remove: (folder, module it imports)
EXCEPTIONS = {("config", "vzbackup.ct.idmap"), ("engine", "vzbackup.ct.fs"),
              ("criu", "vzbackup.ct.container"), ("scheduler", "vzbackup.observe.server")}


def _imports(folder: Path) -> set[str]:
    found: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
    return found


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "vzbackup" or len(parts) < 2:
        return None
    return parts[1]


@pytest.mark.parametrize("name", sorted(MAY_IMPORT))
def test_imports_follow_the_layout(name: str) -> None:
    allowed = MAY_IMPORT[name] | {name} | (LEAVES if name != "storage" else set())
    bad = sorted(m for m in _imports(FOLDERS[name])
                 if (p := _part(m)) and p not in allowed and (p in FOLDERS or p in LEAVES)
                 and not any(m == e or m.startswith(e + ".") for f, e in EXCEPTIONS if f == name))
    assert bad == [], f"{name} imports {bad}"


def test_every_folder_has_a_rule() -> None:
    assert set(FOLDERS) == set(MAY_IMPORT)


def test_no_formatter_directives() -> None:
    """ruff format is not used (pyproject.toml): no '# fmt:' comments to keep in step."""
    found = [f"{p.relative_to(ROOT)}:{n}"
             for folder in [ROOT / "vzbackup", *FOLDERS.values(), ROOT / "tests", ROOT / "bench"]
             for p in folder.rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if "# fmt: " + "skip" in line or "# fmt: " + "off" in line]
    assert found == []
