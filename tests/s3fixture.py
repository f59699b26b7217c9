"""A real S3 server for the tests: the project's single-node Ceph RGW on loopback.

``s3_server`` (session) starts it with scripts/s3-server.sh unless it already answers, and
stops it at the end only if it started it. ``s3_bucket`` is a fresh bucket per test, emptied
(every version, bypassing governance retention) and deleted afterwards, even on failure.
Outside CI a server that can't be installed or started skips the tests; in CI it fails them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts/s3-server.sh"
PORT = int(os.environ.get("VZBACKUP_S3_PORT", "7480"))
ENDPOINT = f"http://127.0.0.1:{PORT}"
# the same server over TLS, its certificate signed by the private CA the script made
TLS_ENDPOINT = f"https://127.0.0.1:{os.environ.get('VZBACKUP_S3_TLS_PORT', '7443')}"
TLS_CA = Path(os.environ.get("VZBACKUP_S3_DIR", "/var/tmp/vzbackup-s3")) / "tls/ca.pem"
ACCESS_KEY, SECRET_KEY = "test", "testtest"
_buckets = itertools.count(1)


def _need(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"required component missing in CI: {why}")
    pytest.skip(why)


def admin_client() -> boto3.client:
    return boto3.client(
        "s3", endpoint_url=ENDPOINT, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )


def _answering() -> bool:
    return subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a running RGW."""
    _need(os.geteuid() == 0, "the S3 server needs root")
    started = False
    if not _answering():
        _need(shutil.which("radosgw") is not None, "Ceph RGW is not installed (scripts/setup.sh)")
        res = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True,
                             timeout=180)
        _need(res.returncode == 0, f"the S3 server did not start: {res.stderr.strip()}")
        started = True
    try:
        yield ENDPOINT
    finally:
        if started:
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


@dataclass
class Bucket:
    name: str
    client: object  # a boto3 S3 client with the test credentials

    def object_keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def storage_cfg(self, name: str = "s3", **extra: str) -> str:
        """A storage.cfg section for this bucket on the test server."""
        opts = {"bucket": self.name, "endpoint": ENDPOINT, "path-style": "1",
                "access-key": ACCESS_KEY, "secret-key": SECRET_KEY, **extra}
        return f"s3: {name}\n" + "".join(f"\t{k} {v}\n" for k, v in opts.items())


def empty_bucket(client: object, name: str) -> None:
    """Delete every object version and delete marker, then the bucket."""
    with contextlib.suppress(botocore.exceptions.ClientError):
        for page in client.get_paginator("list_object_versions").paginate(Bucket=name):
            for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                client.delete_object(Bucket=name, Key=v["Key"], VersionId=v["VersionId"],
                                     BypassGovernanceRetention=True)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for o in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=o["Key"])
        client.delete_bucket(Bucket=name)


def new_bucket_name() -> str:
    return f"vzt-{os.getpid()}-{next(_buckets)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[Bucket]:
    client = admin_client()
    name = new_bucket_name()
    client.create_bucket(Bucket=name)
    try:
        yield Bucket(name, client)
    finally:
        empty_bucket(client, name)


@pytest.fixture
def s3_lock_bucket(s3_server: str) -> Iterator[Bucket]:
    """A bucket created with Object Lock enabled (versioned)."""
    client = admin_client()
    name = new_bucket_name()
    client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    try:
        yield Bucket(name, client)
    finally:
        empty_bucket(client, name)
