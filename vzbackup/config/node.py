"""Node configuration (OpenVZ vz.conf): every path derives from one prefix.

The file lives at ``PREFIX/etc/vz/vz.conf``; without it the embedded defaults apply, so a
fresh prefix is a working node. Values may use ``${PREFIX}`` and ``$VEID``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vzbackup import constants as C
from vzbackup.config.ct import VALIDATORS
from vzbackup.config.vzfile import VzFile
from vzbackup.errors import ConfigError

if TYPE_CHECKING:
    from vzbackup.ct.idmap import IdMap


def expand(value: str, *, prefix: str, ctid: int | None = None) -> str:
    """Substitute ${PREFIX}/$PREFIX and $VEID/$CTID (OpenVZ spellings) in *value*."""
    p = prefix.rstrip("/")
    out = value.replace("${PREFIX}", p).replace("$PREFIX", p)
    if ctid is not None:
        for var in ("${VEID}", "$VEID", "${CTID}", "$CTID"):
            out = out.replace(var, str(ctid))
    return out


@dataclass
class Node:
    """One node's configuration, rooted at *prefix*."""

    prefix: str = C.DEFAULT_PREFIX
    conf: VzFile = field(default_factory=VzFile)

    @classmethod
    def load(cls, prefix: str | None = None) -> Node:
        """Load the node at *prefix* (default: $VZBACKUP_PREFIX or /)."""
        prefix = prefix or os.environ.get(C.PREFIX_ENV) or C.DEFAULT_PREFIX
        prefix = os.path.abspath(prefix)
        path = Path(prefix, C.VZ_CONF)
        conf = VzFile.load(path) if path.exists() else VzFile(path)
        node = cls(prefix, conf)
        for key in ("STOP_TIMEOUT",):
            raw = node.value(key)
            if not raw.isdigit():
                raise ConfigError(f"{path}: {key}={raw!r} is not a number of seconds")
        # by CTID.conf's rules (else first found at the node's shutdown)
        for key in ("DISK_QUOTA", "VE_STOP_MODE"):
            raw = node.value(key)
            if key == "DISK_QUOTA" and not raw:
                continue  # empty: enforced, as unset
            try:
                VALIDATORS[key](raw)
            except ValueError as e:
                raise ConfigError(f"{path}: {key}={raw!r}: {e}") from None
        return node

    def value(self, key: str) -> str:
        raw = self.conf.get(key)
        if raw is None:
            raw = C.NODE_DEFAULTS.get(key, "")
        return raw

    def path(self, key: str, ctid: int | None = None) -> Path:
        """A path setting of vz.conf, expanded for this prefix (and CTID)."""
        raw = self.value(key)
        if not raw:
            raise ConfigError(f"{self.conf.path}: {key} is empty")
        return Path(expand(raw, prefix=self.prefix, ctid=ctid))

    # Named accessors for the directories every command uses.
    @property
    def confdir(self) -> Path:
        return self.path("CONFDIR")

    @property
    def namesdir(self) -> Path:
        return self.path("NAMESDIR")

    @property
    def template_cache(self) -> Path:
        return self.path("TEMPLATE") / "cache"

    @property
    def dumpdir(self) -> Path:
        return self.path("DUMPDIR")

    @property
    def lockdir(self) -> Path:
        return self.path("LOCKDIR")

    @property
    def rundir(self) -> Path:
        return self.path("RUNDIR")

    @property
    def backupdir(self) -> Path:
        return self.path("BACKUPDIR")

    @property
    def cachedir(self) -> Path:
        return self.path("CACHEDIR")

    @property
    def statedir(self) -> Path:
        return self.path("STATEDIR")

    @property
    def vzbackup_confdir(self) -> Path:
        return self.path("VZBACKUP_CONFDIR")

    @property
    def stop_timeout(self) -> int:
        return int(self.value("STOP_TIMEOUT"))

    @property
    def cgroup_parent(self) -> str:
        """Cgroup directory for this node's CTs, distinct per prefix so nodes never collide."""
        explicit = self.value("CGROUP_PARENT")
        if explicit:
            return explicit.strip("/")
        if self.prefix == "/":
            return "vzbackup"
        import hashlib  # libcrypto loads in 5-8 ms: only when a CT's cgroup is needed

        return "vzbackup-" + hashlib.sha256(self.prefix.encode()).hexdigest()[:8]

    def new_ct_idmap(self, privileged: bool | None = None) -> IdMap:
        """The id map of a new CT: vz.conf's UNPRIVILEGED/IDMAP_* unless *privileged* says."""
        from vzbackup.ct import idmap  # only for a new CT

        unpriv = self.value(idmap.KEY_UNPRIVILEGED) if privileged is None else "no"
        if privileged is False:
            unpriv = "yes"
        return idmap.from_values(unpriv, self.value(idmap.KEY_BASE), self.value(idmap.KEY_SIZE))

    def ct_conf_path(self, ctid: int) -> Path:
        return self.confdir / f"{ctid}.conf"

    def sample_paths(self, name: str) -> list[Path]:
        """Where a ``--config NAME`` sample may live: CONFDIR first, then the packaged ones."""
        fname = f"ve-{name}{C.SAMPLE_SUFFIX}"
        return [self.confdir / fname, Path(__file__).with_name("samples") / fname]

    def ensure_dirs(self) -> None:
        for d in (
            self.confdir,
            self.namesdir,
            self.template_cache,
            self.dumpdir,
            self.lockdir,
            self.rundir,
        ):
            d.mkdir(parents=True, exist_ok=True)
