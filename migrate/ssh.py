"""SSH control channel to the destination node (paramiko), with OpenSSH-like host key checks.

Host keys are verified against known_hosts: an unknown key is refused unless ``accept_new``
(OpenSSH ``StrictHostKeyChecking=accept-new``), which records it; a changed key is always
refused, naming the known_hosts line that holds the old one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import select
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from paramiko.hostkeys import HostKeyEntry, HostKeys, InvalidHostKey

from vzbackup.errors import RemoteNodeError, RuntimeFailure, UsageError
from vzbackup.syscalls import pid_alive

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
KEEPALIVE = 15
DEAD_PEER_SECONDS = 30  # TCP_USER_TIMEOUT of the control connection
# OpenSSH client for bulk data: AES-GCM first (AES-NI makes it the fastest here), one master
# connection per session that ends by itself when idle if we die without closing it
OPENSSH_CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com"
OPENSSH_PERSIST = 60
CONTROL_DIR_PREFIX = "vzb-ssh-"  # + PID + "-": a master connection's socket directory
SUPPORTED_OPTS = ("UserKnownHostsFile", "ConnectTimeout", "ServerAliveInterval",
                  "StrictHostKeyChecking", "IdentityFile", "Port", "User")


class UnreachableError(RemoteNodeError):
    """No SSH connection to host:port (network, refused, timeout, handshake)."""


class AuthError(RemoteNodeError):
    """The SSH server rejected every key we offered."""


class HostKeyError(RemoteNodeError):
    """The host key is unknown (and not accepted) or differs from known_hosts."""


@dataclass
class SSHTarget:
    """Where and how to connect: ``[user@]host``, port, key, known_hosts and ssh options."""

    host: str
    user: str = "root"
    port: int = 22
    key_filename: str | None = None
    known_hosts: str | None = None
    accept_new: bool = False
    options: dict[str, str] = field(default_factory=dict)
    remote_vzbackup: list[str] = field(default_factory=lambda: ["vzbackup"])

    @classmethod
    def parse(
        cls, dest: str, *, port: int | None = None, key: str | None = None,
        opts: list[str] | tuple = (),
    ) -> SSHTarget:
        """Build a target from ``[user@]host`` plus ``--ssh-port/--ssh-key/--ssh-opt`` values;
        a setting given twice (user@ and User, --ssh-port and Port, --ssh-key and
        IdentityFile) must agree."""
        user, _, host = dest.rpartition("@")
        if not host or any(c.isspace() for c in dest) or host.startswith("-"):
            raise UsageError(f"invalid destination {dest!r}", hint="use [user@]host")
        t = cls(host=host.strip("[]"), user=user or "root", port=port or 22, key_filename=key)
        for opt in opts:
            k, sep, v = opt.partition("=")
            if not sep or not v:
                raise UsageError(f"invalid --ssh-opt {opt!r}", hint="use KEY=VALUE")
            name = next((s for s in SUPPORTED_OPTS if s.lower() == k.strip().lower()), None)
            if name is None:
                raise UsageError(f"unsupported --ssh-opt {k!r}",
                                 hint="supported: " + ", ".join(SUPPORTED_OPTS))
            t.options[name] = v.strip()
        for given, name in ((user, "User"), (port, "Port"), (key, "IdentityFile")):
            if given and name in t.options and str(given) != t.options[name]:
                raise UsageError(f"{given} and --ssh-opt {name}={t.options[name]} disagree",
                                 hint=f"give the {name.lower()} once")
        t._apply_options()
        return t

    def _apply_options(self) -> None:
        o = self.options
        if "UserKnownHostsFile" in o:
            self.known_hosts = o["UserKnownHostsFile"]
        if "IdentityFile" in o:
            self.key_filename = o["IdentityFile"]
        if "User" in o:
            self.user = o["User"]
        for num in ("Port", "ConnectTimeout", "ServerAliveInterval"):
            if num in o and not o[num].isdigit():
                raise UsageError(f"--ssh-opt {num}={o[num]!r}: not a whole number")
        if "Port" in o:
            self.port = int(o["Port"])
        strict = o.get("StrictHostKeyChecking", "yes").lower()
        if strict not in ("yes", "accept-new"):
            raise UsageError(f"--ssh-opt StrictHostKeyChecking={strict!r} is not allowed",
                             hint="use yes or accept-new (a changed key is never accepted)")
        self.accept_new = self.accept_new or strict == "accept-new"

    @property
    def hostname_key(self) -> str:
        """The host's name as written in known_hosts (``[host]:port`` off port 22)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def known_hosts_files(self) -> tuple[Path, list[Path]]:
        """The user file (written by accept_new) and every file consulted."""
        user = Path(os.path.expanduser(self.known_hosts or DEFAULT_KNOWN_HOSTS))
        return user, [user] if self.known_hosts else [user, Path(GLOBAL_KNOWN_HOSTS)]


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _host_matches(pattern_list: list[str], name: str) -> bool:
    for pat in pattern_list:
        if pat.startswith("|1|"):
            salt = pat.split("|")[2]
            if HostKeys.hash_host(name, salt) == pat:
                return True
        elif pat == name:
            return True
    return False


def known_entries(files: list[Path], name: str) -> list[tuple[Path, int, paramiko.PKey]]:
    """``(file, line number, key)`` of every known_hosts entry for *name*."""
    out = []
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for no, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith(("#", "@")):
                continue
            try:
                entry = HostKeyEntry.from_line(line, no)
            except (InvalidHostKey, ValueError, IndexError):
                continue
            if entry is not None and _host_matches(entry.hostnames, name):
                out.append((path, no, entry.key))
    return out


def _load_key(path: str) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(os.path.expanduser(path))
    except FileNotFoundError:
        raise AuthError(f"SSH key {path} does not exist") from None
    except paramiko.PasswordRequiredException:
        raise AuthError(f"SSH key {path} is encrypted",
                        hint="load it into ssh-agent, or use a key without passphrase") from None
    except (paramiko.SSHException, OSError, ValueError) as e:
        raise AuthError(f"SSH key {path} can't be loaded: {e}") from None


class Session:
    """One authenticated SSH connection; commands run on exec channels of its transport."""

    def __init__(self, target: SSHTarget, *, timeout: float = 10) -> None:
        self.target = target
        self.timeout = float(target.options.get("ConnectTimeout", timeout))
        self._transport: paramiko.Transport | None = None
        self._control_dir: str | None = None

    # ----------------------------------------------------------------- connect

    def connect(self) -> Session:
        """Connect, verify the host key, authenticate; raise a RemoteNodeError on failure."""
        t = self.target
        where = f"{t.host}:{t.port}"
        try:
            sock = socket.create_connection((t.host, t.port), timeout=self.timeout)
        except socket.gaierror as e:
            raise UnreachableError(f"cannot resolve {t.host}: {e.strerror}") from None
        except TimeoutError:
            raise UnreachableError(f"{where}: connection timed out after {self.timeout:g}s",
                                   hint="check the address, port and firewall") from None
        except OSError as e:
            raise UnreachableError(f"{where}: {e.strerror or e}",
                                   hint="is sshd running there and the port right?") from None
        # A dead peer must fail the session, not hang it: unacknowledged data (keepalives
        # included) aborts the connection after DEAD_PEER_SECONDS.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_PEER_SECONDS * 1000)
        transport = paramiko.Transport(sock)
        try:
            _, files = t.known_hosts_files()
            known = known_entries(files, t.hostname_key)
            self._prefer_known_key_types(transport, known)
            try:
                transport.start_client(timeout=self.timeout)
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise UnreachableError(f"{where}: SSH handshake failed: {e}") from None
            self._verify_host_key(transport.get_remote_server_key(), known)
            self._authenticate(transport)
            transport.set_keepalive(int(t.options.get("ServerAliveInterval", KEEPALIVE)))
        except BaseException:
            transport.close()
            raise
        self._transport = transport
        return self

    @staticmethod
    def _prefer_known_key_types(transport: paramiko.Transport, known: list) -> None:
        opts = transport.get_security_options()
        mine = [k.get_name() for _, _, k in known if k.get_name() in opts.key_types]
        if mine:
            first = list(dict.fromkeys(mine))
            opts.key_types = first + [k for k in opts.key_types if k not in first]

    def _verify_host_key(self, key: paramiko.PKey, known: list) -> None:
        t = self.target
        name, fp = t.hostname_key, fingerprint(key)
        if any(k == key for _, _, k in known):
            return
        if known:
            path, no, old = known[0]
            raise HostKeyError(
                f"REMOTE HOST KEY CHANGED for {name}: it offers {key.get_name()} {fp}, "
                f"but {path}:{no} holds {old.get_name()} {fingerprint(old)}; refusing to connect",
                hint="this may be a man-in-the-middle attack; if the new key is legitimate, "
                f"remove the old one: ssh-keygen -R {shlex.quote(name)} -f {path}",
            )
        user_file, _ = t.known_hosts_files()
        if not t.accept_new:
            raise HostKeyError(
                f"unknown host key for {name}: {key.get_name()} {fp} (not in {user_file})",
                hint="verify the fingerprint on the node (ssh-keygen -lf "
                "/etc/ssh/ssh_host_*_key.pub), then rerun with --ssh-opt "
                f"StrictHostKeyChecking=accept-new or add it to {user_file}",
            )
        user_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(user_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{name} {key.get_name()} {key.get_base64()}\n")

    def _keys(self) -> list[paramiko.PKey]:
        t = self.target
        if t.key_filename:
            return [_load_key(t.key_filename)]
        keys: list[paramiko.PKey] = list(paramiko.Agent().get_keys())
        for p in DEFAULT_IDENTITIES:
            if os.path.exists(os.path.expanduser(p)):
                try:
                    keys.append(_load_key(p))
                except AuthError:
                    continue
        return keys

    def _authenticate(self, transport: paramiko.Transport) -> None:
        t = self.target
        keys = self._keys()
        for key in keys:
            try:
                transport.auth_publickey(t.user, key)
            except paramiko.AuthenticationException:
                continue
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise UnreachableError(f"{t.host}:{t.port}: connection lost while "
                                       f"authenticating: {e}") from None
            if transport.is_authenticated():
                return
        offered = t.key_filename or ("agent + " + ", ".join(DEFAULT_IDENTITIES))
        raise AuthError(
            f"authentication as {t.user}@{t.host} failed (offered: {offered})",
            hint="add the public key to the node's authorized_keys, or pass --ssh-key",
        )

    # ----------------------------------------------------------------- use

    @property
    def transport(self) -> paramiko.Transport:
        if self._transport is None:
            raise RuntimeFailure("SSH session is not connected")
        return self._transport

    def alive(self) -> bool:
        return self._transport is not None and self._transport.is_active()

    def close(self) -> None:
        self._close_openssh()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def openssh_command(self) -> list[str] | None:
        """``ssh ...`` (no host) for tools like rsync, checking the host key against the same
        known_hosts files as this session and sharing one master connection; None without
        an OpenSSH client."""
        ssh = shutil.which("ssh")
        if ssh is None:
            return None
        t = self.target
        if self._control_dir is None:
            self._control_dir = _new_control_dir()
        user_file, files = t.known_hosts_files()
        global_file = str(files[1]) if len(files) > 1 else "/dev/null"
        argv = [ssh, "-p", str(t.port), "-l", t.user, "-c", OPENSSH_CIPHERS,
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={user_file}",
                "-o", f"GlobalKnownHostsFile={global_file}",
                "-o", f"ConnectTimeout={int(self.timeout)}",
                "-o", f"ServerAliveInterval={t.options.get('ServerAliveInterval', KEEPALIVE)}",
                "-o", "ControlMaster=auto", "-o", f"ControlPersist={OPENSSH_PERSIST}",
                "-o", f"ControlPath={self._control_dir}/cm"]
        if t.key_filename:
            argv += ["-i", os.path.expanduser(t.key_filename), "-o", "IdentitiesOnly=yes"]
        return argv

    def _close_openssh(self) -> None:
        if self._control_dir is not None:
            _remove_control_dir(self._control_dir)
            self._control_dir = None

    def __enter__(self) -> Session:
        return self if self.alive() else self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_exec(self, argv: list[str]) -> paramiko.Channel:
        """Start *argv* (shell-quoted) on a new exec channel and return the channel."""
        try:
            chan = self.transport.open_session(timeout=self.timeout)
            chan.exec_command(shlex.join(argv))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise UnreachableError(f"{self.target.host}: SSH connection lost: {e}") from None
        return chan

    def run(
        self,
        argv: list[str],
        *,
        input_: bytes | None = None,
        timeout: float | None = 60,
        check: bool = True,
    ) -> tuple[int, bytes, bytes]:
        """Run *argv* remotely; ``(exit status, stdout, stderr)``.

        With *check*, a non-zero status raises RuntimeFailure quoting the stderr tail.
        """
        chan = self.open_exec(argv)
        writer = threading.Thread(target=_feed, args=(chan, input_ or b""), daemon=True)
        writer.start()
        out, err = bytearray(), bytearray()
        try:
            for is_err, data in self.iter_output(chan, timeout=timeout, what=shlex.join(argv)):
                (err if is_err else out).extend(data)
        finally:
            chan.close()
        rc = chan.recv_exit_status()
        if rc == -1 and not self.transport.is_active():
            raise UnreachableError(f"{self.target.host}: SSH connection lost while running "
                                   f"{shlex.join(argv)}")
        if check and rc != 0:
            tail = err.decode(errors="replace").strip()[-2000:]
            raise RuntimeFailure(f"{self.target.host}: {shlex.join(argv)} exited with {rc}"
                                 + (f": {tail}" if tail else ""))
        return rc, bytes(out), bytes(err)

    def iter_output(
        self, chan: paramiko.Channel, *, timeout: float | None = None, what: str = "command"
    ) -> Iterator[tuple[bool, bytes]]:
        """Yield ``(is_stderr, data)`` from *chan* until the command exited and all output
        arrived; UnreachableError if the connection drops, RuntimeFailure after *timeout*."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while chan.recv_ready():
                yield False, chan.recv(1 << 16)
            while chan.recv_stderr_ready():
                yield True, chan.recv_stderr(1 << 16)
            # sshd may send the exit status before the last output: wait for EOF too
            done = (chan.eof_received or chan.closed) and chan.exit_status_ready()
            if done and not (chan.recv_ready() or chan.recv_stderr_ready()):
                return
            if chan.closed or not self.transport.is_active():
                raise UnreachableError(f"{self.target.host}: SSH connection lost while "
                                       f"running {what}")
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeFailure(f"{self.target.host}: {what} timed out after {timeout:g}s")
            select.select([chan], [], [], 0.5)

    def vzbackup(self, *args: str, **kw) -> tuple[int, bytes, bytes]:
        """Run the remote node's ``vzbackup ARGS`` (see run())."""
        return self.run([*self.target.remote_vzbackup, *args], **kw)


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    """Send *data* to the channel's stdin, then EOF (ignoring a channel closed meanwhile)."""
    try:
        if data:
            chan.sendall(data)
        chan.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        return


def _new_control_dir() -> str:
    """A new directory (0700) for the OpenSSH master's socket, named with this PID; first
    those left by processes killed before they closed theirs are removed, their masters
    told to exit (a migration killed with -9 left one in the temp directory for good)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        pid = name.removeprefix(CONTROL_DIR_PREFIX).split("-")[0]
        if not name.startswith(CONTROL_DIR_PREFIX) or not pid.isdigit() or pid_alive(int(pid)):
            continue
        path = os.path.join(tmp, name)
        with contextlib.suppress(OSError):  # (another process' sweep got there first)
            if os.stat(path, follow_symlinks=False).st_uid == os.geteuid():
                _remove_control_dir(path)
    return tempfile.mkdtemp(prefix=f"{CONTROL_DIR_PREFIX}{os.getpid()}-")


def _remove_control_dir(path: str) -> None:
    """Tell the master listening in *path* (if any) to exit, then remove *path*."""
    ctl = f"{path}/cm"
    if os.path.exists(ctl):
        subprocess.run(["ssh", "-o", f"ControlPath={ctl}", "-O", "exit", "x"],
                       capture_output=True, timeout=30, check=False)
    shutil.rmtree(path, ignore_errors=True)
