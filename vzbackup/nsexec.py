"""Run a node tool inside namespaces of a CT's task (``nsenter``): the one place that builds
the command line, with a timeout and a clear error when nsenter or the tool is missing.

The tool is the node's binary (``ip``, ``nft``, ``iptables``...), not the CT's: only the
namespaces named are entered, never the CT's root. *as_ct* enters the CT's user namespace too,
so the tool runs as the CT's root and can do only what the tenant could do itself.
"""

from __future__ import annotations

import os
import subprocess

from vzbackup.errors import DependencyError, RuntimeFailure

NS_TIMEOUT = 30  # seconds: these tools answer in milliseconds; a hang is a failure


def ns_argv(pid: int, *kinds: str, as_ct: bool = False) -> list[str]:
    """``nsenter`` with the namespaces *kinds* (``net``, ``ipc``...) of host *pid*; *as_ct*:
    its user namespace too, when it has its own."""
    argv = ["nsenter", *(f"--{kind}=/proc/{pid}/ns/{kind}" for kind in kinds)]
    if as_ct and os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user"):
        argv.insert(1, f"--user=/proc/{pid}/ns/user")
    return argv


def run_in_ns(pid: int, kinds: tuple[str, ...], argv: list[str], *, stdin: str | None = None,
              as_ct: bool = False, timeout: float = NS_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run *argv* in the namespaces *kinds* of host *pid*; the exit status is the caller's
    to judge. A missing nsenter or tool is a DependencyError, a hang a RuntimeFailure."""
    cmd = [*ns_argv(pid, *kinds, as_ct=as_ct), *argv]
    try:
        res = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                             timeout=timeout, check=False)
    except FileNotFoundError:
        raise DependencyError("nsenter is missing", hint="apt-get install util-linux") from None
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"{argv[0]} in the namespaces of pid {pid} hung "
                             f"({timeout:.0f} s)") from None
    if res.returncode == 127 and "No such file" in res.stderr:
        raise DependencyError(f"{argv[0]} is missing on this node", hint=res.stderr.strip())
    return res
