#!/usr/bin/env bash
# Build the busybox OS template (offline, idempotent).
#
#   build-template.sh [--all-formats] [OUTPUT.tar.zst]
#
# OUTPUT defaults to ${VZBACKUP_PREFIX:-/var/lib/vzbackup/demo}/vz/template/cache/busybox-1.0-x86_64.tar.zst.
# A sidecar OUTPUT.sha256 records the hash of the inputs (this script + the busybox binary); when it
# matches, nothing is rebuilt. --all-formats also writes .tar.gz and .tar.xz copies next to OUTPUT
# (existing copies are refreshed on every rebuild so they never go stale).
# The archive is reproducible: sorted names, fixed mtime (SOURCE_DATE_EPOCH), numeric owner 0:0.
set -euo pipefail

BUSYBOX=${BUSYBOX:-/bin/busybox}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}   # 2024-01-01T00:00:00Z
DEFAULT_OUT=${VZBACKUP_PREFIX:-/var/lib/vzbackup/demo}/vz/template/cache/busybox-1.0-x86_64.tar.zst

log() { printf '[template] %s\n' "$*" >&2; }
die() { printf '[template] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,10s/^# \{0,1\}//p' "$0"; }

all_formats=0
out=
while [ $# -gt 0 ]; do
  case $1 in
    --all-formats) all_formats=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option: $1 (see --help)" ;;
    *) [ -z "$out" ] || die "only one output path may be given"; out=$1 ;;
  esac
  shift
done
out=${out:-$DEFAULT_OUT}
case $out in
  *.tar.zst) ;;
  *) die "output must end in .tar.zst: $out" ;;
esac

for tool in tar zstd gzip xz sha256sum; do
  command -v "$tool" >/dev/null || die "missing tool: $tool"
done
[ -x "$BUSYBOX" ] || die "busybox not found at $BUSYBOX (apt-get install busybox-static)"
if command -v ldd >/dev/null && ldd "$BUSYBOX" >/dev/null 2>&1; then
  die "$BUSYBOX is dynamically linked; the template needs a static busybox (busybox-static)"
fi

script=$(readlink -f "${BASH_SOURCE[0]}")
out_dir=$(dirname "$out")
base=${out%.tar.zst}
sidecar=$out.sha256
inputs_hash=$({ sha256sum <"$script"; sha256sum <"$BUSYBOX"; } | sha256sum | cut -d' ' -f1)

# Formats to (re)build besides zst: requested ones plus any copy already lying next to it.
extra=()
for fmt in gz xz; do
  if [ "$all_formats" = 1 ] || [ -e "$base.tar.$fmt" ]; then extra+=("$fmt"); fi
done

recompress() {  # $1 = gz|xz: the compressor reading a tar stream on stdin
  case $1 in
    gz) gzip -9 -n ;;
    xz) xz -6 -T1 -q ;;
  esac
}

tmp_files=()
work=
cleanup() {
  local f
  [ -z "$work" ] || rm -rf -- "$work"
  for f in "${tmp_files[@]}"; do rm -f -- "$f"; done
}
trap cleanup EXIT

# --- up to date? ---------------------------------------------------------------------------------
if [ -f "$out" ] && [ -f "$sidecar" ] && [ "$(cut -d' ' -f1 "$sidecar")" = "$inputs_hash" ]; then
  missing=()
  for fmt in "${extra[@]}"; do [ -f "$base.tar.$fmt" ] || missing+=("$fmt"); done
  if [ ${#missing[@]} -eq 0 ]; then
    log "up to date, nothing to do: $out (inputs $inputs_hash)"
    exit 0
  fi
  # Same inputs: derive the missing copies from the existing archive (identical tar stream).
  for fmt in "${missing[@]}"; do
    tmp=$base.tar.$fmt.tmp.$$
    tmp_files+=("$tmp")
    zstd -q -d -c "$out" | recompress "$fmt" >"$tmp"
    mv -f -- "$tmp" "$base.tar.$fmt"
    log "wrote $base.tar.$fmt (from $out)"
  done
  exit 0
fi

# --- build the rootfs ------------------------------------------------------------------------------
start=$(date +%s.%N)
umask 022
mkdir -p -- "$out_dir"
work=$(mktemp -d "${TMPDIR:-/tmp}/vzbackup-template.XXXXXX")
root=$work/rootfs
mkdir -p "$root"
log "building rootfs in $root"

for d in bin sbin usr/bin usr/sbin usr/local/bin etc/init.d root tmp var/log var/run run \
  proc sys dev home www/cgi-bin; do
  mkdir -p "$root/$d"
done
chmod 0700 "$root/root"
chmod 1777 "$root/tmp"

install -m 0755 "$BUSYBOX" "$root/bin/busybox"
# Relative links (e.g. usr/sbin/httpd -> ../../bin/busybox) resolve the same inside and outside
# the container, so host-side tools never follow a link into the host's own /bin.
while IFS= read -r applet; do
  applet=${applet#/}
  case $applet in '' | bin/busybox) continue ;; esac
  up=${applet//[!\/]/}          # one "../" per slash in the applet's path
  mkdir -p "$root/$(dirname "$applet")"
  ln -sfn "${up//\//../}bin/busybox" "$root/$applet"
done < <("$BUSYBOX" --list-full)
ln -sfn ../bin/busybox "$root/sbin/init"

write() {  # write MODE PATH: stdin -> $root/PATH with MODE
  cat >"$root/$2"
  chmod "$1" "$root/$2"
}

write 0644 etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
write 0644 etc/group <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
write 0600 etc/shadow <<'EOF'
root:!:19723:0:99999:7:::
nobody:*:19723:0:99999:7:::
EOF
write 0644 etc/hosts <<'EOF'
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
EOF
write 0644 etc/hostname <<'EOF'
busybox
EOF
write 0644 etc/resolv.conf </dev/null
write 0644 etc/profile <<'EOF'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME="${HOME:-/root}"
if [ "$(id -u)" = 0 ]; then PS1='\u@\h:\w# '; else PS1='\u@\h:\w$ '; fi
export PS1
EOF

# No gettys / askfirst: the container has no console; init only runs services.
write 0644 etc/inittab <<'EOF'
# busybox init (vzbackup busybox template)
::sysinit:/etc/init.d/rcS
::respawn:/usr/sbin/httpd -f -p 80 -h /www
::respawn:/bin/sh /usr/local/bin/heartbeat
::shutdown:/etc/init.d/rcK
EOF

write 0755 etc/init.d/rcS <<'EOF'
#!/bin/sh
# Boot script. The runtime has already mounted /proc, /sys, /dev and /dev/pts.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
[ -s /etc/hostname ] && hostname -F /etc/hostname
ip link set lo up || echo "rcS: could not bring up lo" >&2
mkdir -p /var/log /var/run
echo "$(date '+%Y-%m-%dT%H:%M:%S%z') rcS: boot ($(hostname))" >>/var/log/messages
date '+%Y-%m-%dT%H:%M:%S%z' >/var/run/rcS.done
EOF

write 0755 etc/init.d/rcK <<'EOF'
#!/bin/sh
# Shutdown script, run by init on halt/reboot.
echo "$(date '+%Y-%m-%dT%H:%M:%S%z') rcK: shutting down" >>/var/log/messages
EOF

write 0755 usr/local/bin/heartbeat <<'EOF'
#!/bin/sh
# Append "<counter> <UTC timestamp>" to /var/log/heartbeat every second; keep at most 1000 lines.
# After a cold restart the counter continues from the file's last line.
LOG=/var/log/heartbeat
n=0
lines=0
if [ -s "$LOG" ]; then
  n=$(tail -n 1 "$LOG" | cut -d' ' -f1)
  lines=$(wc -l <"$LOG")
fi
case $n in '' | *[!0-9]*) n=0 ;; esac
while :; do
  n=$((n + 1))
  echo "$n $(date -u '+%Y-%m-%dT%H:%M:%SZ')" >>"$LOG"
  lines=$((lines + 1))
  if [ "$lines" -ge 1000 ]; then
    tail -n 500 "$LOG" >"$LOG.tmp" && mv -f "$LOG.tmp" "$LOG"
    lines=500
  fi
  sleep 1
done
EOF

write 0644 www/index.html <<'EOF'
<!DOCTYPE html>
<html><head><title>vzbackup busybox template</title></head>
<body><h1>vzbackup busybox template</h1><p>Status: <a href="/cgi-bin/status">/cgi-bin/status</a></p></body>
</html>
EOF

write 0755 www/cgi-bin/status <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "hostname: $(hostname)"
echo "uptime: $(uptime)"
EOF

# --- archive ---------------------------------------------------------------------------------------
tar_stream() {
  tar --numeric-owner --owner=0 --group=0 --sort=name --mtime="@$SOURCE_DATE_EPOCH" \
    -C "$root" -c .
}

tmp=$out.tmp.$$
tmp_files+=("$tmp")
tar_stream | zstd -q -19 -T0 >"$tmp"
for fmt in "${extra[@]}"; do
  tmp_files+=("$base.tar.$fmt.tmp.$$")
  tar_stream | recompress "$fmt" >"$base.tar.$fmt.tmp.$$"
done

# Publish: drop the old hash first, so a crash in between just means a rebuild next time.
rm -f -- "$sidecar"
mv -f -- "$tmp" "$out"
for fmt in "${extra[@]}"; do mv -f -- "$base.tar.$fmt.tmp.$$" "$base.tar.$fmt"; done
tmp_files+=("$sidecar.tmp.$$")
printf '%s  build-template.sh+%s\n' "$inputs_hash" "$(basename "$BUSYBOX")" >"$sidecar.tmp.$$"
mv -f -- "$sidecar.tmp.$$" "$sidecar"

end=$(date +%s.%N)
log "wrote $out ($(du -h "$out" | cut -f1), $(find "$root" | wc -l) entries) in $(
  awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1fs", e - s }')"
for fmt in "${extra[@]}"; do log "wrote $base.tar.$fmt ($(du -h "$base.tar.$fmt" | cut -f1))"; done
