"""Real containers from the busybox template: lifecycle, network, cgroups, set, names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from nodebed import NodeBed, http_get, wait_for

from vzbackup.config.node import Node
from vzbackup.ct.cgroups import open_cgroups


def test_lifecycle_create_start_exec_stop_destroy(node: NodeBed) -> None:
    ctid, ip = node.new_ctid(), node.new_ip()
    node.vz("create", str(ctid), "--ipadd", ip, "--hostname", "web1")
    assert (node.prefix / f"etc/vz/conf/{ctid}.conf").exists()
    assert node.vz("status", str(ctid)).stdout.split() == [
        "CTID",
        str(ctid),
        "exist",
        "unmounted",
        "stopped",
    ]
    node.vz("start", str(ctid))
    st = json.loads(node.vz("status", str(ctid), "--json").stdout)
    assert st["status"] == "running" and st["mounted"] and st["init_pid"] > 1
    # The CT is its own world: PID 1 is busybox init, its own hostname, its own root.
    assert node.sh(ctid, "cat /proc/1/comm").strip() == "init"
    assert node.sh(ctid, "hostname").strip() == "web1"
    assert node.sh(ctid, "cat /etc/hostname").strip() == "web1"
    assert node.sh(ctid, "ls /").split() == sorted(node.sh(ctid, "ls /").split())
    assert "vzbackup busybox template" in node.sh(ctid, "cat /www/index.html")
    mounts = node.sh(ctid, "cat /proc/mounts")
    assert "sysfs /sys sysfs ro" in mounts and "devpts /dev/pts devpts" in mounts
    assert sorted(node.sh(ctid, "ls /dev").split()) == sorted(
        [
            "console",
            "fd",
            "full",
            "null",
            "ptmx",
            "pts",
            "random",
            "shm",
            "stderr",
            "stdin",
            "stdout",
            "tty",
            "urandom",
            "zero",
        ]
    )
    # exec passes the exit code through.
    assert node.vz("exec", str(ctid), "exit 7", check=False).returncode == 7
    # The service answers from the host over the CT's routed IP.
    page = wait_for(lambda: http_get(ip), what="httpd in the CT")
    assert "vzbackup busybox template" in page
    node.vz("stop", str(ctid))
    assert "stopped" in node.vz("status", str(ctid)).stdout
    cg = open_cgroups(f"{Node.load(str(node.prefix)).cgroup_parent}/{ctid}")
    assert not any(Path(p).exists() for p in cg.controller_paths().values())
    node.vz("destroy", str(ctid))
    assert not (node.prefix / f"vz/private/{ctid}").exists()
    assert not (node.prefix / f"etc/vz/conf/{ctid}.conf").exists()
    assert "deleted" in node.vz("status", str(ctid)).stdout


def test_supervisor_owns_init_and_survives_the_cli(node: NodeBed) -> None:
    ctid, _ = node.create_running()
    st = json.loads((node.prefix / f"vz/run/{ctid}.state").read_text())
    ppid = int(Path(f"/proc/{st['init_pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == st["supervisor_pid"]
    assert "vzsup" in Path(f"/proc/{ppid}/comm").read_text()
    node.vz("restart", str(ctid))
    after = json.loads((node.prefix / f"vz/run/{ctid}.state").read_text())
    assert after["init_pid"] != st["init_pid"] and after["supervisor_pid"] != st["supervisor_pid"]
    wait_for(lambda: not Path(f"/proc/{st['supervisor_pid']}").exists(), what="old supervisor exit")


def test_graceful_stop_runs_shutdown_and_kill_after_timeout(node: NodeBed) -> None:
    ctid, _ = node.create_running()
    node.vz("stop", str(ctid))
    assert "rcK" in (node.prefix / f"vz/private/{ctid}/var/log/messages").read_text()
    node.vz("start", str(ctid))
    # An init that ignores halt is killed once the timeout passes.
    node.sh(ctid, "mv /sbin/halt /sbin/halt.off")
    node.vz("stop", str(ctid), "--timeout", "1")
    assert "stopped" in node.vz("status", str(ctid)).stdout
    (node.prefix / f"vz/private/{ctid}/sbin/halt.off").rename(
        node.prefix / f"vz/private/{ctid}/sbin/halt"
    )


def test_stop_refuses_a_timeout_it_would_not_keep(node: NodeBed) -> None:
    """'stop --fast -t N' (no clean halt to wait for) and a negative -t are refused; the
    first used to kill at once and drop -t, the second to kill after 'waiting -3s'."""
    ctid, _ = node.create_running()
    for args in (["stop", "--fast", "-t", "5"], ["stop", "-t", "-3"], ["restart", "-t", "-3"],
                 ["shutdown", "-t", "-3"]):
        res = node.vz(*args, *([str(ctid)] if args[0] != "shutdown" else []), check=False)
        assert res.returncode == 2, (args, res.stderr)
    assert node.vz("status", str(ctid)).stdout.split()[-1] == "running"
    node.vz("stop", "-t", "0", str(ctid))
    assert node.vz("status", str(ctid)).stdout.split()[-1] == "stopped"


def test_list_columns_filters_and_json(node: NodeBed) -> None:
    a, _ = node.create_running("--name", "alpha")
    b, ip_b = node.new_ctid(), node.new_ip()
    node.vz("create", str(b), "--ipadd", ip_b, "--hostname", "beta")
    out = node.vz("list").stdout.splitlines()
    assert out[0].split() == ["CTID", "NPROC", "STATUS", "IP_ADDR", "HOSTNAME"]
    assert len(out) == 2 and out[1].split()[0] == str(a) and "running" in out[1]
    everything = node.vz("list", "-a", "-H", "-o", "ctid,name,status").stdout.splitlines()
    assert [ln.split() for ln in everything] == [
        [str(a), "alpha", "running"],
        [str(b), "-", "stopped"],
    ]
    rows = json.loads(node.vz("list", "-a", "--json").stdout)
    assert {r["ctid"]: r["status"] for r in rows} == {a: "running", b: "stopped"}
    assert int(rows[0]["nproc"]) >= 3
    assert node.vz("list", "-o", "bogus", check=False).returncode == 2


def test_names_resolve_like_vzctl(node: NodeBed) -> None:
    ctid, ip = node.new_ctid(), node.new_ip()
    node.vz("create", str(ctid), "--ipadd", ip, "--name", "db1")
    assert (node.prefix / "etc/vz/names/db1").is_symlink()
    node.vz("start", "db1")
    assert node.sh(ctid, "echo hi").strip() == "hi"
    node.vz("set", "db1", "--name", "db2", "--save")
    assert not (node.prefix / "etc/vz/names/db1").exists()
    assert node.vz("status", "db2").stdout.split()[1] == str(ctid)


def test_cgroup_limits_applied_and_changed_live(node: NodeBed) -> None:
    ctid, ip = node.new_ctid(), node.new_ip()
    node.vz("create", str(ctid), "--ipadd", ip, "--config", "light")
    node.vz(
        "set",
        str(ctid),
        "--ram",
        "96M",
        "--cpus",
        "1",
        "--cpulimit",
        "50",
        "--numproc",
        "40",
        "--save",
    )
    node.vz("start", str(ctid))
    cg = open_cgroups(f"{Node.load(str(node.prefix)).cgroup_parent}/{ctid}")
    lim = cg.read_limits()
    assert int(lim["memory"]) == 96 << 20
    assert lim["pids_max"] == "40"
    assert lim["cpus"] == "0"
    assert "50000" in lim["cpu_quota"]
    # Every CT process is inside the cgroup.
    init = json.loads((node.prefix / f"vz/run/{ctid}.state").read_text())["init_pid"]
    assert init in cg.pids()
    # The pids limit really bites inside the CT.
    res = node.vz(
        "exec",
        str(ctid),
        "for i in $(seq 60); do sleep 31 </dev/null >/dev/null 2>&1 & done",
        check=False,
    )
    assert "can't fork" in res.stderr
    assert 30 <= len(cg.pids()) <= 40
    for p in cg.pids():
        if b"sleep 31" in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" "):
            os.kill(p, signal.SIGKILL)
    # The memory limit really bites: filling /dev/shm past it gets the writer killed or refused.
    res = node.vz(
        "exec", str(ctid), "dd if=/dev/zero of=/dev/shm/fill bs=1M count=200", check=False
    )
    assert res.returncode != 0
    node.sh(ctid, "rm -f /dev/shm/fill")
    # Live change without --save: applied, config untouched.
    node.vz("set", str(ctid), "--ram", "128M")
    assert int(cg.read_limits()["memory"]) == 128 << 20
    assert 'PHYSPAGES="0:24576"' in (node.prefix / f"etc/vz/conf/{ctid}.conf").read_text()


def test_set_hostname_ip_and_nameserver_on_running_ct(node: NodeBed) -> None:
    ctid, ip = node.create_running()
    extra = node.new_ip()
    node.vz(
        "set",
        str(ctid),
        "--hostname",
        "renamed",
        "--ipadd",
        extra,
        "--nameserver",
        "192.0.2.53",
        "--searchdomain",
        "example.test",
        "--save",
    )
    assert node.sh(ctid, "hostname").strip() == "renamed"
    assert "nameserver 192.0.2.53" in node.sh(ctid, "cat /etc/resolv.conf")
    assert "vzbackup" in wait_for(lambda: http_get(extra), what="the added IP")
    node.vz("set", str(ctid), "--ipdel", ip, "--save")
    conf = (node.prefix / f"etc/vz/conf/{ctid}.conf").read_text()
    assert f'IP_ADDRESS="{extra}"' in conf and 'HOSTNAME="renamed"' in conf
    assert ip not in node.sh(ctid, "ip -4 addr show eth0")
    # A stopped CT takes settings only with --save.
    node.vz("stop", str(ctid))
    res = node.vz("set", str(ctid), "--onboot", "yes", check=False)
    assert res.returncode == 2 and "--save" in res.stderr


def test_set_without_save_refuses_what_only_the_config_holds(node: NodeBed) -> None:
    """--onboot, --bootorder, --stop-mode, --bindmount and --name have nothing to apply to a
    running CT: without --save they are refused, not reported applied and dropped (--name
    left a name link its config did not know)."""
    ctid, _ = node.create_running()
    conf = node.prefix / f"etc/vz/conf/{ctid}.conf"
    before = conf.read_text()
    for opts in (["--onboot", "yes"], ["--bootorder", "0"], ["--stop-mode", "suspend"],
                 ["--bindmount", "/srv:/mnt/srv"], ["--name", "kept"],
                 ["--cpuunits", "600", "--name", "kept"]):
        res = node.vz("set", str(ctid), *opts, check=False)
        assert res.returncode == 2 and "add --save" in res.stderr, (opts, res.stderr)
    assert conf.read_text() == before
    assert not (node.prefix / "etc/vz/names/kept").is_symlink()
    node.vz("set", str(ctid), "--onboot", "yes", "--name", "kept", "--save")
    assert 'ONBOOT="yes"' in conf.read_text() and 'NAME="kept"' in conf.read_text()
    assert node.vz("status", "kept").stdout.split()[1] == str(ctid)


def test_set_ipdel_then_ipadd_of_the_same_address_keeps_it(node: NodeBed) -> None:
    """--ipdel deletes before --ipadd adds (vzctl's order): '--ipdel all --ipadd IP' leaves
    exactly IP, also when IP was one of the CT's; it used to be dropped from the config and
    the running CT alike."""
    ctid, ip = node.create_running()
    other = node.new_ip()
    node.vz("set", str(ctid), "--ipadd", other, "--save")
    conf = node.prefix / f"etc/vz/conf/{ctid}.conf"
    node.vz("set", str(ctid), "--ipdel", "all", "--ipadd", ip, "--save")
    assert f'IP_ADDRESS="{ip}"' in conf.read_text()
    addrs = node.sh(ctid, "ip -4 addr show")
    assert f"{ip}/32" in addrs and f"{other}/" not in addrs
    assert "vzbackup" in wait_for(lambda: http_get(ip), what="the address kept")
    node.vz("set", str(ctid), "--ipdel", ip, "--ipadd", ip, "--ipadd", other, "--ipadd", other)
    assert "vzbackup" in wait_for(lambda: http_get(other), what="the address added")
    assert f"{ip}/32" in node.sh(ctid, "ip -4 addr show")


def test_an_address_is_the_cts_once_whatever_its_prefix(node: NodeBed) -> None:
    """'create --ipadd IP --ipadd IP' gives the CT IP once (it wrote it twice), '--ipadd
    IP/32' of an IP the CT has adds nothing, '--ipdel IP/32' deletes IP (it said the CT had
    no IP/32) and takes it off the running CT; one address with two prefixes is refused."""
    ctid, ip, other = node.new_ctid(), node.new_ip(), node.new_ip()
    conf = node.prefix / f"etc/vz/conf/{ctid}.conf"
    res = node.vz("create", str(ctid), "--ipadd", ip, "--ipadd", f"{ip}/24", check=False)
    assert res.returncode == 2 and f"{ip} and {ip}/24 are the same address" in res.stderr
    assert not conf.exists()
    node.vz("create", str(ctid), "--ipadd", ip, "--ipadd", ip)
    assert f'IP_ADDRESS="{ip}"' in conf.read_text()
    node.vz("start", str(ctid))
    node.vz("set", str(ctid), "--ipadd", f"{ip}/32", "--ipadd", other, "--ipadd", other,
            "--save")
    assert f'IP_ADDRESS="{ip} {other}"' in conf.read_text()
    node.vz("set", str(ctid), "--ipdel", f"{ip}/32", "--save")
    assert f'IP_ADDRESS="{other}"' in conf.read_text()
    addrs = node.sh(ctid, "ip -4 addr show")
    assert f"{ip}/" not in addrs and f"{other}/32" in addrs
    res = node.vz("set", str(ctid), "--ipdel", f"{ip}/32", check=False)
    assert res.returncode == 2 and f"has no IP {ip}" in res.stderr


def test_set_nameserver_and_searchdomain_keep_the_cts_other_resolver_lines(
        node: NodeBed) -> None:
    """--searchdomain replaces the search line and --nameserver the nameservers, as vzctl's
    set_dns: the CT's other lines stay. --searchdomain alone used to drop the CT's
    nameservers (and both its options), leaving it without DNS."""
    ctid, _ = node.create_running()
    node.sh(ctid, "printf 'search old.test\\nnameserver 192.0.2.1\\noptions ndots:2\\n' "
                  "> /etc/resolv.conf")
    node.vz("set", str(ctid), "--searchdomain", "example.test")
    assert node.sh(ctid, "cat /etc/resolv.conf").splitlines() == [
        "search example.test", "nameserver 192.0.2.1", "options ndots:2"]
    node.vz("set", str(ctid), "--nameserver", "192.0.2.53", "--save")
    assert node.sh(ctid, "cat /etc/resolv.conf").splitlines() == [
        "search example.test", "options ndots:2", "nameserver 192.0.2.53"]
    # An address only: vzctl's 'inherit' was written as 'nameserver inherit', and the CT
    # had no resolver left
    res = node.vz("set", str(ctid), "--nameserver", "inherit", "--save", check=False)
    assert res.returncode == 2 and "not an IP address" in res.stderr
    node.vz("restart", str(ctid))  # written again at start from the config: the same
    assert node.sh(ctid, "cat /etc/resolv.conf").splitlines() == [
        "search example.test", "options ndots:2", "nameserver 192.0.2.53"]


def test_hostname_keeps_the_cts_other_hosts_lines(node: NodeBed) -> None:
    """HOSTNAME (at start, set --hostname) replaces only the hostname's line of /etc/hosts,
    as vzctl's change_hostname: the file used to be rewritten whole at every start, losing the
    template's ::1 line and whatever the CT's owner had added."""
    ctid, ip = node.create_running()
    node.sh(ctid, "echo '192.0.2.7 db db.example.test' >> /etc/hosts")
    node.vz("restart", str(ctid))
    hosts = node.sh(ctid, "cat /etc/hosts").splitlines()
    assert hosts == ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                     "192.0.2.7 db db.example.test", f"{ip} ct{ctid}"]
    node.vz("set", str(ctid), "--hostname", "renamed")
    assert node.sh(ctid, "cat /etc/hosts").splitlines() == [*hosts[:3], f"{ip} renamed"]
    # a big one (a blocklist: 160 KB) is kept whole, not cut where the node stopped reading
    blocked = [f"0.0.0.0 ads{i}.example.test" for i in range(6000)]
    node.sh(ctid, "for i in $(seq 0 5999); do echo 0.0.0.0 ads$i.example.test; done"
                  " >> /etc/hosts")
    node.vz("restart", str(ctid))
    assert node.sh(ctid, "cat /etc/hosts").splitlines() == [*hosts[:3], *blocked,
                                                             f"{ip} ct{ctid}"]


def test_bridged_network_via_netif(node: NodeBed) -> None:
    bridge = f"vzbrc{node.new_ctid() % 1000}"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.199.250.1/24", "dev", bridge], check=True)
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        ctid = node.new_ctid()
        node.vz("create", str(ctid), "--hostname", "bridged")
        conf = node.prefix / f"etc/vz/conf/{ctid}.conf"
        conf.write_text(
            conf.read_text() + f'NETIF="ifname=eth1,bridge={bridge},'
            'ip=10.199.250.7/24,gw=10.199.250.1"\n'
        )
        node.vz("start", str(ctid))
        assert "vzbackup" in wait_for(lambda: http_get("10.199.250.7"), what="bridged CT")
        assert "10.199.250.7/24" in node.sh(ctid, "ip -4 addr show eth1")
        node.vz("stop", str(ctid))
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=False)


def test_mount_umount(node: NodeBed) -> None:
    ctid = node.new_ctid()
    node.vz("create", str(ctid))
    node.vz("mount", str(ctid))
    assert (node.prefix / f"vz/root/{ctid}/bin/busybox").exists()
    assert "exist mounted stopped" in node.vz("status", str(ctid)).stdout
    node.vz("umount", str(ctid))
    assert not (node.prefix / f"vz/root/{ctid}/bin/busybox").exists()


def test_bind_mount_from_host(node: NodeBed, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("hello")
    os.chown(shared, 100000, 100000)  # writable by the unprivileged CT's root (node id 100000)
    ctid, _ = node.new_ctid(), None
    node.vz("create", str(ctid))
    node.vz("set", str(ctid), "--bindmount", f"{shared}:/mnt/shared", "--save")
    node.vz("start", str(ctid))
    assert node.sh(ctid, "cat /mnt/shared/from-host") == "hello"
    node.sh(ctid, "echo back > /mnt/shared/from-ct")
    assert (shared / "from-ct").read_text() == "back\n"
