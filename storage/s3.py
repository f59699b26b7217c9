"""A repository in an S3 bucket (AWS, Ceph RGW, MinIO, any S3-compatible server), on botocore.

- Credentials: ``access-key``/``secret-key`` from storage.cfg, else boto3's standard chain
  (environment, shared config and ``profile``, instance role). They never appear in
  ``url``, logs or error messages.
- One client per storage, shared by every thread (clients are thread-safe), with a
  connection pool of ``max-connections``; a forked process (a restore's second) makes its
  own with ``reopened``. botocore retries throttling, 5xx and connection
  errors (``retry-mode``, ``retries`` attempts); a whole operation is retried again on top
  of that (a reset while a response body streams in is not retried by botocore).
- The client is botocore's (boto3 adds ~30 ms of imports to every command and nothing a
  client needs); objects above ``multipart-threshold`` are uploaded in parts by boto3's
  transfer manager, imported then, and downloaded by parallel ranged GETs; retained
  objects (snapshot manifests under Object Lock) are always one PutObject (Ceph keeps no
  retention on a multipart upload, and the transfer manager refuses their Content-MD5).
  Everything a repository writes is small except big manifests.
- ``put_if_absent`` is a PutObject with ``If-None-Match: *`` (412 = it exists). Servers
  that ignore the header are detected once (a probe object written twice) and then get the
  fallback in ``_claim_and_put``: claim objects with a lease, the oldest live claim wins.
  The first lock written (or ``prepare_writes``: a backup opening its repository, which it
  may create with ``put_if_absent``) starts the probe in the background: a backup takes
  its lock first and publishes its manifest with ``put_if_absent`` at its end, and finds
  the answer ready then (three round trips fewer on its critical path, even when it
  stores nothing new). Reading (a restore, a listing) takes no lock and never probes.
  A 412 after a retried request may be our own first attempt: the object's content decides.
- ``touch`` copies the object onto itself (MetadataDirective REPLACE), which sets its
  LastModified to the server's now. ``flush`` does nothing: a completed PUT is durable.
- ``remove_incomplete`` aborts multipart uploads a killed writer left behind (they hold
  storage, invisible to listings, until aborted).
- Object Lock: with ``object-lock-days N`` every snapshot manifest (``Kind.SNAPSHOT``) is
  written with a retention of N days (mode ``object-lock-mode``, GOVERNANCE by default);
  ``retained_until`` tells prune to keep it. The bucket must have been created with
  Object Lock enabled.

S3 as used here is strongly consistent (read-after-write and list-after-write), as AWS S3
and Ceph RGW are.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import botocore.exceptions as bx
import botocore.session
from botocore.auth import AUTH_TYPE_MAPS, S3SigV4Auth
from botocore.config import Config
from botocore.handlers import convert_body_to_file_like_object, set_operation_specific_signer
from vzbackup.storage.backend import (
    RETAINED_KINDS,
    Backend,
    BackendError,
    Kind,
    ObjectInfo,
    ObjectMissing,
)
from vzbackup.storage.ratelimit import Limiter
from vzbackup.storage.s3options import S3Options

T = TypeVar("T")

MiB = 1024 * 1024
CLAIM_PREFIX = "claims/"  # fallback create-if-absent (servers without If-None-Match)
CLAIM_LEASE = 120.0  # seconds after which a claim is stale
PROBE_PREFIX = "claims/probe-"
OUTER_ATTEMPTS = 3  # whole-operation retries on top of botocore's own
DELETE_BATCH = 1000  # keys per DeleteObjects request (the API's limit)

MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
              "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
NETWORK_ERRORS = (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
                  bx.ConnectTimeoutError, bx.ResponseStreamingError,
                  bx.IncompleteReadError, bx.HTTPClientError)


def _tls_reason(e: Exception) -> str:
    """What OpenSSL said, e.g. 'certificate verify failed: self-signed certificate in
    certificate chain', from botocore's SSLError text."""
    m = re.search(r"\] (.+?)(?: \(_ssl\.c:\d+\))?\)?$", str(e).split("\n")[0])
    return m.group(1) if m else type(e).__name__


class _Exists(BackendError):
    """A conditional write found the key already there (HTTP 412)."""


# a PutObject whose body's SHA-256 its caller knows (a pack: its name) is signed with it,
# not with the body hashed again (~10 ms of CPU per 16 MiB); the server checks it all the same
KNOWN_PAYLOAD_SIGNER = "vzbackup-s3v4"
_known_payload = threading.local()  # .body, .sha256: this thread's PutObject body, its hash


class _KnownPayloadAuth(S3SigV4Auth):
    """S3's SigV4, with the payload hash the caller gave for this thread's body."""

    def payload(self, request: Any) -> str:
        if request.body is not None and request.body is getattr(_known_payload, "body", None):
            return str(_known_payload.sha256)
        return str(super().payload(request))


AUTH_TYPE_MAPS[KNOWN_PAYLOAD_SIGNER] = _KnownPayloadAuth


class _AnyService:
    """Stands for the list of the services botocore has models for: any name is in it (a
    missing model then fails to load); iterated, it is the real list."""

    def __init__(self, listing: Callable[[], list[str]]) -> None:
        self.listing = listing

    def __contains__(self, name: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.listing())


def _new_session(profile: str) -> botocore.session.Session:
    """A botocore session (of *profile*, if set) whose model loader, botocore's own on its
    data path, no longer lists every service's directory (over 400, for each kind of model
    loaded: S3's model, its endpoint rules, its paginators) only to check that the one asked
    for exists: ~30 ms of CPU on a command's start."""
    session = botocore.session.Session()
    if profile:
        session.set_config_variable("profile", profile)
    loader = session.get_component("data_loader")
    listing = loader.list_available_services
    loader.list_available_services = lambda type_name: _AnyService(lambda: listing(type_name))
    return session


def _verify(o: S3Options) -> bool | str | None:
    """boto3's *verify*: the ca-bundle, False, or None: verified against boto3's own choice
    (AWS_CA_BUNDLE, the profile's ca_bundle, REQUESTS_CA_BUNDLE, else certifi's CAs)."""
    if not o.verify_tls:
        return False
    return o.ca_bundle or None


def _choose_put_signer(**kw: Any) -> Any:
    """botocore's choice of signer for a PutObject, ours where it would sign with SigV4."""
    chosen = set_operation_specific_signer(**kw)
    return KNOWN_PAYLOAD_SIGNER if chosen == "s3v4" else chosen


class S3Backend(Backend):
    """put/get/list/delete on ``BUCKET/PREFIX/KEY``; *options* are storage.cfg's s3 keys."""

    cache_metadata = True

    def __init__(self, options: S3Options, *, name: str = "",
                 session: botocore.session.Session | None = None) -> None:
        o = self.options = options
        self.name = name or o.bucket
        self.bucket = o.bucket
        self.prefix = o.prefix.strip("/") + "/" if o.prefix.strip("/") else ""
        self.endpoint = o.endpoint
        where = o.endpoint or f"AWS {o.region}"
        self.url = f"s3:{self.bucket}/{self.prefix}".rstrip("/") + f" ({where})"
        self.max_connections = self.parallel_reads = o.max_connections
        self.threshold = o.multipart_threshold * MiB
        self.part_size = o.multipart_chunksize * MiB
        self.limiter = Limiter(o.bwlimit or None)
        self.lock_days = o.object_lock_days
        self.lock_mode = (o.object_lock_mode or "GOVERNANCE").upper()
        self.conditional = {"auto": None, "yes": True, "no": False}[o.conditional_writes]
        self._probe_lock = threading.Lock()
        self._probe_start = threading.Lock()
        self._probe: Future[bool | None] | None = None  # the background probe, once started
        self._buffers = threading.local()  # .buf: an upload thread's pack buffer (put_parts)
        self.write_args: dict[str, str] = {}
        if o.storage_class:
            self.write_args["StorageClass"] = o.storage_class
        if o.sse:
            self.write_args["ServerSideEncryption"] = o.sse
        if o.sse_kms_key_id:
            self.write_args["SSEKMSKeyId"] = o.sse_kms_key_id
        config = Config(
            region_name=o.region,
            max_pool_connections=self.max_connections,
            # the first attempt and its retries (botocore's max_attempts counts retries only)
            retries={"mode": o.retry_mode, "total_max_attempts": o.retries + 1},
            s3={"addressing_style": "path" if o.path_style else "auto"},
            connect_timeout=o.connect_timeout,
            read_timeout=o.read_timeout,
            # checksums only where the API demands them: S3-compatible servers vary
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        if o.ca_bundle and not os.access(o.ca_bundle, os.R_OK):
            raise BackendError(f"S3 storage {self.name!r}: ca-bundle {o.ca_bundle}: no "
                               "readable file there")
        try:
            if session is None:
                session = _new_session(o.profile)
            self._session = session
            self.client = session.create_client(
                "s3", endpoint_url=o.endpoint or None, aws_access_key_id=o.access_key or None,
                aws_secret_access_key=o.secret_key or None,
                aws_session_token=o.session_token or None, verify=_verify(o), config=config,
            )
        except bx.ProfileNotFound:
            raise BackendError(f"S3 storage {self.name!r}: no AWS profile {o.profile!r}") from None
        self.requests = 0  # HTTP requests sent, retries included (reported per backup)
        self.client.meta.events.register("before-send.s3", self._count_request)
        # a PutObject body stays bytes: hashed for the signature in one call and sent in
        # one sendall (botocore's BytesIO went out 16 KiB per send, each send waiting for
        # the GIL: 16 MiB packs uploaded 25% slower beside a busy walk)
        self.client.meta.events.unregister("before-parameter-build.s3.PutObject",
                                           convert_body_to_file_like_object)
        self.client.meta.events.register("choose-signer.s3.PutObject", _choose_put_signer)
        self._ranges = ThreadPoolExecutor(max_workers=min(8, self.max_connections),
                                          thread_name_prefix="s3-range")
        if o.create_bucket:
            self._ensure_bucket(o.region)

    def reopened(self) -> S3Backend:
        """A new client on the same bucket, for a forked child: its own connection pool,
        threads and locks. With static keys it is made from this one's botocore session,
        which holds no connection then (its loaded models save the child ~0.1 s of CPU);
        a credential chain's providers may hold one (instance metadata), so a new session."""
        o = replace(self.options, create_bucket=False)
        session = self._session if o.access_key else None
        copy = S3Backend(o, name=self.name, session=session)
        copy.conditional = self.conditional
        return copy

    @property
    def shared_by_processes(self) -> bool:
        """Not with a bwlimit: each process would pace itself to all of it."""
        return not self.limiter.rate

    # --- plumbing ------------------------------------------------------------------------
    def _count_request(self, **_kw: object) -> None:
        self.requests += 1  # a lost update under threads only makes the report approximate

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise BackendError(f"invalid object key {key!r}")
        return self.prefix + key

    def _error(self, e: Exception, what: str) -> BackendError:
        """A clear BackendError for a boto3 failure of *what* (never holding credentials)."""
        label = f"S3 storage {self.name!r}"
        if isinstance(e, bx.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412:
                return _Exists(f"{label}: {what}: the object exists already")
            if code == "NoSuchBucket":
                return BackendError(f"{label}: bucket {self.bucket} does not exist "
                                    "(create it, or set 'create-bucket 1' in storage.cfg)")
            if code in MISSING_CODES:
                return ObjectMissing(f"{label}: no object {what}")
            if code in AUTH_CODES:
                return BackendError(f"{label}: access denied ({code}) on {what}: check the "
                                    "credentials and the bucket's permissions")
            return BackendError(f"{label}: {what} failed: {code or status} "
                                f"{e.response.get('Error', {}).get('Message') or ''}".rstrip())
        if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
            return BackendError(f"{label}: no credentials: set access-key and secret-key in "
                                "storage.cfg, or configure boto3 (environment, profile, role)")
        if isinstance(e, bx.SSLError):
            ca = self.options.ca_bundle
            check = (f"is ca-bundle {ca} the PEM certificate of the CA that signed the "
                     "server's?" if ca else "a server whose certificate a private CA "
                     "signed needs 'ca-bundle /path/to/ca.pem' in storage.cfg")
            return BackendError(f"{label}: TLS with {self.endpoint or 'AWS S3'} failed during "
                                f"{what}: {_tls_reason(e)} ({check})")
        if isinstance(e, NETWORK_ERRORS):
            where = self.endpoint or "AWS S3"
            return BackendError(f"{label}: cannot reach endpoint {where} ({type(e).__name__}) "
                                f"during {what}")
        return BackendError(f"{label}: {what} failed: {type(e).__name__}")

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run *fn*, retrying network failures botocore gave up on; map errors."""
        for attempt in range(OUTER_ATTEMPTS):
            last = attempt + 1 >= OUTER_ATTEMPTS
            try:
                return fn()
            except NETWORK_ERRORS as e:
                if last:
                    raise self._error(e, what) from None
            except bx.ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
                if status < 500 or last:
                    raise self._error(e, what) from None
            except (bx.BotoCoreError, ValueError) as e:
                raise self._error(e, what) from None
            time.sleep(min(10.0, 0.2 * 2**attempt))
        raise AssertionError("unreachable")

    def _ensure_bucket(self, region: str) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except bx.ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise self._error(e, f"bucket {self.bucket}") from None
        except bx.BotoCoreError as e:
            raise self._error(e, f"bucket {self.bucket}") from None
        args: dict[str, Any] = {"Bucket": self.bucket}
        if region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        if self.lock_days:
            args["ObjectLockEnabledForBucket"] = True
        self._call(f"creating bucket {self.bucket}", lambda: self.client.create_bucket(**args))

    def _put_args(self, key: str, data: bytes | bytearray, kind: Kind) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), **self.write_args}
        if self.lock_days and kind in RETAINED_KINDS:
            args["ObjectLockMode"] = self.lock_mode
            args["ObjectLockRetainUntilDate"] = datetime.now(UTC) + timedelta(days=self.lock_days)
            args["ContentMD5"] = base64.b64encode(hashlib.md5(data).digest()).decode()
        return args

    # --- the interface ---------------------------------------------------------------------
    def put(self, key: str, data: bytes | bytearray, kind: Kind = Kind.OTHER) -> None:
        if kind == Kind.LOCK:
            self.prepare_writes()
        args = self._put_args(key, data, kind)
        self.limiter.take(len(data))
        # retained objects: one PutObject whatever the size (Ceph applies no Object Lock
        # retention to a multipart upload)
        if len(data) < self.threshold or kind in RETAINED_KINDS:
            self._call(f"writing {key}", lambda: self.client.put_object(Body=data, **args))
            return
        from boto3.s3.inject import upload_fileobj  # boto3's transfer manager, for big objects
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(
            multipart_threshold=self.threshold, multipart_chunksize=self.part_size,
            max_concurrency=min(8, self.max_connections), use_threads=True,
        )
        bucket, name = args.pop("Bucket"), args.pop("Key")
        self._call(f"writing {key}", lambda: upload_fileobj(
            self.client, io.BytesIO(data), bucket, name, ExtraArgs=args, Config=transfer))

    def put_parts(self, key: str, parts: list[bytes], kind: Kind = Kind.OTHER,
                  sha256: str | None = None) -> None:
        data = self._joined(parts)
        _known_payload.body, _known_payload.sha256 = (data, sha256) if sha256 else (None, None)
        try:
            self.put(key, data, kind)
        finally:
            _known_payload.body = _known_payload.sha256 = None

    def _joined(self, parts: list[bytes]) -> bytearray:
        """*parts* copied into this thread's buffer, sized to them and kept for the thread's
        next pack: a new 16 MiB object costs ~12 ms of page faults (blocks that big are
        mmapped afresh, see malloc_large_with_mmap), the copy into the buffer ~2 ms."""
        buf = getattr(self._buffers, "buf", None)
        if buf is None:
            buf = self._buffers.buf = bytearray()
        size = sum(map(len, parts))
        if len(buf) > size:
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
        with memoryview(buf) as view:
            pos = 0
            for p in parts:
                view[pos : pos + len(p)] = p
                pos += len(p)
        return buf

    def prepare_writes(self) -> None:
        """Start the conditional-writes probe in the background (once)."""
        with self._probe_start:
            if self.conditional is None and self._probe is None:
                self._probe = self._ranges.submit(self._probe_quietly)

    def put_if_absent(self, key: str, data: bytes, kind: Kind = Kind.OTHER) -> bool:
        # always one PutObject, whatever the size: Ceph ignores If-None-Match on multipart
        if not self._conditional_writes():
            return self._claim_and_put(key, data, kind)
        args = self._put_args(key, data, kind)
        self.limiter.take(len(data))
        try:
            self._call(f"writing {key}",
                       lambda: self.client.put_object(Body=data, IfNoneMatch="*", **args))
            return True
        except _Exists:
            pass
        # a retried request may have met our own first attempt
        try:
            return self.get(key) == data
        except ObjectMissing:
            return False

    def _conditional_writes(self) -> bool:
        """Whether the server honours If-None-Match: * (probed once when not configured).
        Writers waiting for the answer get it before the probe object is deleted."""
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        with self._probe_lock:
            if self.conditional is not None:
                return self.conditional
            try:
                answer = self.conditional = self._probe_twice(probe)
            except BaseException:
                with contextlib.suppress(BackendError):
                    self.delete(probe)
                raise
        with contextlib.suppress(BackendError):
            self.delete(probe)
        return answer

    def _probe_twice(self, probe: str) -> bool:
        """Write *probe* twice with If-None-Match: * ; whether the second write got 412."""
        args = {"Bucket": self.bucket, "Key": self._key(probe), "IfNoneMatch": "*"}
        self._call("probing conditional writes", lambda: self.client.put_object(Body=b"1", **args))
        try:
            self.client.put_object(Body=b"2", **args)
            return False
        except bx.ClientError as e:
            return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
        except bx.BotoCoreError as e:  # the network: one clear error, as elsewhere
            raise self._error(e, "probing conditional writes") from None

    def _probe_quietly(self) -> bool | None:
        """The background probe: a failure leaves the answer unknown, and the next
        ``put_if_absent`` probes again and reports it."""
        with contextlib.suppress(BackendError):
            return self._conditional_writes()
        return None

    def _claim_and_put(self, key: str, data: bytes, kind: Kind) -> bool:
        """Create-if-absent without server support: the oldest live claim on *key* writes it.

        Each writer puts ``claims/KEY/UUID``, then lists the claims: claims older than
        CLAIM_LEASE are stale (a crashed writer) and removed; the oldest remaining one, by
        (server time, uuid), may write *key* if it still does not exist. Others wait for
        *key* to appear and report that it existed.
        """
        if self.exists(key):
            return False
        mine = f"{CLAIM_PREFIX}{key}/{uuid.uuid4().hex}"
        self.put(mine, b"")
        try:
            claims = list(self.list(f"{CLAIM_PREFIX}{key}/"))
            now = max((c.mtime for c in claims), default=time.time())
            live = []
            for c in claims:
                if c.key != mine and now - c.mtime > CLAIM_LEASE:
                    self.delete(c.key)
                else:
                    live.append(c)
            winner = min(live, key=lambda c: (c.mtime, c.key))
            if winner.key == mine:
                if self.exists(key):
                    return False
                self.put(key, data, kind)
                return True
        finally:
            self.delete(mine)
        deadline = time.monotonic() + CLAIM_LEASE
        while not self.exists(key) and time.monotonic() < deadline:
            time.sleep(0.2)
        return False

    def get(self, key: str) -> bytes:
        name = self._key(key)

        def first() -> tuple[bytes, int]:
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=name,
                                           Range=f"bytes=0-{self.threshold - 1}")
            except bx.ClientError as e:
                if e.response.get("Error", {}).get("Code") != "InvalidRange":
                    raise
                return b"", 0  # an empty object has no byte 0
            body = r["Body"].read()
            total = int(r.get("ContentRange", "/0").rsplit("/", 1)[-1] or len(body))
            return body, total

        head, total = self._call(f"reading {key}", first)
        self.limiter.take(len(head))
        if total <= len(head):
            return head
        return head + self._get_ranges(key, name, len(head), total)

    def _get_ranges(self, key: str, name: str, start: int, total: int) -> bytes:
        """Bytes [start, total) of a large object by parallel ranged GETs."""

        def part(lo: int) -> bytes:
            hi = min(total, lo + self.part_size) - 1
            data = self._call(f"reading {key}", lambda: self.client.get_object(
                Bucket=self.bucket, Key=name, Range=f"bytes={lo}-{hi}")["Body"].read())
            if len(data) != hi - lo + 1:
                raise BackendError(f"S3 storage {self.name!r}: {key} changed while read")
            self.limiter.take(len(data))
            return data

        return b"".join(self._ranges.map(part, range(start, total, self.part_size)))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        name = self._key(key)
        if length <= 0:
            return b""

        def read() -> bytes:
            r = self.client.get_object(Bucket=self.bucket, Key=name,
                                       Range=f"bytes={offset}-{offset + length - 1}")
            return r["Body"].read()

        data = self._call(f"reading {key}", read)
        if len(data) != length:
            raise BackendError(f"S3 storage {self.name!r}: {key} is shorter than expected")
        self.limiter.take(len(data))
        return data

    def remove_incomplete(self, older_than: float) -> list[str]:
        removed = []
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        try:
            for page in pages:
                for up in page.get("Uploads", []):
                    if up["Initiated"].timestamp() >= older_than:
                        continue
                    key, upload_id = up["Key"], up["UploadId"]
                    self._call(f"aborting the upload of {key}", lambda k=key, u=upload_id:
                               self.client.abort_multipart_upload(
                                   Bucket=self.bucket, Key=k, UploadId=u))
                    removed.append(key[len(self.prefix):])
        except (bx.ClientError, bx.BotoCoreError) as e:
            raise self._error(e, "listing multipart uploads") from None
        return removed

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix)
        cut = len(self.prefix)
        try:
            for page in pages:
                for o in page.get("Contents", []):
                    yield ObjectInfo(o["Key"][cut:], int(o["Size"]),
                                     o["LastModified"].timestamp())
        except (bx.ClientError, bx.BotoCoreError) as e:
            raise self._error(e, f"listing {prefix or '/'}") from None

    def delete(self, key: str) -> None:
        name = self._key(key)
        self._call(f"deleting {key}",
                   lambda: self.client.delete_object(Bucket=self.bucket, Key=name))

    def delete_many(self, keys: Iterable[str]) -> None:
        names = [self._key(k) for k in keys]
        for n in range(0, len(names), DELETE_BATCH):
            batch = {"Objects": [{"Key": k} for k in names[n : n + DELETE_BATCH]], "Quiet": True}
            r = self._call(f"deleting {len(batch['Objects'])} objects", lambda b=batch:
                           self.client.delete_objects(Bucket=self.bucket, Delete=b))
            failed = [e for e in r.get("Errors", []) if e.get("Code") not in MISSING_CODES]
            if failed:
                e = failed[0]
                raise BackendError(f"S3 storage {self.name!r}: deleting "
                                   f"{e.get('Key', '')[len(self.prefix):]} failed: "
                                   f"{e.get('Code')} {e.get('Message') or ''}".rstrip())

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except ObjectMissing:
            return False

    def stat(self, key: str) -> ObjectInfo:
        name = self._key(key)
        r = self._call(key, lambda: self.client.head_object(Bucket=self.bucket, Key=name))
        return ObjectInfo(key, int(r["ContentLength"]), r["LastModified"].timestamp())

    def touch(self, key: str) -> None:
        name = self._key(key)
        self._call(f"touching {key}", lambda: self.client.copy_object(
            Bucket=self.bucket, Key=name, CopySource={"Bucket": self.bucket, "Key": name},
            MetadataDirective="REPLACE", Metadata={"touched": str(time.time())},
            **self.write_args))

    def retained_until(self, key: str) -> float | None:
        if not self.lock_days:
            return None
        name = self._key(key)
        r = self._call(key, lambda: self.client.head_object(Bucket=self.bucket, Key=name))
        until = r.get("ObjectLockRetainUntilDate")
        return until.timestamp() if until else None

    def close(self) -> None:
        if self._probe is not None and not self._probe.cancel():
            self._probe.result()  # never leave its probe object behind
        self._ranges.shutdown(wait=False, cancel_futures=True)
        self.client.close()
