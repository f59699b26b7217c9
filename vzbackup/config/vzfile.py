"""Read and write OpenVZ shell-style ``KEY="value"`` files without losing anything.

Every line is kept as it was (comments, blank lines, unknown keys, their order); ``set``
rewrites the one line holding a key (or appends it), ``delete`` drops it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from vzbackup.errors import ConfigError, UsageError

_KEY = r"[A-Za-z_][A-Za-z0-9_]*"
_ASSIGN = re.compile(
    rf'^\s*(?:export\s+)?({_KEY})=(?:"([^"]*)"|\'([^\']*)\'|([^\s"\'#]*))\s*(?:#.*)?$'
)
_IGNORABLE = re.compile(r"^\s*(#.*)?$")


class _Line(NamedTuple):
    """One line of the file: its text, and its key and value if it has them."""

    text: str
    key: str | None = None
    value: str | None = None


class VzFile:
    """An OpenVZ config file held as lines, with dict-like access to its keys."""

    def __init__(self, path: str | Path | None = None, text: str = "") -> None:
        self.path = Path(path) if path is not None else None
        self._lines: list[_Line] = []
        self._parse(text)

    @classmethod
    def load(cls, path: str | Path) -> VzFile:
        """Parse *path*; a malformed line raises ConfigError naming file and line number."""
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a text file ({e.reason})") from None
        return cls(path, text)

    def _parse(self, text: str) -> None:
        where = str(self.path) if self.path else "<config>"
        for lineno, raw in enumerate(text.splitlines(), 1):
            if _IGNORABLE.match(raw):
                self._lines.append(_Line(raw))
                continue
            m = _ASSIGN.match(raw)
            if not m:
                raise ConfigError(
                    f"{where}:{lineno}: malformed line {raw.strip()!r}",
                    hint='expected KEY="value" (a comment starts with #)',
                )
            value = next(v for v in m.group(2, 3, 4) if v is not None)
            self._lines.append(_Line(raw, m.group(1), value))

    def __contains__(self, key: str) -> bool:
        return any(line.key == key for line in self._lines)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The last assignment of *key* wins, as in the shell."""
        found = default
        for line in self._lines:
            if line.key == key:
                found = line.value
        return found

    def items(self) -> Iterator[tuple[str, str]]:
        """Effective (key, value) pairs in first-seen order."""
        seen: dict[str, str] = {}
        for line in self._lines:
            if line.key is not None and line.value is not None:
                seen[line.key] = line.value
        return iter(seen.items())

    def set(self, key: str, value: str) -> None:
        """Set *key*; rewrites its (last) line in place or appends a new one."""
        if not re.fullmatch(_KEY, key):
            raise UsageError(f"invalid config key {key!r}")
        if '"' in value or "\n" in value:
            raise UsageError(f"value for {key} must not contain double quotes or newlines")
        new = _Line(f'{key}="{value}"', key, value)
        idx = [i for i, line in enumerate(self._lines) if line.key == key]
        if idx:
            for i in reversed(idx[:-1]):  # keep only the last assignment
                del self._lines[i]
            self._lines[idx[-1] - (len(idx) - 1)] = new
        else:
            self._lines.append(new)

    def delete(self, key: str) -> None:
        self._lines = [line for line in self._lines if line.key != key]

    def text(self) -> str:
        return "".join(line.text + "\n" for line in self._lines)

    def save(self, path: str | Path | None = None) -> None:
        """Write atomically (temp file + rename) so a crash never leaves half a config."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path to save to")
        target.parent.mkdir(parents=True, exist_ok=True)
        import tempfile  # only writers need it (and its shutil, random)

        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.text())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.path = target
