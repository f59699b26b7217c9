"""Errors with the exit codes the CLI returns; every user-facing failure is one of these."""

from __future__ import annotations


class VzError(Exception):
    """Base class: a clear message for the user and a meaningful exit code."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class UsageError(VzError):
    """Bad argument on the command line (malformed CTID, unknown option value)."""

    exit_code = 2


class ConfigError(VzError):
    """A config file can't be parsed or holds an invalid value."""

    exit_code = 3


class NotFoundError(VzError):
    """The CT, template, dump or name does not exist."""

    exit_code = 4


class ExistsError(VzError):
    """The CTID or name is already taken."""

    exit_code = 5


class StateError(VzError):
    """The CT is in the wrong state for the operation (running/stopped/mounted)."""

    exit_code = 6


class LockedError(VzError):
    """Another operation holds the CT or repository lock."""

    exit_code = 7


class NotRootError(VzError):
    """Must be root (or lacks a capability)."""

    exit_code = 8


class DependencyError(VzError):
    """A required tool is missing or too old (CRIU, ip, ...)."""

    exit_code = 9


class RuntimeFailure(VzError):
    """The kernel or a helper tool failed while doing the work."""

    exit_code = 10


class CheckpointError(VzError):
    """CRIU dump or restore failed."""

    exit_code = 11


class DamagedError(VzError):
    """Backup data is corrupt or missing: a chunk fails its hash, an object can't be read."""

    exit_code = 12


class StorageError(VzError):
    """The backup storage can't be reached or written (permissions, full disk, network)."""

    exit_code = 13


class RemoteNodeError(VzError):
    """The remote node can't be reached, authenticated or trusted, or its side failed."""

    exit_code = 14
