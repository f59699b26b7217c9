"""storage.cfg: the section grammar, the one boolean rule, each type's typed options."""

from __future__ import annotations

from pathlib import Path

import pytest
from vzbackup.storage.backend import BackendError
from vzbackup.storage.options import DirOptions
from vzbackup.storage.s3options import S3Options

from vzbackup.config import storage as storage_config
from vzbackup.config.sections import parse_bool
from vzbackup.errors import ConfigError


@pytest.mark.parametrize("word", ["1", "yes", "on", "true", "YES", "True", "On"])
def test_true_words(word: str) -> None:
    assert parse_bool(word) is True


@pytest.mark.parametrize("word", ["0", "no", "off", "false", "NO", "False", "OFF"])
def test_false_words(word: str) -> None:
    assert parse_bool(word) is False


@pytest.mark.parametrize("word", ["", "2", "maybe", "y", "enabled", "-1"])
def test_anything_else_is_no_boolean(word: str) -> None:
    with pytest.raises(ValueError, match="expected 0 or 1"):
        parse_bool(word)


def load(tmp_path: Path, text: str) -> dict[str, storage_config.StorageDef]:
    cfg = tmp_path / "storage.cfg"
    cfg.write_text(text)
    return storage_config.load(cfg, tmp_path / "local")


@pytest.mark.parametrize(("word", "kept"), [("0", True), ("no", True), ("false", True),
                                            ("off", True), ("1", False), ("yes", False),
                                            ("true", False), ("on", False)])
def test_disable_follows_the_boolean_rule(tmp_path: Path, word: str, kept: bool) -> None:
    storages = load(tmp_path, f"dir: usb\n\tpath /mnt/usb\n\tdisable {word}\n")
    assert ("usb" in storages) is kept
    assert storages["local"].options == DirOptions(str(tmp_path / "local"))


@pytest.mark.parametrize(("word", "verify"), [("off", False), ("no", False), ("0", False),
                                              ("false", False), ("on", True), ("1", True)])
def test_verify_tls_off_means_off(tmp_path: Path, word: str, verify: bool,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    text = f"s3: x\n\tbucket b\n\tendpoint https://127.0.0.1:9\n\tverify-tls {word}\n"
    x = load(tmp_path, text)["x"]
    assert x.options.verify_tls is verify
    be = x.open()  # the boto3 client is built with it (no request is made)
    assert be.client._endpoint.http_session._verify is verify  # type: ignore[attr-defined]
    if verify:  # without a ca-bundle, boto3's own choice, as the AWS CLI makes it
        monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/own-ca.pem")
        be = x.open()
        assert be.client._endpoint.http_session._verify == "/etc/own-ca.pem"  # type: ignore[attr-defined]


def test_ca_bundle_is_what_boto3_verifies_against(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    text = (f"s3: own\n\tbucket b\n\tendpoint https://127.0.0.1:9\n\tca-bundle {ca}\n"
            f"s3: gone\n\tbucket b\n\tca-bundle {tmp_path / 'gone.pem'}\n")
    storages = load(tmp_path, text)
    assert storages["own"].options.ca_bundle == str(ca)
    be = storages["own"].open()  # no request is made
    assert be.client._endpoint.http_session._verify == str(ca)  # type: ignore[attr-defined]
    with pytest.raises(BackendError, match=r"ca-bundle .*gone\.pem: no readable file there"):
        storages["gone"].open()


def test_values_get_their_types(tmp_path: Path) -> None:
    text = ("dir: usb\n\tpath /mnt/usb\n\tfsync off\n"
            "s3: x\n\tbucket b\n\tretries 0\n\tconnect-timeout 1.5\n\tpath-style yes\n"
            "\taccess-key k\n\tsecret-key s\n\tobject-lock-days 7\n")
    storages = load(tmp_path, text)
    assert storages["usb"].options == DirOptions("/mnt/usb", fsync=False)
    assert storages["x"].options == S3Options(
        "b", retries=0, connect_timeout=1.5, path_style=True, access_key="k", secret_key="s",
        object_lock_days=7)
    assert storages["x"].source == f"{tmp_path / 'storage.cfg'}:4"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("dir usb\n", 1, "expected 'TYPE: NAME'"),
        ("\tpath /x\n", 1, "outside a section"),
        ("nfs: a\n\tpath /x\n", 1, "unknown storage type 'nfs'"),
        ("dir: a\n\tpath /x\ndir: a\n\tpath /y\n", 3,
         "storage 'a' defined twice (first on line 1)"),
        ("dir: a\n\tpath /x\ns3: a\n\tbucket b\n", 3, "storage 'a' defined twice"),
        ("dir: a\n\tfsync 0\n", 1, "dir storage 'a': needs a path"),
        ("s3: a\n\tendpoint http://h\n", 1, "s3 storage 'a': needs a bucket"),
        ("dir: a\n\tpath /x\n\tcolour blue\n", 3, "dir storage 'a': unknown key 'colour'"),
        ("dir: a\n\tpath /x\n\tfsync maybe\n", 3, "dir storage 'a': fsync: expected 0 or 1"),
        ("dir: a\n\tpath /x\n\tdisable maybe\n", 3, "dir storage 'a': disable: expected 0 or 1"),
        ("dir: a\n\tpath /x\n\tpath /y\n", 3, "storage 'a': 'path' given twice"),
        ("dir: a\n\tpath\n", 2, "dir storage 'a': 'path' has no value"),
        ("s3: a\n\tbucket b\n\tretries many\n", 3, "retries: expected a whole number"),
        ("s3: a\n\tbucket b\n\tread-timeout -1\n", 3, "read-timeout: expected a number"),
        ("s3: a\n\tbucket b\n\tverify-tls maybe\n", 3, "verify-tls: expected 0 or 1"),
        ("s3: a\n\tbucket b\n\taccess-key k\n", 1, "set both access-key and secret-key"),
        ("s3: a\n\tbucket b\n\tsession-token t\n", 1,
         "session-token goes with the access-key and secret-key"),
        ("s3: a\n\tbucket b\n\tprofile p\n\taccess-key k\n\tsecret-key s\n", 1,
         "set access-key and secret-key or a profile, not both"),
        ("s3: a\n\tbucket b\n\tconditional-writes maybe\n", 1, "conditional-writes is one of"),
        ("s3: a\n\tbucket b\n\tmax-connections 0\n", 1, "max-connections must be 1 or more"),
        ("s3: a\n\tbucket b\n\tobject-lock-mode COMPLIANCE\n", 1,
         "object-lock-mode goes with object-lock-days"),
        ("s3: a\n\tbucket b\n\tmultipart-chunksize 2\n", 1,
         "multipart-chunksize is S3's part size: 5 to 5120 (MiB), not 2"),
        ("s3: a\n\tbucket b\n\tca-bundle /etc/ca.pem\n\tverify-tls 0\n", 1,
         "ca-bundle is what verify-tls checks the server against"),
        ("s3: a\n\tbucket b\n\tca-bundle ca.pem\n", 1,
         "ca-bundle is an absolute path, not 'ca.pem'"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{tmp_path / 'storage.cfg'}:{line}: "), first
    assert message in first


def test_no_file_means_local_only(tmp_path: Path) -> None:
    storages = storage_config.load(tmp_path / "missing.cfg", tmp_path / "backup")
    assert list(storages) == ["local"]
    assert storages["local"].open().url == f"dir:{tmp_path / 'backup'}"
