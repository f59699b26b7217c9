"""The template cache (TEMPLATE/cache): look up, list and remove OS template tarballs.

Any root filesystem tarball counts, whoever made it: ours, OpenVZ's precreated templates or
Proxmox's ``debian-12-standard_12.7-1_amd64.tar.zst``; the name is the file name without its
``.tar.*`` suffix. A template built here also has ``NAME.tar.zst.json`` beside it (its recipe).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vzbackup.constants import TEMPLATE_INFO_SUFFIX
from vzbackup.errors import NotFoundError, UsageError

TEMPLATE_SUFFIXES = (".tar.zst", ".tar.xz", ".tar.gz")


@dataclass
class TemplateInfo:
    """One template in the cache, as ``template list`` shows it."""

    name: str
    path: str
    size: int
    mtime: float
    recipe: dict[str, object] = field(default_factory=dict)  # from NAME.tar.zst.json, if built here

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _ostemplate_of(filename: str) -> str | None:
    for suffix in TEMPLATE_SUFFIXES:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return None


def check_name(ostemplate: str) -> None:
    if not ostemplate or "/" in ostemplate or ostemplate.startswith(".") or "\0" in ostemplate:
        raise UsageError(
            f"invalid OS template name {ostemplate!r}",
            hint="a template name is a file name without .tar.* suffix, e.g. debian-12-x86_64",
        )


def available_templates(cache_dir: str | Path) -> list[str]:
    """OS template names (``busybox-1.0-x86_64``) present in *cache_dir*, sorted."""
    try:
        entries = list(Path(cache_dir).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = set()
    for entry in entries:
        name = _ostemplate_of(entry.name)
        if name and not name.startswith(".") and entry.is_file():
            names.add(name)
    return sorted(names)


def find_template(cache_dir: str | Path, ostemplate: str) -> Path:
    """Path of the tarball for *ostemplate* (zst preferred over xz over gz)."""
    check_name(ostemplate)
    cache = Path(cache_dir)
    for suffix in TEMPLATE_SUFFIXES:
        path = cache / (ostemplate + suffix)
        if path.is_file():
            return path
    available = available_templates(cache)
    listing = ", ".join(available) if available else "none"
    raise NotFoundError(
        f"OS template {ostemplate!r} not found in {cache} (available: {listing})",
        hint="build one with 'vzbackup template build debian-12-x86_64'",
    )


def read_recipe(tarball: Path) -> dict[str, object]:
    try:
        return json.loads(tarball.with_name(tarball.name + TEMPLATE_INFO_SUFFIX).read_text())
    except (OSError, ValueError):
        return {}


def list_templates(cache_dir: str | Path) -> list[TemplateInfo]:
    infos = []
    for name in available_templates(cache_dir):
        path = find_template(cache_dir, name)
        st = path.stat()
        infos.append(TemplateInfo(name, str(path), st.st_size, st.st_mtime, read_recipe(path)))
    return infos


def remove_template(cache_dir: str | Path, ostemplate: str) -> list[Path]:
    """Remove every tarball of *ostemplate* and its recipe; returns what was removed."""
    check_name(ostemplate)
    cache = Path(cache_dir)
    removed = []
    for suffix in TEMPLATE_SUFFIXES:
        for path in (cache / (ostemplate + suffix), cache / (ostemplate + suffix + ".sha256")):
            recipe = path.with_name(path.name + TEMPLATE_INFO_SUFFIX)
            for p in (recipe, path):
                if p.is_file() or p.is_symlink():
                    os.unlink(p)
                    removed.append(p)
    if not removed:
        find_template(cache, ostemplate)  # raises NotFoundError listing what exists
    return removed
