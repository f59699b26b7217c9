"""What makes a directory tree a CT's root filesystem: an init the runtime can exec."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

INIT = "/sbin/init"
MAX_LINKS = 40  # like the kernel's limit on symlinks followed in one lookup


def resolve_in(root: Path, path: str) -> Path | None:
    """*path* resolved as if *root* were '/' (symlinks never leave it); None for a loop."""
    todo = deque(path.split("/"))
    parts: list[str] = []
    links = 0
    while todo:
        part = todo.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            parts = parts[:-1]
            continue
        here = root.joinpath(*parts, part)
        if here.is_symlink():
            links += 1
            if links > MAX_LINKS:
                return None
            target = os.readlink(here)
            if target.startswith("/"):
                parts = []
            todo.extendleft(reversed(target.split("/")))
            continue
        parts.append(part)
    return root.joinpath(*parts)


def init_problem(root: Path) -> str | None:
    """Why *root* can't boot (no executable /sbin/init inside it), or None if it can."""
    real = resolve_in(root, INIT)
    if real is None:
        return f"{INIT} is a symlink loop"
    if not real.exists():
        where = "" if str(real) == str(root) + INIT else f" (it points to {real.relative_to(root)})"
        return f"{INIT} is missing{where}"
    if not real.is_file() or not os.stat(real).st_mode & 0o111:
        return f"{INIT} is not an executable file"
    return None
