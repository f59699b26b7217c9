"""Key files, chunk ids and the blob format (zstd, optionally AES-256-GCM).

A blob is one type byte and a payload:

- ``0x00`` + zstd frame                        (plain repository)
- ``0x01`` + 12-byte nonce + AES-256-GCM(zstd frame), the object's name as associated data

Zstd frames carry their content checksum, so opening a blob checks its plaintext
(``checks_content``). A repository names its chunks by one hash of the plaintext
(``CHUNK_IDS``): BLAKE3 (format version 3) or SHA-256 (older repositories, whose ids must
stay), keyed with a separate id key in an encrypted repository (BLAKE3's keyed mode,
HMAC-SHA256), so ids reveal nothing about the data.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path
from typing import NamedTuple

import zstandard

from vzbackup.errors import ConfigError, DamagedError

PLAIN, AESGCM_V1 = 0, 1
_PLAIN_BYTE, _AESGCM_BYTE = bytes((PLAIN,)), bytes((AESGCM_V1,))
KEY_KIND = "vzbackup-key"
ENCRYPTION = "aes-256-gcm"
# how a repository's config ("chunk_ids") names chunks; absent: SHA-256 (versions 1 and 2)
BLAKE3, SHA256 = "blake3", "sha256"
CHUNK_IDS = (BLAKE3, SHA256)


class KeyFile(NamedTuple):
    """A repository's encryption key file: the encryption and chunk-id keys."""

    enc_key: bytes
    id_key: bytes
    created: str = ""

    @property
    def fingerprint(self) -> str:
        """Identifies the key without revealing it (stored in the repository config)."""
        import hmac

        return hmac.new(self.id_key, b"vzbackup-fingerprint" + self.enc_key, "sha256").hexdigest()[
            :32
        ]

    @classmethod
    def create(cls, path: Path) -> KeyFile:
        """Write a new random key to *path* (mode 0600); refuses to overwrite one."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        key = cls(os.urandom(32), os.urandom(32), now)
        data = {
            "kind": KEY_KIND,
            "version": 1,
            "encryption": ENCRYPTION,
            "created": key.created,
            "enc_key": base64.b64encode(key.enc_key).decode(),
            "id_key": base64.b64encode(key.id_key).decode(),
            "fingerprint": key.fingerprint,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"key file {path} already exists; not overwriting it") from None
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        return key

    @classmethod
    def load(cls, path: Path) -> KeyFile:
        try:
            data = json.loads(path.read_text())
            if data.get("kind") != KEY_KIND:
                raise ValueError("not a vzbackup key file")
            key = cls(
                base64.b64decode(data["enc_key"]),
                base64.b64decode(data["id_key"]),
                data.get("created", ""),
            )
            if len(key.enc_key) != 32 or len(key.id_key) != 32:
                raise ValueError("wrong key length")
        except FileNotFoundError:
            raise ConfigError(f"key file {path} does not exist") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"key file {path} is unreadable: {e}") from None
        return key


class Codec:
    """Turns plaintext into (id, blob) and back; thread-safe."""

    def __init__(self, key: KeyFile | None, level: int = 3, chunk_ids: str = BLAKE3) -> None:
        self.key = key
        self.level = level
        self.chunk_ids = chunk_ids
        self._aead = None
        if key:  # imported when needed: most commands on a plain repository never do
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(key.enc_key)
        self._local = threading.local()

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_checksum=True)
        return c

    def _dctx(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def checks_content(self, blob: bytes | memoryview) -> bool:
        """Whether ``open`` proves *blob*'s plaintext is what was sealed: AES-GCM's tag does
        (for the name it was sealed under), and a zstd frame with a content checksum does
        (XXH64, which zstd checks as it decompresses)."""
        if not blob:
            return False
        if blob[0] == AESGCM_V1:
            return True
        if blob[0] != PLAIN:
            return False
        try:
            return zstandard.get_frame_parameters(memoryview(blob)[1:]).has_checksum
        except zstandard.ZstdError:  # not a frame: open() will say so
            return False

    def chunk_id(self, data: bytes | memoryview) -> str:
        # imported at the first chunk (an unchanged backup hashes none). BLAKE3 hashes 4x as
        # fast as SHA-256 with SHA-NI: perf of a Debian full backup, SHA-256 of the chunks
        # ~9.6 % of the CPU, BLAKE3 4.8 %
        if self.chunk_ids == BLAKE3:
            from blake3 import blake3

            return (blake3(data, key=self.key.id_key) if self.key else blake3(data)).hexdigest()
        import hashlib  # OpenSSL's: loading libcrypto costs 5-8 ms
        import hmac

        if self.key:
            return hmac.new(self.key.id_key, data, "sha256").hexdigest()
        return hashlib.sha256(data).hexdigest()

    def seal(self, name: str, data: bytes | memoryview) -> bytes:
        """Compress (and encrypt) *data*, bound to the object *name*."""
        return b"".join(self.seal_parts(name, data))

    def seal_parts(self, name: str, data: bytes | memoryview) -> tuple[bytes, bytes]:
        """``seal`` as (format byte [+ nonce], the rest): a pack joins its blobs once, so
        the blob's bytes (about a third of the plaintext) are not copied once more here."""
        frame = self._cctx().compress(data)
        if self._aead is None:
            return _PLAIN_BYTE, frame
        nonce = os.urandom(12)
        return _AESGCM_BYTE + nonce, self._aead.encrypt(nonce, frame, name.encode())

    def _decrypt(self, blob: bytes, aad: bytes, name: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(blob[1:13], blob[13:], aad)
        except InvalidTag:
            raise DamagedError(
                f"{name}: authentication failed (corrupt, or a different key)"
            ) from None

    def open(self, name: str, blob: bytes, label: str | None = None) -> bytes:
        """Inverse of seal; DamagedError if the blob is corrupt or was made with another key.

        *label* names the object in error messages (default: *name*)."""
        aad = name.encode()
        name = label or name
        if not blob:
            raise DamagedError(f"{name}: empty object")
        kind = blob[0]
        try:
            if kind == PLAIN:
                if self._aead is not None:
                    raise DamagedError(f"{name}: unencrypted object in an encrypted repository")
                frame = blob[1:]
            elif kind == AESGCM_V1:
                if self._aead is None:
                    raise DamagedError(f"{name}: encrypted object, but no key was given")
                frame = self._decrypt(blob, aad, name)
            else:
                raise DamagedError(f"{name}: unknown object format {kind}")
            return self._dctx().decompress(frame)
        except zstandard.ZstdError as e:
            raise DamagedError(f"{name}: corrupt compressed data ({e})") from None
