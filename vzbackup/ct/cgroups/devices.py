"""Which devices a CT may use, as a v1 whitelist and as a cgroup v2 BPF device program.

One table (:data:`DEVICE_RULES`) feeds both. cgroup v2 has no devices files: the kernel asks
a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program attached to the CT's cgroup instead. The kernel
runs that program on v1 hosts too, for the task's cgroup in a (hybrid) cgroup2 hierarchy,
in addition to the v1 whitelist; a request must pass both.

The program is a handful of instructions built from the table here and loaded with bpf(2)
(:func:`vzbackup.syscalls.bpf`). No maintained Python library loads BPF without a compiler:
BCC (python3-bpfcc) compiles C with LLVM against the running kernel's headers at run time,
which a node need not have; runc, crun and LXC likewise emit these few instructions
themselves. The program is attached with ``BPF_F_ALLOW_MULTI``: programs a CT attaches
below (systemd's ``DevicePolicy=``) run as well and can only narrow access further, since
every program on the path must allow a request. The CT cannot detach ours: bpf(2) is
denied by its seccomp filter (see :mod:`vzbackup.ct.seccomp`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from vzbackup import syscalls as S
from vzbackup.errors import RuntimeFailure

__all__ = ["DEVICE_RULES", "V1_DEVICE_RULES", "DeviceRule", "attach_program", "program"]


@dataclass(frozen=True)
class DeviceRule:
    kind: str  # "c" (character) or "b" (block)
    major: int
    minor: int | None  # None: every minor
    access: str = "rwm"  # read, write, mknod

    def v1(self) -> str:
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.kind} {self.major}:{minor} {self.access}"


# Devices a CT may use; everything else is denied.
DEVICE_RULES = (
    DeviceRule("c", 1, 3),  # null
    DeviceRule("c", 1, 5),  # zero
    DeviceRule("c", 1, 7),  # full
    DeviceRule("c", 1, 8),  # random
    DeviceRule("c", 1, 9),  # urandom
    DeviceRule("c", 5, 0),  # tty
    DeviceRule("c", 5, 1),  # console
    DeviceRule("c", 5, 2),  # ptmx
    DeviceRule("c", 136, None),  # pts
)
V1_DEVICE_RULES = tuple(r.v1() for r in DEVICE_RULES)

# --- the BPF program (include/uapi/linux/bpf.h) ------------------------------------------
_DEV_TYPE = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR
_ACCESS = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_MKNOD, _READ, _WRITE
# opcodes
_LDX_W = 0x61  # dst = *(u32 *)(src + off)
_MOV_X, _MOV_K = 0xBF, 0xB7
_RSH_K, _AND_K = 0x77, 0x57
_JNE_K = 0x55  # if dst != imm: pc += off
_EXIT = 0x95
# registers: r1 = struct bpf_cgroup_dev_ctx {u32 access_type; u32 major; u32 minor;}
_R0, _R1, _TYPE, _ACC, _MAJOR, _MINOR = 0, 1, 2, 3, 4, 5

_PROG_TYPE_CGROUP_DEVICE = 15
_ATTACH_CGROUP_DEVICE = 6
_F_ALLOW_MULTI = 2
_CMD_PROG_LOAD, _CMD_PROG_ATTACH, _CMD_PROG_QUERY = 5, 8, 16
_PROG_NAME = b"vzbackup_dev"
_LOG_SIZE = 1 << 16


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _rule_block(rule: DeviceRule) -> list[bytes]:
    """``if (type, major, minor, access) match: return 1``; a miss falls through."""
    mask = sum(_ACCESS[a] for a in rule.access)
    tests: list[tuple[int, int]] = [(_TYPE, _DEV_TYPE[rule.kind]), (_MAJOR, rule.major)]
    if rule.minor is not None:
        tests.append((_MINOR, rule.minor))
    body: list[list[bytes]] = [[_insn(_JNE_K, reg, imm=value)] for reg, value in tests]
    if mask != 7:  # the requested access must be a subset of the rule's
        body.append(
            [
                _insn(_MOV_X, _R1, _ACC),
                _insn(_AND_K, _R1, imm=~mask & 7),
                _insn(_JNE_K, _R1, imm=0),
            ]
        )
    accept = [_insn(_MOV_K, _R0, imm=1), _insn(_EXIT)]
    out: list[bytes] = []
    remaining = sum(len(b) for b in body) + len(accept)
    for step in body:
        remaining -= len(step)
        *head, jump = step
        out += head
        code, regs, _off, imm = struct.unpack("<BBhi", jump)
        out.append(struct.pack("<BBhi", code, regs, remaining, imm))  # skip to the next rule
    return out + accept


def program(rules: tuple[DeviceRule, ...] = DEVICE_RULES) -> bytes:
    """The instructions of a device program allowing exactly *rules*."""
    insns = [
        _insn(_LDX_W, _TYPE, _R1, 0),
        _insn(_MOV_X, _ACC, _TYPE),
        _insn(_RSH_K, _ACC, imm=16),
        _insn(_AND_K, _TYPE, imm=0xFFFF),
        _insn(_LDX_W, _MAJOR, _R1, 4),
        _insn(_LDX_W, _MINOR, _R1, 8),
    ]
    for rule in rules:
        insns += _rule_block(rule)
    insns += [_insn(_MOV_K, _R0, imm=0), _insn(_EXIT)]
    return b"".join(insns)


def _load(code: bytes) -> int:
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(_LOG_SIZE)
    attr = bytearray(128)
    struct.pack_into(
        "<IIQQIIQII16sII",
        attr,
        0,
        _PROG_TYPE_CGROUP_DEVICE,
        len(code) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        1,
        _LOG_SIZE,
        ctypes.addressof(log),
        0,
        0,
        _PROG_NAME,
        0,
        _ATTACH_CGROUP_DEVICE,
    )
    try:
        return S.bpf(_CMD_PROG_LOAD, attr)
    except OSError as exc:
        verifier = log.value.decode(errors="replace").strip()
        raise RuntimeFailure(
            f"cannot load the BPF device program: {exc.strerror}",
            hint=verifier[-500:] or "does the kernel have CONFIG_CGROUP_BPF?",
        ) from exc


def attached_count(cgroup_dir: str) -> int:
    """How many device programs are attached to *cgroup_dir* itself."""
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        attr = bytearray(48)
        struct.pack_into("<III", attr, 0, fd, _ATTACH_CGROUP_DEVICE, 0)
        S.bpf(_CMD_PROG_QUERY, attr)
        return struct.unpack_from("<I", attr, 24)[0]
    finally:
        os.close(fd)


def attach_program(cgroup_dir: str, rules: tuple[DeviceRule, ...] = DEVICE_RULES) -> bool:
    """Attach the device program to a cgroup2 directory unless one is there already.

    Returns True if it attached one. The cgroup holds the program: no fd stays open.
    """
    with contextlib.suppress(OSError):
        if attached_count(cgroup_dir):
            return False
    prog = _load(program(rules))
    try:
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            attr = bytearray(32)
            struct.pack_into("<IIII", attr, 0, fd, prog, _ATTACH_CGROUP_DEVICE, _F_ALLOW_MULTI)
            S.bpf(_CMD_PROG_ATTACH, attr)
        finally:
            os.close(fd)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot attach the BPF device program to {cgroup_dir}: "
            f"{errno.errorcode.get(exc.errno or 0, '?')} {exc.strerror}"
        ) from exc
    finally:
        os.close(prog)
    return True
