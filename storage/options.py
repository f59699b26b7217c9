"""What each storage type takes in storage.cfg: one dataclass per type, validating itself.

A field is a key of the type's section (``_`` written ``-``); a field without a default is
required. ``vzbackup.config.storage`` reads the text into these (types, booleans,
``file:line`` errors); a backend receives them ready. Kept free of boto3 so a config
validates without importing it. The ``s3`` type's are in ``s3options.py``: a dataclass of
25 fields takes ~2 ms to create, which a backup to a directory need not pay.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DirOptions:
    """``dir:`` a directory (local disk, NFS, CIFS, USB)."""

    path: str
    fsync: bool = True  # sync objects before a snapshot is published
