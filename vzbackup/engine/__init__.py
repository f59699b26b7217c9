"""The repository engine: content-defined chunks, snapshots, locks, GC, verify and prune.

Container-agnostic: it stores and restores file trees (plus opaque attachments such as CRIU
images) on a :mod:`vzbackup.storage` backend. The vzdump-facing job lives in
:mod:`vzbackup.backup`.
"""
