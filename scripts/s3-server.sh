#!/usr/bin/env bash
# A real S3 server on loopback for the tests and the benchmark: single-node Ceph RGW
# (one mon, one bluestore OSD on a sparse file, radosgw with the beast frontend).
# Ceph 16.2 from Debian bookworm; root needed.
#
#   s3-server.sh install   apt-get the Ceph packages (setup.sh does this too)
#   s3-server.sh start     create the cluster on first use (~15 s), else restart it (~4 s)
#   s3-server.sh stop      stop radosgw, the OSD and the mon (data kept)
#   s3-server.sh purge     stop and delete the cluster
#   s3-server.sh status    exit 0 when the endpoint answers
#
# Endpoint http://127.0.0.1:$VZBACKUP_S3_PORT (7480), access key / secret: test / testtest,
# region us-east-1, path-style addressing. State in $VZBACKUP_S3_DIR (/var/tmp/vzbackup-s3).
# The same server on https://127.0.0.1:$VZBACKUP_S3_TLS_PORT (7443), its certificate signed
# by a private CA made on first use: $VZBACKUP_S3_DIR/tls/ca.pem (what an S3 server with an
# organisation's own CA looks like to a client).
set -euo pipefail
DIR=${VZBACKUP_S3_DIR:-/var/tmp/vzbackup-s3}
PORT=${VZBACKUP_S3_PORT:-7480}
TLS_PORT=${VZBACKUP_S3_TLS_PORT:-7443}
TLS="$DIR/tls"
ACCESS_KEY=${VZBACKUP_S3_ACCESS_KEY:-test}
SECRET_KEY=${VZBACKUP_S3_SECRET_KEY:-testtest}
OSD_BYTES=${VZBACKUP_S3_OSD_BYTES:-21474836480}  # sparse: only what is written uses disk
PACKAGES=(ceph-mon ceph-osd radosgw curl openssl)
CONF="-c $DIR/ceph.conf"
# tcp_nodelay: without it every response under ~64 KiB (a small GET, a ranged read) waits
# 40 ms: the body's segment is held by Nagle until the client's delayed ACK of the headers
FRONTENDS="beast endpoint=127.0.0.1:$PORT ssl_endpoint=127.0.0.1:$TLS_PORT \
ssl_certificate=$TLS/server.pem ssl_private_key=$TLS/server.key tcp_nodelay=1"
# deleted objects' data is freed by RGW's garbage collector, by default 2 h after the delete
# and once an hour: a session of tests and benchmarks (GBs written and deleted) filled the
# 20 GiB OSD with it ("1 full osd", every write refused); a test server frees it within a
# minute
RGW_OPTS=(--rgw-frontends "$FRONTENDS" --rgw-gc-obj-min-wait 30 --rgw-gc-processor-period 30)

log() { printf '[s3-server] %s\n' "$*" >&2; }

answering() {
  [ "$(curl -s -o /dev/null -w '%{http_code}' -m 1 "http://127.0.0.1:$PORT/" || true)" = 200 ]
}

tls_answering() {
  [ "$(curl -s -o /dev/null -w '%{http_code}' -m 1 --cacert "$TLS/ca.pem" \
    "https://127.0.0.1:$TLS_PORT/" || true)" = 200 ]
}

# a private CA and the server's certificate for 127.0.0.1 and localhost, signed by it
make_tls() {
  [ -f "$TLS/server.pem" ] && return
  mkdir -p "$TLS"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vzbackup test CA" \
    -keyout "$TLS/ca.key" -out "$TLS/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$TLS/server.key" -out "$TLS/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$TLS/san.ext"
  openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" \
    -CAcreateserial -days 3650 -extfile "$TLS/san.ext" -out "$TLS/server.pem" 2>/dev/null
}

write_conf() {
  cat > "$DIR/ceph.conf" <<CONF
[global]
fsid = $1
mon host = v2:127.0.0.1:3300
public network = 127.0.0.0/8
ms bind ipv6 = false
auth allow insecure global id reclaim = false
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
keyring = $DIR/keyring
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 5
osd crush chooseleaf type = 0
[mon]
mon data = $DIR/mon.\$id
mon cluster log file = $DIR/log/cluster.log
[osd]
osd data = $DIR/osd.\$id
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $OSD_BYTES
bluestore fsck on mount = false
osd memory target = 1073741824
bluestore cache autotune = false
bluestore cache size = 268435456
[client.rgw.a]
rgw frontends = $FRONTENDS
rgw dns name = localhost
CONF
}

create_cluster() {
  local fsid osd_uuid
  rm -rf "$DIR"
  mkdir -p "$DIR"/{run,log,mon.a,osd.0}
  fsid=$(cat /proc/sys/kernel/random/uuid)
  write_conf "$fsid"
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$DIR/keyring" --gen-key -n client.admin --cap mon 'allow *' \
    --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$DIR/keyring" --gen-key -n osd.0 --cap mon 'allow profile osd' \
    --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null
  ceph-authtool "$DIR/keyring" --gen-key -n client.rgw.a --cap mon 'allow rw' \
    --cap osd 'allow rwx' --cap mgr 'allow rw' >/dev/null
  monmaptool --create --addv a "[v2:127.0.0.1:3300]" --fsid "$fsid" "$DIR/monmap" >/dev/null
  # shellcheck disable=SC2086
  ceph-mon $CONF --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring"
  # shellcheck disable=SC2086
  ceph-mon $CONF -i a
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  # shellcheck disable=SC2086
  ceph $CONF osd new "$osd_uuid" >/dev/null
  # shellcheck disable=SC2086
  ceph-osd $CONF -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$DIR/log/mkfs.log" 2>&1
  # shellcheck disable=SC2086
  ceph-osd $CONF -i 0 2>>"$DIR/log/stderr.log"
  make_tls
  # shellcheck disable=SC2086
  radosgw $CONF -n client.rgw.a "${RGW_OPTS[@]}"
  # shellcheck disable=SC2086
  radosgw-admin $CONF user create --uid=vzbackup --display-name=vzbackup \
    --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null
  touch "$DIR/.initialized"
}

start() {
  local t0 i
  if answering && tls_answering; then log "already answering on http://127.0.0.1:$PORT"; return; fi
  command -v radosgw >/dev/null || { log "Ceph is not installed: run '$0 install'"; exit 1; }
  t0=$(date +%s%N)
  if answering; then  # started by an older version of this script: no TLS endpoint
    log "restarting radosgw with its TLS endpoint"
    stop_pid client.rgw.a
    make_tls
    # shellcheck disable=SC2086
    radosgw $CONF -n client.rgw.a "${RGW_OPTS[@]}"
  elif [ -f "$DIR/.initialized" ]; then
    # shellcheck disable=SC2086
    ceph-mon $CONF -i a
    # shellcheck disable=SC2086
    ceph-osd $CONF -i 0 2>>"$DIR/log/stderr.log"
    make_tls
    # shellcheck disable=SC2086
    radosgw $CONF -n client.rgw.a "${RGW_OPTS[@]}"  # also for an older ceph.conf
  else
    create_cluster
  fi
  for i in $(seq 1 900); do answering && tls_answering && break; sleep 0.1; done
  answering && tls_answering || { log "RGW not ready after 90 s; see $DIR/log"; exit 1; }
  log "ready on http://127.0.0.1:$PORT in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
}

stop_pid() {
  local pid
  pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
}

stop() {
  local name
  for name in client.rgw.a osd.0 mon.a; do stop_pid "$name"; done
}

case ${1:-} in
install)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
    >/dev/null ;;
start) start ;;
stop) stop ;;
purge) stop; rm -rf "$DIR" ;;
status) answering && tls_answering ;;
*) echo "usage: $0 install|start|stop|purge|status" >&2; exit 2 ;;
esac
