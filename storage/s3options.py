"""What the ``s3`` storage type takes in storage.cfg (see ``options.py``); imported when a
storage.cfg has an ``s3:`` section, free of boto3."""

from __future__ import annotations

from dataclasses import dataclass

RETRY_MODES = ("standard", "adaptive", "legacy")
CONDITIONAL_WRITES = ("auto", "yes", "no")
OBJECT_LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
PART_MIB = (5, 5120)  # S3's smallest and largest part of a multipart upload


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} is one of {', '.join(choices)}, not {value!r}")


@dataclass(frozen=True)
class S3Options:
    """``s3:`` a bucket on AWS or any S3-compatible server (see conf/storage.cfg)."""

    bucket: str
    endpoint: str | None = None  # None: AWS
    region: str = "us-east-1"
    prefix: str = ""
    path_style: bool = False
    access_key: str | None = None  # with secret_key, or neither (boto3's credential chain)
    secret_key: str | None = None
    session_token: str | None = None  # with access_key and secret_key
    profile: str | None = None  # instead of access_key and secret_key
    storage_class: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None
    max_connections: int = 16
    retries: int = 5  # botocore attempts after the first
    retry_mode: str = "standard"
    bwlimit: int = 0  # KiB/s, 0: no limit
    multipart_threshold: int = 64  # MiB
    multipart_chunksize: int = 16  # MiB, within PART_MIB
    object_lock_days: int = 0  # 0: no retention
    object_lock_mode: str | None = None  # with object_lock_days; None: GOVERNANCE
    create_bucket: bool = False
    conditional_writes: str = "auto"
    verify_tls: bool = True
    ca_bundle: str | None = None  # the CA certificates (PEM) verify-tls checks against
    connect_timeout: float = 10.0  # seconds
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if bool(self.access_key) != bool(self.secret_key):
            raise ValueError("set both access-key and secret-key, or neither (boto3's "
                             "credential chain)")
        if self.session_token and not self.access_key:
            # (boto3 would drop the token and take its chain's credentials)
            raise ValueError("session-token goes with the access-key and secret-key it was "
                             "issued with")
        if self.profile and self.access_key:
            raise ValueError("set access-key and secret-key or a profile, not both (the keys "
                             "would win over the profile's credentials)")
        _one_of("conditional-writes", self.conditional_writes, CONDITIONAL_WRITES)
        _one_of("retry-mode", self.retry_mode, RETRY_MODES)
        if self.object_lock_mode is not None:
            _one_of("object-lock-mode", self.object_lock_mode.upper(), OBJECT_LOCK_MODES)
            if not self.object_lock_days:
                raise ValueError("object-lock-mode goes with object-lock-days (no retention "
                                 "without them)")
        if self.ca_bundle and not self.verify_tls:
            raise ValueError("ca-bundle is what verify-tls checks the server against; with "
                             "verify-tls 0 nothing is checked")
        if self.ca_bundle and not self.ca_bundle.startswith("/"):
            raise ValueError(f"ca-bundle is an absolute path, not {self.ca_bundle!r}")
        for key in ("max_connections", "multipart_threshold"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key.replace('_', '-')} must be 1 or more")
        if not PART_MIB[0] <= self.multipart_chunksize <= PART_MIB[1]:
            # (boto3 would upload parts of its nearest size, and read ranges of this one)
            raise ValueError(f"multipart-chunksize is S3's part size: {PART_MIB[0]} to "
                             f"{PART_MIB[1]} (MiB), not {self.multipart_chunksize}")
