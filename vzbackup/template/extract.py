"""Extracting an OS template into a new private area, atomically (see vzbackup.safetar)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from vzbackup.errors import ExistsError, NotFoundError, RuntimeFailure
from vzbackup.safetar import (
    ARCHIVE_ERRORS,
    IdShift,
    UnsafeMember,
    extract,
    move_up,
    open_stream,
    remove_partial,
)


def extract_template(archive: Path, dest: str | Path, *, shift: IdShift | None = None) -> None:
    """Extract the OS template *archive* into *dest* (absent or an empty directory), atomically.

    A new *dest* is built as the sibling ``<dest>.partial-<pid>`` and renamed into place. An
    existing empty *dest* (say a mounted volume or btrfs subvolume, which can't be renamed over)
    is filled from ``<dest>/.partial-<pid>`` and emptied again on failure. Either way nothing is
    left behind when extraction fails. *shift* rewrites owners on the way in (an id map).
    """
    archive = Path(archive)
    dest = Path(dest)
    if not archive.is_file():
        raise NotFoundError(f"template {archive} does not exist")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ExistsError(f"cannot extract template into {dest}: it exists and is not a directory")
    in_place = dest.is_dir()
    if in_place:
        with os.scandir(dest) as it:
            if any(True for _ in it):
                raise ExistsError(f"cannot extract template into {dest}: directory is not empty")
        tmp = dest / f".partial-{os.getpid()}"
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    remove_partial(str(tmp))  # stale leftover of a crashed run that had our pid
    try:
        try:
            tmp.mkdir(mode=0o700)
            with open_stream(archive) as stream:
                extract(stream, os.path.realpath(tmp), shift=shift)
            if in_place:
                move_up(tmp, dest)
            else:
                os.rename(tmp, dest)
        except BaseException:
            if in_place:
                for entry in os.listdir(dest):
                    remove_partial(os.path.join(dest, entry))
            else:
                remove_partial(str(tmp))
            raise
    except UnsafeMember as e:
        raise RuntimeFailure(f"template {archive} has an unsafe member {e.name}: {e}") from None
    except ARCHIVE_ERRORS as e:
        raise RuntimeFailure(f"template {archive} is corrupt: {e}") from None
    except (OSError, tarfile.TarError) as e:
        raise RuntimeFailure(f"extracting template {archive} into {dest} failed: {e}") from e
