#!/usr/bin/env bash
# The main job on embedded defaults: set the machine up, then create a container from the
# bundled busybox template, start it, show its web service answering, checkpoint it with
# CRIU, restore it, and show it still serving with its processes' state intact.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export VZBACKUP_PREFIX=${VZBACKUP_PREFIX:-/var/lib/vzbackup/demo}
CTID=${DEMO_CTID:-101}
IP=${DEMO_IP:-10.199.0.101}
COPY=${DEMO_COPY_CTID:-102}
COPY_IP=${DEMO_COPY_IP:-10.199.0.102}

"$ROOT/scripts/setup.sh"
VZ="$ROOT/.venv/bin/vzbackup"
step() { if [ -t 1 ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi; }
fetch() {  # fetch PATH [IP]
  "$ROOT/.venv/bin/python" -c 'import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode(), end="")' "http://${2:-$IP}/$1"
}

step "node prefix $VZBACKUP_PREFIX (no vz.conf there: embedded defaults)"
for ct in "$CTID" "$COPY"; do
  if "$VZ" status "$ct" | grep -q ' exist '; then
    "$VZ" status "$ct" | grep -q running && "$VZ" stop "$ct" --fast
    "$VZ" destroy "$ct"
  fi
done
rm -rf "$VZBACKUP_PREFIX/vz/backup" "$VZBACKUP_PREFIX/var/cache/vzbackup"  # a fresh repository
"$VZ" check

step "create CT $CTID from the busybox template"
"$VZ" create "$CTID" --ipadd "$IP" --hostname demo --name demo
"$VZ" start demo
"$VZ" list

step "its service answers on $IP"
for _ in $(seq 50); do fetch "" >/dev/null 2>&1 && break; sleep 0.1; done
fetch "" | grep -o '<h1>.*</h1>'
fetch cgi-bin/status
"$VZ" exec demo 'tail -1 /var/log/heartbeat'

step "checkpoint (CRIU dump; the CT stops)"
"$VZ" chkpnt demo
"$VZ" status demo
fetch "" >/dev/null 2>&1 && { echo "still answering after the dump?!"; exit 1; } || echo "service down while checkpointed"

step "restore"
"$VZ" restore demo
fetch "" | grep -o '<h1>.*</h1>'
echo "heartbeat counter continues from where it was (not restarted):"
"$VZ" exec demo 'sleep 1; tail -3 /var/log/heartbeat'
"$VZ" list -o ctid,name,status,ip,nproc,pid

step "back it up (mode suspend: the CT keeps running) into the local repository"
"$VZ" dump demo --mode suspend

step "change a file inside, back up again: only the change is read and stored"
"$VZ" exec demo 'echo "<h1>changed after the first backup</h1>" > /www/changed.html'
"$VZ" dump demo --mode suspend
"$VZ" list -b

step "restore the newest snapshot as a new CT $COPY ($COPY_IP) and start it"
"$VZ" restore "$CTID" "$COPY" --ipadd "$COPY_IP" --hostname demo-copy --start
for _ in $(seq 50); do fetch "" "$COPY_IP" >/dev/null 2>&1 && break; sleep 0.1; done
fetch changed.html "$COPY_IP"
"$VZ" verify
"$VZ" list -o ctid,name,status,ip,hostname

step "live migration: two nodes (network namespaces with their own sshd) on this machine"
BED=vzdemo
"$ROOT/.venv/bin/python" "$ROOT/scripts/twonode.py" down "$BED" >/dev/null 2>&1 || true
eval "$("$ROOT/.venv/bin/python" "$ROOT/scripts/twonode.py" up "$BED")"
trap '"$ROOT/.venv/bin/python" "$ROOT/scripts/twonode.py" down "$BED" >/dev/null 2>&1 || true' EXIT
on() { local ns=$1 prefix=$2; shift 2; nsenter --net="/run/netns/$ns" env VZBACKUP_PREFIX="$prefix" "$VZ" "$@"; }
A=(on "$VZBED_A_NETNS" "$VZBED_A_PREFIX"); B=(on "$VZBED_B_NETNS" "$VZBED_B_PREFIX")
MIG_IP=${VZBED_CLIENT_IP%.*}.100
"${A[@]}" create 201 --ipadd "$MIG_IP" --hostname mover >/dev/null
"${A[@]}" start 201
for _ in $(seq 50); do fetch "" "$MIG_IP" >/dev/null 2>&1 && break; sleep 0.1; done
echo "CT 201 on node A ($VZBED_A_IP) serves $(fetch cgi-bin/status "$MIG_IP" | head -1)"
"${A[@]}" migrate 201 "root@$VZBED_B_IP" --online -t --ssh-key "$VZBED_SSH_KEY" \
  --ssh-opt "UserKnownHostsFile=$VZBED_KNOWN_HOSTS"
echo "node A: $("${A[@]}" status 201)"
echo "node B: $("${B[@]}" status 201)"
echo "the same address now answers from node B: $(fetch cgi-bin/status "$MIG_IP" | head -1)"
"${B[@]}" exec 201 'tail -2 /var/log/heartbeat'

step "live migration of a Debian 12 CT with systemd (redis, postgresql, ssh, cron), unprivileged"
ln -f "$VZBACKUP_PREFIX/vz/template/cache/debian-12-x86_64.tar.zst" "$VZBED_A_PREFIX/vz/template/cache/" 2>/dev/null ||
  cp "$VZBACKUP_PREFIX/vz/template/cache/debian-12-x86_64.tar.zst" "$VZBED_A_PREFIX/vz/template/cache/"
DEB_IP=${VZBED_CLIENT_IP%.*}.101
"${A[@]}" create 202 --ostemplate debian-12-x86_64 --ipadd "$DEB_IP" --hostname debian >/dev/null
"${A[@]}" start 202
WAIT_RUNNING='t=300; while [ ! -S /run/systemd/private ] && [ $t -gt 0 ]; do sleep 0.1; t=$((t-1)); done; timeout 90 systemctl is-system-running --wait'
UPTIME="redis-cli info server | sed -n 's/^uptime_in_seconds:\([0-9]*\).*/\1/p'"
echo "node A: systemd is $("${A[@]}" exec 202 "$WAIT_RUNNING"); redis-server up $("${A[@]}" exec 202 "$UPTIME") s"
"${A[@]}" exec 202 'redis-cli set greeting "hello from node A" >/dev/null'
# online with lazy pages (post-copy), memory over CRIU's TLS
"${A[@]}" migrate 202 "root@$VZBED_B_IP" --online --lazy -t --ssh-key "$VZBED_SSH_KEY" \
  --ssh-opt "UserKnownHostsFile=$VZBED_KNOWN_HOSTS"
echo "node B: systemd is $("${B[@]}" exec 202 'systemctl is-system-running'); redis-server up $("${B[@]}" exec 202 "$UPTIME") s (the same process, never restarted)"
echo "node B: redis still holds: $("${B[@]}" exec 202 'redis-cli get greeting')"

step "done: CTs $CTID and $COPY run under prefix $VZBACKUP_PREFIX"
echo "  enter it:   VZBACKUP_PREFIX=$VZBACKUP_PREFIX $VZ enter demo"
echo "  stop it:    VZBACKUP_PREFIX=$VZBACKUP_PREFIX $VZ stop demo"
