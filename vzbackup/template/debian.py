"""Build Debian OS templates with mmdebstrap: ``debian-12-x86_64`` -> ``cache/NAME.tar.zst``.

The name says what is built, OpenVZ style: ``debian-<release>-<arch>[-<flavour>]``. The root
filesystem is Debian's minbase plus systemd-sysv, iproute2 and a package list, with three
changes every CT needs (a customize hook, listed in the recipe): no SSH host keys (a unit makes
them on first boot, so CTs never share keys), an empty machine-id (systemd makes one per CT),
no copy of the build host's resolv.conf or hostname. mmdebstrap writes the tarball with
numeric owners, sorted names and mtimes clamped to TEMPLATE_EPOCH, so the same package
versions give the same bytes. It is built under a hidden name and renamed into place; the
recipe (``NAME.tar.zst.json``) records the inputs, and a second build of the same inputs
returns at once.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vzbackup import constants as C
from vzbackup.errors import DependencyError, ExistsError, RuntimeFailure, UsageError
from vzbackup.lock import Lock
from vzbackup.template.cache import check_name, read_recipe

_NAME = re.compile(
    r"debian-(?P<release>[0-9]+)-(?P<arch>x86_64)(?:-(?P<flavour>[A-Za-z0-9.+_-]+))?"
)
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.:=/~-]*")
_MIRROR = re.compile(r"(https?|file)://\S+")
BUILD_WAIT = 3600  # seconds a second build of the same name waits for the first

# Runs in the build host with the new root as $1 (mmdebstrap --customize-hook).
CUSTOMIZE_HOOK = r"""#!/bin/sh
# vzbackup template customization: what makes a Debian root filesystem fit to clone into CTs.
set -eu
umask 022
root=$1
# Per-CT identity: systemd creates a machine-id at first boot, vzbackup writes hostname/resolv.conf.
rm -f "$root/etc/machine-id" "$root/etc/hostname" "$root/etc/resolv.conf"
: > "$root/etc/machine-id"
echo localhost > "$root/etc/hostname"
: > "$root/etc/resolv.conf"
# SSH host keys must differ between CTs: generated on first boot instead.
if [ -x "$root/usr/bin/ssh-keygen" ]; then
  rm -f "$root"/etc/ssh/ssh_host_*
  unit=vzbackup-ssh-hostkeys.service
  cat > "$root/etc/systemd/system/$unit" <<'UNIT'
# Installed by 'vzbackup template build': a template carries no SSH host keys.
[Unit]
Description=Generate SSH host keys on first boot
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
RequiredBy=ssh.service
UNIT
  mkdir -p "$root/etc/systemd/system/ssh.service.requires"
  ln -sf "../$unit" "$root/etc/systemd/system/ssh.service.requires/$unit"
fi
# Build logs say nothing about a CT and differ between builds.
rm -f "$root"/var/log/dpkg.log "$root"/var/log/alternatives.log "$root"/var/log/apt/*.log
rm -f "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
[ -e "$root/sbin/init" ] || { echo "no /sbin/init in the tree" >&2; exit 1; }
"""


@dataclass(frozen=True)
class Recipe:
    """What a template is built from; its hash decides whether a rebuild is needed."""

    name: str
    release: str
    suite: str
    arch: str
    mirror: str
    packages: tuple[str, ...]

    def inputs(self) -> str:
        text = json.dumps([self.suite, self.arch, self.mirror, self.packages, CUSTOMIZE_HOOK])
        return hashlib.sha256(text.encode()).hexdigest()

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "distribution": "debian",
            "release": self.release,
            "suite": self.suite,
            "arch": self.arch,
            "mirror": self.mirror,
            "packages": list(self.packages),
            "inputs": self.inputs(),
        }


@dataclass
class BuildResult:
    path: Path
    recipe: Recipe
    up_to_date: bool  # nothing was built: the cached tarball has the same inputs
    seconds: float = 0.0


def split_packages(values: Iterable[str]) -> list[str]:
    """``--packages a,b --packages 'c d'`` -> [a, b, c, d], each checked to be a package name."""
    out: list[str] = []
    for value in values:
        for pkg in re.split(r"[,\s]+", value.strip()):
            if not pkg:
                continue
            if not _PACKAGE.fullmatch(pkg):
                raise UsageError(f"invalid package name {pkg!r}")
            out.append(pkg)
    return out


def recipe_for(name: str, packages: Iterable[str] | None, mirror: str | None) -> Recipe:
    """The recipe a template *name* stands for; UsageError for names we can't build here."""
    check_name(name)
    m = _NAME.fullmatch(name)
    if not m:
        raise UsageError(
            f"don't know how to build {name!r}",
            hint="names look like debian-12-x86_64 or debian-13-x86_64[-FLAVOUR]",
        )
    release, arch = m["release"], m["arch"]
    if release not in C.DEBIAN_RELEASES:
        known = ", ".join(f"{r} ({s})" for r, s in C.DEBIAN_RELEASES.items())
        raise UsageError(f"Debian {release} is not a release we build (known: {known})")
    if platform.machine() != arch:
        raise UsageError(f"cannot build {arch} templates on a {platform.machine()} host")
    mirror = mirror or C.DEBIAN_MIRROR
    if not _MIRROR.fullmatch(mirror):
        raise UsageError(f"invalid mirror URL {mirror!r} (http://, https:// or file://)")
    extra = list(C.TEMPLATE_DEFAULT_PACKAGES) if packages is None else list(packages)
    pkgs = tuple(dict.fromkeys([*C.TEMPLATE_BASE_PACKAGES, *extra]))
    return Recipe(name, release, C.DEBIAN_RELEASES[release], C.TEMPLATE_ARCHES[arch], mirror, pkgs)


def _builder() -> str:
    path = shutil.which("mmdebstrap")
    if not path:
        raise DependencyError(
            "mmdebstrap is needed to build Debian templates",
            hint="apt-get install mmdebstrap (scripts/setup.sh installs it)",
        )
    return path


def build(
    cache_dir: Path,
    recipe: Recipe,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build *recipe* into ``cache_dir/NAME.tar.zst`` unless it is there with the same inputs."""
    if os.geteuid() != 0:
        raise UsageError("building a template needs root (it installs packages into a chroot)")
    builder = _builder()
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"{recipe.name}.tar.zst"
    with Lock(cache_dir / f".{recipe.name}.lock", wait=BUILD_WAIT, what=f"template {recipe.name}"):
        if out.exists() and not force:
            if read_recipe(out).get("inputs") == recipe.inputs():
                return BuildResult(out, recipe, up_to_date=True)
            raise ExistsError(
                f"template {out} exists (built from other inputs or elsewhere)",
                hint="pass --force to rebuild it, or remove it with 'vzbackup template remove'",
            )
        progress = progress or (lambda _line: None)
        progress(f"building {recipe.name}: Debian {recipe.release} ({recipe.suite}) from "
                 f"{recipe.mirror} with {', '.join(recipe.packages)}")
        start = time.monotonic()
        _run_mmdebstrap(builder, recipe, out, progress)
        return BuildResult(out, recipe, up_to_date=False, seconds=time.monotonic() - start)


def _run_mmdebstrap(
    builder: str, recipe: Recipe, out: Path, progress: Callable[[str], None]
) -> None:
    partial = out.with_name(f".{recipe.name}.partial-{os.getpid()}.tar.zst")
    info = out.with_name(out.name + C.TEMPLATE_INFO_SUFFIX)
    # Work beside the output (a root filesystem is too big for a tmpfs /tmp), readable by _apt.
    with tempfile.TemporaryDirectory(prefix=f".{recipe.name}.work-", dir=out.parent) as work:
        os.chmod(work, 0o755)
        hook = Path(work) / "customize.sh"
        hook.write_text(CUSTOMIZE_HOOK)
        hook.chmod(0o755)
        argv = [
            builder,
            "--variant=minbase",
            f"--architectures={recipe.arch}",
            f"--include={','.join(recipe.packages)}",
            "--aptopt=Acquire::Retries=3",
            f"--customize-hook={hook}",
            recipe.suite,
            str(partial),
            recipe.mirror,
        ]
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(C.TEMPLATE_EPOCH), "TMPDIR": work}
        tail: collections.deque[str] = collections.deque(maxlen=25)
        try:
            with subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=env, text=True, errors="replace",
            ) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    tail.append(line.rstrip())
                    if line.startswith(("I: ", "E: ", "W: ")):
                        progress(line.rstrip())
            if proc.returncode != 0:
                raise RuntimeFailure(
                    f"mmdebstrap failed to build {recipe.name} from {recipe.mirror} "
                    f"(exit {proc.returncode}); its last lines:\n" + "\n".join(tail)
                )
            recipe_text = json.dumps(
                {**recipe.as_dict(), "builder": _version(builder), "built": time.time()},
                indent=2, sort_keys=True,
            )
            # Publish: drop the old recipe first, so a crash in between means a rebuild.
            info.unlink(missing_ok=True)
            os.rename(partial, out)
            tmp_info = info.with_name(f".{info.name}.{os.getpid()}")
            tmp_info.write_text(recipe_text + "\n")
            os.rename(tmp_info, info)
        finally:
            partial.unlink(missing_ok=True)


def _version(builder: str) -> str:
    res = subprocess.run([builder, "--version"], capture_output=True, text=True, check=False)
    return res.stdout.strip() or "mmdebstrap"
