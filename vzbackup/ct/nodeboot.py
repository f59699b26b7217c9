"""The node's boot and shutdown: every CT, in vzctl's BOOTORDER, the same order in parallel.

boot: the CTs with ``ONBOOT="yes"``, highest ``BOOTORDER`` first (CTs without one last); a CT
with a checkpoint in ``DUMPDIR/Dump.CTID`` is restored, others start fresh. shutdown: every
running CT in the reverse order; with ``VE_STOP_MODE="suspend"`` (CTID.conf, else vz.conf) an
ONBOOT CT is checkpointed (so boot brings its processes back), others halt cleanly. A failed
checkpoint or restore falls back to a clean stop or a fresh start, logged.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from vzbackup import constants as C
from vzbackup import errors as E
from vzbackup.config.node import Node
from vzbackup.ct import ops, registry
from vzbackup.ct.container import Container

log = logging.getLogger("vzbackup.nodeboot")

STOP_MODES = ("stop", "suspend")
FAILED_IMAGES = ".failed"  # Dump.CTID.failed: images a restore at boot failed on, kept to look at
OLD_IMAGES = ".old"  # Dump.CTID.old: images left over from an earlier chkpnt of a running CT


@dataclass
class Step:
    """What happened to one CT; *at* and *seconds* are relative to the start of the run."""

    ctid: int
    bootorder: int | None
    action: str  # started | restored | running (already) | checkpointed | stopped | failed
    ok: bool = True
    fallback: str = ""  # why the checkpoint or restore was given up for a stop or a start
    error: str = ""
    at: float = 0.0
    seconds: float = 0.0


def bootorder(ct: Container) -> int | None:
    value = ct.conf.get("BOOTORDER")
    return int(value) if value else None


def stop_mode(ct: Container) -> str:
    mode = ct.setting("VE_STOP_MODE", ct.conf)
    if mode not in STOP_MODES:
        raise E.ConfigError(f"VE_STOP_MODE={mode!r} (CT {ct.ctid} or vz.conf): use stop or suspend")
    return mode


def onboot(ct: Container) -> bool:
    return ct.conf.get("ONBOOT") == "yes"


def _order_key(ct: Container) -> int:
    order = bootorder(ct)
    return -1 if order is None else order  # no BOOTORDER: after every CT that has one


def waves(cts: list[Container], *, boot: bool) -> list[list[Container]]:
    """CTs grouped by BOOTORDER: highest first at boot, lowest (and none) first at shutdown."""
    ordered = sorted(cts, key=_order_key, reverse=boot)
    return [list(g) for _, g in groupby(ordered, key=_order_key)]


def _images(ct: Container) -> Path:
    return ct.node.dumpdir / C.CRIU_IMAGE_SUBDIR.format(ctid=ct.ctid)


def _set_aside(ct: Container, suffix: str) -> str:
    images = _images(ct)
    aside = images.with_name(images.name + suffix)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(images, aside)
    return str(aside)


class NodeRun:
    """One boot or shutdown of the node: waves in order, the CTs of a wave in parallel."""

    def __init__(self, node: Node, *, parallel: int, stop_timeout: float | None = None,
                 say: Callable[[str], None] = lambda _m: None) -> None:
        self.node = node
        self.parallel = max(1, parallel)
        self.stop_timeout = stop_timeout
        self.say = say
        self.t0 = time.monotonic()

    def _run(self, pick: Callable[[Container], bool], *, boot: bool,
             one: Callable[[Container, Step], None]) -> list[Step]:
        """Run *one* for every CT *pick* chooses, wave by wave; a CT whose config can't be
        read is reported and the others go on."""
        steps: list[Step] = []
        cts = []
        for ctid in registry.list_ctids(self.node):
            ct = Container(self.node, ctid)
            try:
                if pick(ct):
                    bootorder(ct)  # read now: the waves are sorted by it
                    cts.append(ct)
            except (E.VzError, ValueError) as e:
                steps.append(Step(ctid, None, "failed", ok=False, error=str(e)))
                log.error("CT %s: %s", ctid, e)
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="nodeboot") as pool:
            for wave in waves(cts, boot=boot):
                steps += pool.map(lambda ct: self._step(ct, one), wave)
        return steps

    def _step(self, ct: Container, one: Callable[[Container, Step], None]) -> Step:
        step = Step(ct.ctid, None, "failed", at=time.monotonic() - self.t0)
        try:
            step.bootorder = bootorder(ct)
            one(ct, step)
        except Exception as e:  # one CT's failure, whatever it is, never stops the others
            step.ok, step.action, step.error = False, "failed", str(e) or type(e).__name__
            log.error("CT %s: %s", ct.ctid, step.error, exc_info=not isinstance(e, E.VzError))
        step.seconds = time.monotonic() - self.t0 - step.at
        self.say(f"CT {ct.ctid}: {step.action}" + (f" ({step.fallback})" if step.fallback else "")
                 + (f": {step.error}" if step.error else ""))
        return step

    # ------------------------------------------------------------------ boot
    def boot(self) -> list[Step]:
        """Start or restore every ONBOOT CT that isn't running."""
        return self._run(lambda ct: onboot(ct) and not ct.running, boot=True,
                         one=self._bring_up)

    def _bring_up(self, ct: Container, step: Step) -> None:
        with ct.lock():
            if ct.running:  # started by someone else meanwhile
                step.action = "running"
                return
            if (_images(ct) / "inventory.img").exists():
                try:
                    ops.restore(ct)
                    step.action = "restored"
                    return
                except E.VzError as e:
                    aside = _set_aside(ct, FAILED_IMAGES)
                    step.fallback = f"restore failed, started fresh: {e} (images in {aside})"
                    log.warning("CT %s: restore failed (%s); its images moved to %s, starting "
                                "it fresh", ct.ctid, e, aside)
            ops.start(ct)
            step.action = "started"

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> list[Step]:
        """Checkpoint (VE_STOP_MODE=suspend, ONBOOT CTs) or stop every running CT."""
        return self._run(lambda ct: ct.running, boot=False, one=self._bring_down)

    def _bring_down(self, ct: Container, step: Step) -> None:
        if stop_mode(ct) == "suspend" and onboot(ct):
            try:
                self._checkpoint(ct)
                step.action = "checkpointed"
                return
            except E.VzError as e:
                step.fallback = f"checkpoint failed, stopped cleanly: {e}"
                log.warning("CT %s: checkpoint failed (%s); stopping it cleanly", ct.ctid, e)
        with ct.lock():
            if ct.running:
                ops.stop(ct, timeout=self.stop_timeout)
        step.action = "stopped"

    def _checkpoint(self, ct: Container) -> None:
        images = _images(ct)
        if images.is_dir() and any(images.iterdir()):
            log.warning("CT %s: images of an earlier checkpoint moved to %s", ct.ctid,
                        _set_aside(ct, OLD_IMAGES))
        ops.chkpnt(ct)


def as_dict(steps: list[Step]) -> dict[str, Any]:
    return {
        "cts": [{**asdict(s), "at": round(s.at, 3), "seconds": round(s.seconds, 3)}
                for s in steps],
        "failed": sum(not s.ok for s in steps),
    }
