"""Constants in one place: defaults, limits, file names."""

from __future__ import annotations

MIN_CTID = 101  # OpenVZ reserves 0..100
MAX_CTID = 2**31 - 1
DEFAULT_PREFIX = "/"
PREFIX_ENV = "VZBACKUP_PREFIX"
CRIU_ENV = "VZBACKUP_CRIU"  # explicit path of the criu binary
CRIU_MIN_VERSION = (4, 2)
# Our fixes to CRIU (scripts/criu-patches/NAME.patch), named in the GitID of a CRIU that
# scripts/setup.sh built ("GitID: vzbackup+tlsns"): without "tlsns" the page server over TLS
# fails on SysV shared memory (migrate/online.py checks before anything moves).
CRIU_FIX_TLS_NSDUMP = "tlsns"
# With "tmpfsplain" CRIU dumps an empty tmpfs mount (/run, /dev/shm...) to a zero-byte image
# and a full one to a plain tar, where stock CRIU runs tar + gzip for each (5-33 ms per mount
# and end, in the freeze). Only a patched CRIU restores those images: a migration asks for it
# (CRIU_TMPFS_PLAIN_ENV in criu's environment) when both ends carry the fix.
CRIU_FIX_TMPFS_PLAIN = "tmpfsplain"
CRIU_TMPFS_PLAIN_ENV = "CRIU_VZBACKUP_TMPFS_PLAIN"
# With "lazyearly" (CRIU_LAZY_EARLY_ENV in its environment) "criu lazy-pages" listens and says
# it is ready before its images exist and reads them when the restore connects: a migration's
# DEST starts it before the freeze (its start, 7-50 ms, and a round trip had been in it).
CRIU_FIX_LAZY_EARLY = "lazyearly"
CRIU_LAZY_EARLY_ENV = "CRIU_VZBACKUP_LAZY_EARLY"
# Python's thread switch interval (s) while CRIU waits on our reply to a notification with
# the tasks frozen (the interpreter's default is 5 ms: a thread that wants the GIL may wait that
# long while another runs Python)
NOTIFY_SWITCH_INTERVAL = 0.0005
# CPU priority (nice) of what runs while a migrating CT is frozen: the source's CRIU dump,
# the final sync (rsync at both ends), hand-over, DEST's agent, page daemons and restore. The
# CT's own tasks keep theirs (CRIU restores each task's nice). On a busy node this shortens
# the freeze, not the CT's share.
FREEZE_NICE = -5
# `criu check --feature` for CRIU's in-process network lock (a migration uses it when both
# ends can; the restore takes the method from the images)
CRIU_NFT_LOCK_FEATURE = "network_lock_nftables"
# Where setup.sh's CRIU build keeps its kernel probe cache (a tmpfs; ~0.1 s saved per run)
CRIU_RUNDIR = "/run/criu"
# CRIU's log level (4: debug) and, on a migration's frozen path (the source's dump, DEST's
# restore and page daemons), 2: errors and warnings, CRIU's own default. The Debian CT's
# debug logs are ~23k lines at each end, ~45 ms of the dump's CPU (of ~270 ms).
# CRIU_LOG_LEVEL_ENV forces one level everywhere (debugging; the bed passes it to DEST).
CRIU_LOG_LEVEL = 4
CRIU_FREEZE_LOG_LEVEL = 2
CRIU_LOG_LEVEL_ENV = "VZBACKUP_CRIU_LOG_LEVEL"
CRIU_SEARCH = ("/usr/local/sbin/criu", "/usr/sbin/criu", "/usr/local/bin/criu", "/usr/bin/criu")

# Node defaults (vz.conf); "${PREFIX}" is the node prefix, "$VEID" the CTID.
NODE_DEFAULTS: dict[str, str] = {
    "VE_ROOT": "${PREFIX}/vz/root/$VEID",
    "VE_PRIVATE": "${PREFIX}/vz/private/$VEID",
    "TEMPLATE": "${PREFIX}/vz/template",
    "DUMPDIR": "${PREFIX}/vz/dump",
    "LOCKDIR": "${PREFIX}/vz/lock",
    "RUNDIR": "${PREFIX}/vz/run",
    "CONFDIR": "${PREFIX}/etc/vz/conf",
    "BACKUPDIR": "${PREFIX}/vz/backup",  # the built-in "local" backup storage
    "CACHEDIR": "${PREFIX}/var/cache/vzbackup",  # files cache, repository metadata cache
    "VZBACKUP_CONFDIR": "${PREFIX}/etc/vzbackup",  # vzdump.conf, storage.cfg, jobs.cfg
    "STATEDIR": "${PREFIX}/var/lib/vzbackup",  # scheduler database (next runs, history)
    "NAMESDIR": "${PREFIX}/etc/vz/names",
    "CONFIGFILE": "basic",
    "DEF_OSTEMPLATE": "busybox-1.0-x86_64",
    "STOP_TIMEOUT": "30",
    "VE_STOP_MODE": "stop",  # at node shutdown: stop, or suspend (checkpoint; restored at boot)
    "SYSTEMD_CHECKPOINT": "yes",  # default of the CT key: checkpoint drop-ins for systemd CTs
    "NEIGHBOUR_DEVS": "detect",  # where routed CT IPs get proxy ARP + announcements
    "CGROUP_PARENT": "",  # empty: "vzbackup" for prefix "/", else derived from the prefix
    "UNPRIVILEGED": "yes",  # new CTs run with their ids mapped (ct/idmap.py)
    "IDMAP_BASE": "100000",  # node id of an unprivileged CT's root
    "IDMAP_SIZE": "65536",  # how many ids an unprivileged CT has
    "DISK_QUOTA": "yes",  # enforce DISKSPACE/DISKINODES (vzctl's key; per CT too), ct/quota.py
}

VZ_CONF = "etc/vz/vz.conf"  # relative to the prefix
SAMPLE_SUFFIX = ".conf-sample"

HOST_GATEWAY = "169.254.0.1"  # what routed CTs see as their gateway (host side of veth)
STATE_FILE = "{ctid}.state"  # in RUNDIR, written by the supervisor
SUPERVISOR_LOG = "{ctid}.log"  # in RUNDIR
# what a standby restore supervisor writes on its ready fd once it waits for the word:
# whitespace, so that the JSON verdict after it still parses as a whole
SUPERVISOR_STANDING_BY = b"\n"
CONSOLE_LOG = "{ctid}.console.log"  # in RUNDIR: what the CT wrote to its console
CONSOLE_LOG_MAX = 1 << 20  # bytes; the log is rotated once (.1), so at most twice this
CONSOLE_SOCK = "{ctid}.console.sock"  # in RUNDIR: 'vzbackup console' attaches here
# BINDMOUNT sources are bound here while CRIU restores a CT (see ct/supervisor.py)
BIND_STAGE_DIR = "/run/vzbackup-binds"
# A restored CT's fences are rebuilt on a tmpfs below this (in a throwaway mount namespace)
FENCE_STAGE_DIR = "/run/vzbackup-fence"
# An empty directory CRIU binds in place of a CT's masked directories while it restores
# (ct/fencing.py; the relock replaces them before any task runs)
EMPTY_DIR = "/run/vzbackup-empty"
CRIU_IMAGE_SUBDIR = "Dump.{ctid}"  # OpenVZ's dump file name, a directory of CRIU images here

CLONE_MAC_OUI = "00:18:51"  # MACs of a clone's bridged interfaces: vzctl's OUI

VZDUMP_CONF = "vzdump.conf"  # in VZBACKUP_CONFDIR: backup defaults
# rsync copying a private area: vzmigrate's -aHAX --numeric-ids, sparse files, and mtimes
# compared to the nanosecond (--modify-window=-1; rsync's whole seconds make a second pass
# skip a file rewritten with the same size within the second of the first pass)
RSYNC_OPTS = ("-aHAX", "--numeric-ids", "--sparse", "--modify-window=-1")
BOOT_PARALLEL_PER_CPU = 4  # boot/shutdown: CTs of one BOOTORDER at once, per CPU (vzctl's)
MIGRATE_DISK_MARGIN = 1.1  # a DEST needs this many times a private area's size free
# How long the source waits, its CT frozen, for DEST to restore the CT: a base and more per
# GiB of the CT's memory (DEST reads every page without lazy pages). Past it the CT resumes
# here and DEST's agent removes its copy when the link closes. FREEZE_REPLY_ENV (seconds)
# overrides it.
FREEZE_REPLY_BASE = 60.0
FREEZE_REPLY_PER_GIB = 15.0
FREEZE_REPLY_ENV = "VZBACKUP_FREEZE_REPLY_TIMEOUT"
# the DEST end of a streamed private-area transfer; its module is cli/commands/ under this
# name ("-" as "_"), so DEST's vzbackup finds it without importing every command
RECV_COMMAND = "migrate-recv-tree"
RECV_IMAGES_COMMAND = "migrate-recv-images"  # the DEST end of an online migration's images
RSYNC_VANISHED = 24  # exit code: files vanished while a live tree was read (the next pass copes)
STORAGE_CFG = "storage.cfg"  # in VZBACKUP_CONFDIR: named storages
JOBS_CFG = "jobs.cfg"  # in VZBACKUP_CONFDIR: scheduled jobs
SCHEDULER_DB = "scheduler.db"  # in STATEDIR
SCHEDULER_PID = "vzbackup-scheduler.pid"  # in RUNDIR
METRICS_LISTEN = "127.0.0.1:9737"  # the scheduler's /metrics and report (jobs.cfg metrics-listen)

# OS templates built by 'vzbackup template build' (vzbackup/template/).
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_RELEASES = {"12": "bookworm", "13": "trixie"}  # OpenVZ-style name part -> suite
TEMPLATE_ARCHES = {"x86_64": "amd64"}  # name part -> Debian architecture (host's only)
TEMPLATE_EPOCH = 1704067200  # SOURCE_DATE_EPOCH of built templates: reproducible mtimes
TEMPLATE_BASE_PACKAGES = ("systemd-sysv", "iproute2")  # always installed: init and networking
# The test/demo set: the services issue 17 checkpoints. PostgreSQL rather than MariaDB: lighter
# at rest and no io_uring/libaio (which CRIU can't dump).
TEMPLATE_DEFAULT_PACKAGES = (
    "dbus", "redis-server", "openssh-server", "cron", "postgresql",
    "procps", "netcat-openbsd", "python3-minimal",
)
TEMPLATE_INFO_SUFFIX = ".json"  # NAME.tar.zst.json beside a built template: recipe and inputs
DEBIAN_TEMPLATE = "debian-12-x86_64"  # what setup.sh builds for the tests and the demo

# systemd CTs: drop-ins (paths below the CT's /etc/systemd) written at start while the CT's
# SYSTEMD_CHECKPOINT is yes (the default), removed when it is no. They turn off what CRIU 4.2
# can't dump or restore (measured on Debian 12 / systemd 252 and Debian 13 / systemd 257, see
# README "Checkpointable systemd CTs"): nested UTS/IPC/user namespaces, BPF programs PID 1
# holds for IP filtering, hugetlbfs, and PSI triggers on cgroup memory.pressure files.
# Every other sandboxing option is kept.
_DROPIN_HEAD = """\
# Written by vzbackup at CT start; set SYSTEMD_CHECKPOINT="no" in the CT's config to drop it.
"""
SYSTEMD_DROPINS = {
    "system/service.d/50-vzbackup-checkpoint.conf": _DROPIN_HEAD + """\
# CRIU (checkpoint, backup with state, live migration) cannot dump what these sandboxing
# options create: nested UTS, IPC and user namespaces (ProtectHostname=, PrivateIPC=,
# PrivateUsers=) and the cgroup BPF programs systemd holds for IP filtering (IPAddressDeny=,
# IPAddressAllow=, IP*FilterPath=, SocketBind*=, RestrictNetworkInterfaces=). They are off for
# every service; all other sandboxing options (PrivateTmp=, PrivateDevices=, ProtectSystem=,
# SystemCallFilter=, NoNewPrivileges=, ...) stay as the units say. A unit's own later drop-in
# (e.g. redis-server.service.d/60-local.conf) can turn one back on, at the price of checkpoints.
[Service]
ProtectHostname=no
PrivateIPC=no
PrivateUsers=no
IPAddressDeny=
IPAddressAllow=
IPIngressFilterPath=
IPEgressFilterPath=
SocketBindAllow=
SocketBindDeny=
RestrictNetworkInterfaces=
""",
    "system/dev-hugepages.mount.d/50-vzbackup-checkpoint.conf": _DROPIN_HEAD + """\
# CRIU cannot dump a hugetlbfs mount: systemd leaves /dev/hugepages unmounted in this CT.
[Unit]
ConditionVirtualization=!container
""",
    "system.conf.d/50-vzbackup-checkpoint.conf": _DROPIN_HEAD + """\
# systemd >= 254 hands each service its cgroup's memory.pressure file to watch (bound into
# services with ProtectControlGroups=): CRIU can't restore that bind mount, nor reopen the
# file as the CT's root before vzbackup delegates the restored cgroups, nor re-arm a PSI
# trigger. Off for every unit; PID 1 itself gets MEMORY_PRESSURE_WATCH=/dev/null in its
# environment for the same reason. (systemd 252 doesn't know the key and says so once.)
[Manager]
DefaultMemoryPressureWatch=off
""",
}
# What PID 1 of a CT with the drop-ins gets in its environment besides runtime.INIT_ENV.
SYSTEMD_CHECKPOINT_ENV = {"MEMORY_PRESSURE_WATCH": "/dev/null"}
