#!/usr/bin/env bash
# Make a fresh Debian 12 host ready for vzbackup (idempotent; a second run takes seconds).
#   Debian packages, CRIU >= 4.2 (distro if good enough, else built from Debian sid's source),
#   pycriu importable by the venv, fs.pipe-max-size raised, .venv with vzbackup[test] editable,
#   the busybox OS template and the Debian 12 one (debian-12-x86_64, built with mmdebstrap from
#   deb.debian.org on the first run) in the embedded-defaults prefix.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VZBACKUP_VENV:-$ROOT/.venv}
# Debian's own CPython (built with PGO and LTO; python3-seccomp is built for it): every command
# starts and walks 15-25% faster than on a python3 built without optimisations (pyenv's)
PYTHON=${PYTHON:-/usr/bin/python3}
CRIU_MIN=4.2
CRIU_PREFIX=/usr/local
PYCRIU_DIR=/usr/local/lib/vzbackup/pycriu      # holds the pycriu package
SECCOMP_DIR=/usr/local/lib/vzbackup/seccomp    # holds a link to Debian's libseccomp binding
BUILD_DIR=/var/cache/vzbackup/criu-build
CRIU_PATCH_DIR=$ROOT/scripts/criu-patches   # our fixes to CRIU, applied when it is built here
# CRIU caches what it probed of the kernel (~0.1 s per run, paid inside a migration's freeze
# by the restore and the lazy-pages daemon) only on a tmpfs, in its RUNDIR. Here / and /run
# are ext4: our build keeps the cache in a directory of its own, a small tmpfs when /run
# isn't one (ensure_criu_rundir).
CRIU_RUNDIR=/run/criu
# The build's GitID names what it carries ("vzbackup+rundir+nfct+tlsns"): vzbackup reads it
# (criu --version) and a build without all of it is rebuilt.
CRIU_GITID=vzbackup+rundir$(for p in "$CRIU_PATCH_DIR"/*.patch; do [ -e "$p" ] && printf "+%s" "$(basename "$p" .patch)"; done; true)
PIPE_MAX=4194304
STAMP_DIR=/var/lib/vzbackup-setup

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and CRIU)"
mkdir -p "$STAMP_DIR"

DEB_PKGS=(busybox-static rsync openssh-server iproute2 iptables btrfs-progs zstd xz-utils
  build-essential pkg-config protobuf-compiler protobuf-c-compiler libprotobuf-dev
  libprotobuf-c-dev python3-protobuf libcap-dev libnl-3-dev libnet1-dev libaio-dev
  libgnutls28-dev libbsd-dev libdrm-dev uuid-dev libnftables-dev
  util-linux procps psmisc acl attr restic borgbackup mmdebstrap
  e2fsprogs xfsprogs  # the disk quota tests: loop-mounted ext4 and xfs with project quotas
  nftables  # per-CT bridge tables: bridged CTs send only from their addresses
  python3-venv python3-dev  # the venv on Debian's CPython (headers: wheels built here)
  python3-seccomp  # libseccomp's own Python binding: the CTs' syscall filter
  ceph-mon ceph-osd radosgw curl  # the S3 server of the tests (scripts/s3-server.sh)
  fuse3                           # vzbackup browse (libfuse 3 + fusermount3)
  chromium fonts-dejavu-core)     # the report's rendering test (headless screenshot)

missing_debs() {
  local p
  for p in "${DEB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

install_debs() {
  local miss
  miss=$(missing_debs | tr '\n' ' ')
  if [ -z "$miss" ]; then log "Debian packages: present"; return; fi
  log "Debian packages: installing $miss"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  # shellcheck disable=SC2086
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $miss >/dev/null
}

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" = "$2" ]; }

criu_ok() {  # $1 = criu binary
  local bin=$1 v
  [ -x "$bin" ] || return 1
  v=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p')
  [ -n "$v" ] && version_ge "$v" "$CRIU_MIN" || return 1
  "$bin" check >/dev/null 2>&1
}

criu_patched() {  # $1 = criu binary: carries every patch of $CRIU_PATCH_DIR
  "$1" --version 2>/dev/null | grep -qx "GitID: $CRIU_GITID"
}

build_criu() {  # $1 = "full" (criu + pycriu) or "lib" (pycriu only, distro criu is used)
  local mode=$1 srcdir apt_dir tarball targets="criu lib"
  apt_dir=$BUILD_DIR/apt
  mkdir -p "$apt_dir/lists/partial" "$BUILD_DIR"
  echo "deb-src http://deb.debian.org/debian sid main" > "$apt_dir/sources.list"
  local aopts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$apt_dir/lists" -o "APT::Get::List-Cleanup=0")
  tarball=$(ls "$BUILD_DIR"/criu_*.orig.tar.xz 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$tarball" ]; then
    log "CRIU: fetching Debian sid source package"
    apt-get "${aopts[@]}" update -qq
    (cd "$BUILD_DIR" && apt-get "${aopts[@]}" source --download-only criu >/dev/null 2>&1 || true)
    tarball=$(ls "$BUILD_DIR"/criu_*.orig.tar.xz 2>/dev/null | sort -V | tail -1 || true)
    [ -n "$tarball" ] || die "could not download criu's source from Debian sid"
  fi
  srcdir=$BUILD_DIR/src
  rm -rf "$srcdir"; mkdir -p "$srcdir"
  tar -xJf "$tarball" -C "$srcdir" --strip-components=1
  local p
  for p in "$CRIU_PATCH_DIR"/*.patch; do
    [ -e "$p" ] || continue
    patch -d "$srcdir" -p1 -s <"$p" || die "CRIU patch $(basename "$p") does not apply"
  done
  [ "$mode" = lib ] && targets=lib
  log "CRIU: building $(basename "$tarball") + $CRIU_GITID (make -j$(nproc) $targets)"
  # shellcheck disable=SC2086
  make -C "$srcdir" -j"$(nproc)" GITID="$CRIU_GITID" RUNDIR="$CRIU_RUNDIR" $targets >"$BUILD_DIR/build.log" 2>&1 \
    || { tail -30 "$BUILD_DIR/build.log" >&2; die "CRIU build failed (log: $BUILD_DIR/build.log)"; }
  # Replaced by rename: CRIU runs and pycriu imports of other processes never see a gap.
  if [ "$mode" != lib ]; then
    install -m 0755 "$srcdir/criu/criu" "$CRIU_PREFIX/sbin/criu.new"
    mv -f "$CRIU_PREFIX/sbin/criu.new" "$CRIU_PREFIX/sbin/criu"
  fi
  local new="$PYCRIU_DIR.new"
  rm -rf "$new"; mkdir -p "$new"
  cp -r "$srcdir/lib/pycriu" "$new/pycriu"
  find "$new" -name '__pycache__' -prune -exec rm -rf {} +
  if diff -qr "$new/pycriu" "$PYCRIU_DIR/pycriu" -x __pycache__ >/dev/null 2>&1; then
    rm -rf "$new"
  else
    rm -rf "$PYCRIU_DIR.old"; [ -d "$PYCRIU_DIR" ] && mv "$PYCRIU_DIR" "$PYCRIU_DIR.old"
    mv "$new" "$PYCRIU_DIR"; rm -rf "$PYCRIU_DIR.old"
  fi
}

install_criu() {
  local dist=/usr/sbin/criu
  local cand
  cand=$(apt-cache policy criu 2>/dev/null | sed -n 's/^ *Candidate: *//p')
  if [ ! -x "$dist" ] && [ -n "$cand" ] && [ "$cand" != "(none)" ] \
     && version_ge "${cand#*:}" "$CRIU_MIN"; then
    # The distro's package is new enough: use it when its 'criu check' passes.
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends criu \
      >/dev/null 2>&1 || true
  fi
  if criu_ok "$dist"; then
    log "CRIU: distro $("$dist" --version | head -1) passes 'criu check'" \
      "(without $CRIU_GITID: vzbackup refuses what needs those fixes, README)"
    [ -f "$PYCRIU_DIR/pycriu/rpc_pb2.py" ] || build_criu lib
    return
  fi
  if criu_ok "$CRIU_PREFIX/sbin/criu" && criu_patched "$CRIU_PREFIX/sbin/criu" \
     && [ -f "$PYCRIU_DIR/pycriu/rpc_pb2.py" ]; then
    log "CRIU: $("$CRIU_PREFIX/sbin/criu" --version | head -1) + $CRIU_GITID (built from source) OK"
    return
  fi
  log "CRIU: distro criu missing, older than $CRIU_MIN or failing 'criu check'," \
    "or our build lacks $CRIU_GITID: building"
  build_criu full
  criu_ok "$CRIU_PREFIX/sbin/criu" || { "$CRIU_PREFIX/sbin/criu" check || true; die "built CRIU fails 'criu check'"; }
  log "CRIU: installed $("$CRIU_PREFIX/sbin/criu" --version | head -1)"
}

ensure_criu_rundir() {  # CRIU keeps its kernel probe cache only on a tmpfs (kerndat.c)
  mkdir -p -m 0700 "$CRIU_RUNDIR"
  if [ "$(stat -f -c %T "$CRIU_RUNDIR")" != tmpfs ]; then
    mount -t tmpfs -o size=1m,mode=0700 vzbackup-criu "$CRIU_RUNDIR"
  fi
  log "CRIU: kernel probe cache in $CRIU_RUNDIR (tmpfs)"
}

raise_pipe_max() {
  local cur
  cur=$(sysctl -n fs.pipe-max-size)
  if [ "$cur" -lt "$PIPE_MAX" ]; then sysctl -qw fs.pipe-max-size="$PIPE_MAX"; fi
  # Lazy (post-copy) migration of CTs in a user namespace: CRIU opens the userfaultfd inside
  # the restored CT, whose root has no CAP_SYS_PTRACE of the node (README "Live migration").
  sysctl -qw vm.unprivileged_userfaultfd=1
  mkdir -p /etc/sysctl.d
  printf 'fs.pipe-max-size = %s\nvm.unprivileged_userfaultfd = 1\n' "$PIPE_MAX" \
    > /etc/sysctl.d/60-vzbackup.conf
  log "sysctl: fs.pipe-max-size = $(sysctl -n fs.pipe-max-size)," \
    "vm.unprivileged_userfaultfd = $(sysctl -n vm.unprivileged_userfaultfd)"
}

link_seccomp() {  # Debian builds the binding for its CPython 3.11, the venv's X.Y too
  local so
  so=$(ls /usr/lib/python3/dist-packages/seccomp.cpython-*.so 2>/dev/null | head -1)
  [ -n "$so" ] || die "python3-seccomp installed no seccomp module"
  mkdir -p "$SECCOMP_DIR"
  ln -sfn "$so" "$SECCOMP_DIR/$(basename "$so")"
}

make_venv() {
  local hash
  local want
  want=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')
  if [ -x "$VENV/bin/python" ] \
    && [ "$("$VENV/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')" != "$want" ]; then
    log "venv: $VENV was made with another python3, making it anew on $want"
    rm -rf "$VENV"
  fi
  [ -x "$VENV/bin/python" ] || { log "venv: creating $VENV ($want)"; "$PYTHON" -m venv "$VENV"; }
  # pycriu and the seccomp binding live outside the venv; .pth files make them importable
  # (pointing at their own folders, not at all of Debian's dist-packages).
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$PYCRIU_DIR" > "$site/vzbackup-pycriu.pth"
  link_seccomp
  echo "$SECCOMP_DIR" > "$site/vzbackup-seccomp.pth"
  hash=$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)
  if [ "$(cat "$VENV/.vzbackup-installed" 2>/dev/null)" != "$hash" ]; then
    log "venv: installing vzbackup[test] (editable)"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e "$ROOT[test]"
    echo "$hash" > "$VENV/.vzbackup-installed"
  else
    log "venv: up to date"
  fi
  # byte code of the project's own modules (an editable install has none, and with
  # PYTHONDONTWRITEBYTECODE set every command compiled ~60 modules anew: ~0.05 s each)
  "$VENV/bin/python" -m compileall -q "$ROOT/vzbackup" "$ROOT/migrate" "$ROOT/storage" \
    "$ROOT/scheduler" >/dev/null
  "$VENV/bin/python" -c 'import pycriu, seccomp, vzbackup' \
    || die "pycriu, seccomp (python3-seccomp is built for Debian's python3 X.Y) or vzbackup not importable in $VENV"
}

# Traffic of tests and the demo never leaves the machine: an address in their CTs' ranges
# (10.199/16 for CTs, 10.200-239 for two-node beds and their CTs) goes where the main table's
# specific routes say (a running CT's /32, a bed's /24) and is otherwise unreachable, instead
# of leaving by the default route. Policy rules, so no route of the main table changes.
LOCAL_RANGES=(10.199.0.0/16 10.200.0.0/13 10.208.0.0/12 10.224.0.0/12)
RULE_PREF=31900
# The IPv6 twin: a ULA /32 for CTs' IPv6 addresses in tests (fd00::/64 may be the machine's).
LOCAL_RANGES6=(fd99:199::/32)
RULE_PREF6=31910
fence_local_ranges() {
  local net pref=$RULE_PREF
  for net in "${LOCAL_RANGES[@]}"; do
    while ip rule del pref "$pref" 2>/dev/null; do :; done
    while ip rule del pref "$((pref + 1))" 2>/dev/null; do :; done
    ip rule add pref "$pref" to "$net" lookup main suppress_prefixlength 0
    ip rule add pref "$((pref + 1))" to "$net" unreachable
    pref=$((pref + 2))
  done
  pref=$RULE_PREF6
  for net in "${LOCAL_RANGES6[@]}"; do
    while ip -6 rule del pref "$pref" 2>/dev/null; do :; done
    while ip -6 rule del pref "$((pref + 1))" 2>/dev/null; do :; done
    ip -6 rule add pref "$pref" to "$net" lookup main suppress_prefixlength 0
    ip -6 rule add pref "$((pref + 1))" to "$net" unreachable
    pref=$((pref + 2))
  done
  log "routes: ${LOCAL_RANGES[*]} ${LOCAL_RANGES6[*]} unreachable unless a CT or test bed claims the address"
}

install_debs
install_criu
ensure_criu_rundir
raise_pipe_max
fence_local_ranges
make_venv
"$ROOT/scripts/build-template.sh"
# The Debian template: a no-op when the cached one has the same recipe (NAME.tar.zst.json).
"$VENV/bin/vzbackup" --prefix "${VZBACKUP_PREFIX:-/var/lib/vzbackup/demo}" \
  template build debian-12-x86_64 | sed 's/^/[setup] /' >&2
log "ready"
