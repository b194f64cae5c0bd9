"""Clusters of guests on a private network under TCG: what a replicated system costs.

    python -m benchmarks cluster [-- --runs 3 --nodes 3 --parts boot,net,etcd,redis,rack,memory]

The figures phase B of the cluster work (issue 21) is designed on, each
measured in one run so the ratios hold on a shared, loaded machine:

- `boot`: a cluster of `--nodes` guests (harness.vm.cluster.Cluster: every
  QEMU started, then each waited for, each put on the private network, every
  node reaching every other) against one guest of the same image, booted the
  same way, alternating run by run; the ratio of the medians.
- `net`: round trip (busybox ping, 10 packets) and a 16 MiB transfer
  (busybox nc) between two nodes through the switch.
- `etcd`: Debian's etcd-server and etcd-client 3.4.23 on each node, data dir
  on the node's /dev/vda (ext4 made on the host, QEMU's built-in virtio-blk,
  writeback): a static bootstrap with --initial-cluster; seconds from the
  start commands until every endpoint reports healthy; a put's latency with
  `etcdctl put` (a Go binary started per put) and with busybox wget against
  the v3 JSON gateway, and `etcdctl version` alone (the process start); QEMU
  RSS per node, guest memory in use, etcd's RSS; whether `--unsafe-no-fsync`
  exists (accepted, while an unknown flag exits 2).
- `redis`: Debian's redis-server 7.0, n1 primary (AOF, appendfsync always),
  the others `--replicaof n1`: seconds until both replicas are in sync; a
  write acknowledged by the cluster (`SET`, then `WAIT <replicas> 5000`) per
  redis-cli process, and in one long-lived redis-cli; memory as for etcd.

- `rack`: etcd on three powercut disks (log-writes over powerfail, served by
  `powercut serve`), a client putting through n1's gateway, a rack cut after
  `--rack-acks` acknowledgements (every disk frozen, every QEMU killed, each
  disk cut lose-all and judged by the oracle), every node rebooted, etcd
  recovering on its own, the acknowledged keys looked up: as shipped and
  with `--unsafe-no-fsync`.
- `memory`: one guest starting programs over and over, with QEMU's default
  TCG translation buffer and with the cluster's cap (`TCG_TB_MIB`),
  alternating: RSS after boot and after the work, and the work's time.

Images: the recipe plus `--etcd-packages` / `--redis-packages` (built once,
cached). Results: benchmarks/results/cluster-<time>.json.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import machine_info
from harness.crash.session import CrashBackend, fault_blockdev
from harness.durability import oracle
from harness.durability.contract import CutPolicy, FaultModel, reference_promise
from harness.durability.cut import apply_cut
from harness.errors import PowercutError
from harness.guest.ssh import SSHSession
from harness.vm.clock import clock_append
from harness.vm.cluster import TCG_TB_MIB, Cluster
from harness.vm.image import GuestImage, ensure_image
from harness.vm.network import ENV_FILE, NetworkPlan
from harness.vm.qemu import QemuMachine
from harness.vm.spec import Accel, FileDisk, MachineSpec, VhostUserDisk
from harness.workloads.filesystem import make_disk

ETCD_PACKAGES = ["etcd-server", "etcd-client"]
REDIS_PACKAGES = ["redis-server"]
GOAL_BOOT_RATIO = 3.0
DISK_BYTES = 512 << 20  # etcd preallocates 64 MiB WAL segments

# Static bootstrap of every node from the node environment (harness/vm/network.py).
# Timings raised for TCG: 100 ms heartbeats slip by hundreds of ms on a loaded host.
ETCD_START = r"""
set -e
mkdir -p /var/lib/etcd
mountpoint -q /var/lib/etcd || mount /dev/vda /var/lib/etcd
. {env}
cluster=$(echo "$POWERCUT_NODES" | sed 's/=\([0-9.]*\)/=http:\/\/\1:2380/g')
a=$POWERCUT_NODE_ADDRESS
setsid etcd --name "$POWERCUT_NODE" --data-dir /var/lib/etcd/data \
  --listen-peer-urls "http://$a:2380" --initial-advertise-peer-urls "http://$a:2380" \
  --listen-client-urls "http://$a:2379,http://127.0.0.1:2379" \
  --advertise-client-urls "http://$a:2379" \
  --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token powercut \
  --heartbeat-interval 300 --election-timeout 3000 \
  --logger zap --log-outputs /var/log/etcd.log {extra} </dev/null >/dev/null 2>&1 &
""".replace("{env}", ENV_FILE)

REDIS_START = r"""
set -e
mkdir -p /mnt && mountpoint -q /mnt || mount /dev/vda /mnt
mkdir -p /mnt/data
. {env}
role=
[ "$POWERCUT_NODE" = n1 ] || role="--replicaof n1 6379"
redis-server --bind 0.0.0.0 --protected-mode no --dir /mnt/data --appendonly yes \
  --appendfsync always --save '' --daemonize yes --pidfile /run/redis.pid \
  --logfile /var/log/redis.log $role
""".replace("{env}", ENV_FILE)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _status_mib(pid: int) -> dict[str, float]:
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def _guest_memory(ssh: SSHSession, process: str) -> dict[str, float]:
    out = ssh.check_output(
        "awk '/MemTotal|MemAvailable/ {print $2}' /proc/meminfo; "
        f"grep -E 'VmRSS|VmHWM' /proc/$(pidof {process} | cut -d' ' -f1)/status "
        "| awk '{print $2}'"
    ).split()
    total, available, rss, hwm = (int(x) / 1024 for x in out[:4])
    return {
        "guest_total_mib": round(total, 1),
        "guest_in_use_mib": round(total - available, 1),
        f"{process}_rss_mib": round(rss, 1),
        f"{process}_hwm_mib": round(hwm, 1),
    }


def _qemu_memory(cluster: Cluster) -> dict[str, dict[str, float]]:
    out = {}
    for name, machine in cluster.machines.items():
        assert machine.process is not None
        out[name] = _status_mib(machine.process.pid)
    return out


def _timed_loop(ssh: SSHSession, body: str, count: int, timeout: float = 900) -> dict[str, Any]:
    """`count` runs of `body` ($i is the run), each timed in the guest; failures counted."""
    script = (
        f"for i in $(seq {count}); do s=$(date +%s%N); "
        f"if {body} >/dev/null 2>/tmp/timed.err; then r=ok; else r=fail; fi; "
        'e=$(date +%s%N); echo "$r $(( (e - s) / 1000 ))"; done'
    )
    result = ssh.run(script, timeout=timeout)
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    ok = [int(us) / 1e6 for r, us in rows if r == "ok"]
    failed = [int(us) / 1e6 for r, us in rows if r != "ok"]
    out: dict[str, Any] = _stats(ok) if ok else {"n": 0}
    out["failed"] = len(failed)
    if failed:
        out["failed_after_s"] = [round(x, 3) for x in failed]
        out["last_error"] = ssh.run("tail -c 300 /tmp/timed.err").stdout
    return out


def _stats(samples: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(samples), 4),
        "min_s": round(min(samples), 4),
        "max_s": round(max(samples), 4),
        "n": len(samples),
    }


def _on_every_node(cluster: Cluster, command: Callable[[str, SSHSession], Any]) -> dict[str, Any]:
    with ThreadPoolExecutor(len(cluster.machines)) as pool:
        futures = {n: pool.submit(command, n, m.ssh) for n, m in cluster.machines.items()}
        return {n: f.result() for n, f in futures.items()}


def _disks(work: Path, tag: str) -> Callable[[str], list[FileDisk]]:
    def disks(name: str) -> list[FileDisk]:
        path = work / f"{tag}-{name}.img"
        make_disk(path, DISK_BYTES, filesystem="ext4")
        return [FileDisk(path, "writeback")]

    return disks


def _wait(what: str, probe: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while not probe():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what}: not after {timeout:.0f}s")
        time.sleep(0.2)
    return time.monotonic() - t0


# -- the parts -----------------------------------------------------------------------


def bench_boot(image: GuestImage, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    times: dict[str, list[float]] = {"1": [], str(args.nodes): []}
    per_node: list[dict[str, float]] = []
    for run in range(args.runs):
        for n in (1, args.nodes):
            with Cluster(
                image, NetworkPlan.of(n), memory_mib=args.memory, accel=Accel(args.accel)
            ) as cluster:
                seconds = cluster.boot()
                times[str(n)].append(round(seconds, 3))
                if n > 1:
                    per_node.append(
                        {k: round(m.boot_seconds or 0, 3) for k, m in cluster.machines.items()}
                    )
            _say(f"boot run {run + 1}/{args.runs}: {n} node(s) up and connected in {seconds:.2f}s")
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med[str(args.nodes)] / med["1"]
    return {
        "seconds": times,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "ssh_ready_s_per_node": per_node,
        "ratio": round(ratio, 3),
        "goal": f"{args.nodes} nodes / 1 node <= {GOAL_BOOT_RATIO}",
        "goal_met": ratio <= GOAL_BOOT_RATIO,
    }


def bench_net(image: GuestImage, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with Cluster(
        image, NetworkPlan.of(2), memory_mib=args.memory, accel=Accel(args.accel)
    ) as cluster:
        cluster.boot()
        n1, n2 = cluster["n1"].ssh, cluster["n2"].ssh
        ping = n1.check_output("ping -c 10 -i 0.2 n2 | tail -1")
        n2.run(
            "setsid sh -c 'busybox nc -l -p 5001 | wc -c > /tmp/nc.count' "
            "</dev/null >/dev/null 2>&1 &"
        )
        _wait("nc listening on n2", lambda: ":5001 " in n2.run("busybox netstat -ltn").stdout, 60)
        # bash's /dev/tcp: busybox nc as the sender stops at the end of its input
        # before its last bytes are out (65536 of 16 MiB arrived).
        out = n1.run(
            "s=$(date +%s%N); bash -c 'dd if=/dev/zero bs=64k count=256 2>/dev/null "
            "> /dev/tcp/n2/5001'; e=$(date +%s%N); echo $(( (e - s) / 1000 ))",
            timeout=300,
        )
        _wait("the count on n2", lambda: n2.run("cat /tmp/nc.count").stdout.strip() != "", 60)
        received = int(n2.check_output("cat /tmp/nc.count"))
        stats = cluster.network.stats()
        switch = cluster.network.switch.proc
        assert switch is not None
        ticks = Path(f"/proc/{switch.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]
        switch_cpu = sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")
    micros = int(out.stdout.split()[-1]) if out.stdout.split() else None
    return {
        "ping_10": ping.strip(),
        "transfer_16mib_s": micros / 1e6 if micros else None,
        "transfer_mib_per_s": round(16 / (micros / 1e6), 2) if micros else None,
        "transfer_exit": out.exit_code,
        "bytes_received": received,
        "switch_cpu_s_whole_part": switch_cpu,
        "switch_ports": {
            k: {f: v[f] for f in ("frames_in", "frames_out", "dropped")}
            for k, v in stats["ports"].items()
        },
    }


def _etcd_healthy(ssh: SSHSession, endpoints: str) -> bool:
    return ssh.run(
        f"etcdctl --endpoints={endpoints} --command-timeout=3s endpoint health", timeout=60
    ).ok


def _etcd_state(cluster: Cluster, endpoints: str) -> str:
    """What each node's etcd says, for a cluster that did not become healthy."""
    health = cluster["n1"].ssh.run(
        f"etcdctl --endpoints={endpoints} --command-timeout=10s endpoint health 2>&1", timeout=120
    )
    logs = _on_every_node(
        cluster,
        lambda _n, ssh: ssh.run("pidof etcd; tail -c 700 /var/log/etcd.log").stdout,
    )
    return f"health: {health.stdout[-700:]}; logs: {logs}"


def bench_etcd(image: GuestImage, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    plan = NetworkPlan.of(args.nodes)
    endpoints = ",".join(f"http://{n.address}:2379" for n in plan.nodes)
    result: dict[str, Any] = {"version": None}
    with Cluster(
        image, plan, disks=_disks(work, "etcd"), memory_mib=args.memory, accel=Accel(args.accel)
    ) as cluster:
        result["boot_s"] = round(cluster.boot(), 3)
        n1 = cluster["n1"].ssh
        result["version"] = n1.check_output("etcd --version | head -1").strip()
        # --unsafe-no-fsync: not in --help in 3.4, so try it (an unknown flag exits 2 at once).
        probe = (
            "cd /tmp && rm -rf probe.etcd && timeout 5 etcd --name probe --data-dir probe.etcd "
            "--listen-client-urls http://127.0.0.1:12379 --advertise-client-urls "
            "http://127.0.0.1:12379 --listen-peer-urls http://127.0.0.1:12380 "
            "--initial-advertise-peer-urls http://127.0.0.1:12380 "
            "--initial-cluster probe=http://127.0.0.1:12380 {flag} >/tmp/probe.log 2>&1; "
            "echo $?; rm -rf probe.etcd"
        )
        result["unsafe_no_fsync"] = {
            "in_help": "unsafe-no-fsync" in n1.run("etcd --help 2>&1").stdout,
            "exit_with_flag": int(
                n1.check_output(probe.format(flag="--unsafe-no-fsync"), timeout=60)
            ),
            "exit_with_unknown_flag": int(
                n1.check_output(probe.format(flag="--no-such-flag"), timeout=60)
            ),
            "note": "124: still running when `timeout 5` stopped it (the flag was accepted)",
        }
        t0 = time.monotonic()

        def start(name: str, ssh: SSHSession) -> None:
            ssh.put_bytes(ETCD_START.replace("{extra}", "").encode(), "/tmp/etcd-start.sh")
            ssh.check_output("sh /tmp/etcd-start.sh", timeout=120)

        _on_every_node(cluster, start)
        started = time.monotonic() - t0
        try:
            healthy = _wait("etcd healthy", lambda: _etcd_healthy(n1, endpoints), 600)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; {_etcd_state(cluster, endpoints)}") from None
        result["start_commands_s"] = round(started, 3)
        result["healthy_after_start_s"] = round(healthy, 3)
        result["members"] = n1.check_output(f"etcdctl --endpoints={endpoints} member list")
        count = args.puts
        etcdctl = f"etcdctl --endpoints={endpoints} --command-timeout=30s"
        result["put_etcdctl"] = _timed_loop(n1, f"{etcdctl} put key$i value$i", count)
        result["etcdctl_version_only"] = _timed_loop(n1, "etcdctl version", count)
        result["true_only"] = _timed_loop(n1, "/bin/true", count)
        # The v3 JSON gateway: one static busybox per put instead of a Go binary.
        keys = " ".join(base64.b64encode(f"gw{i}".encode()).decode() for i in range(count))
        result["put_gateway_wget"] = _timed_loop(
            n1,
            f"set -- {keys}; shift $((i - 1)); busybox wget -q -O- --header "
            "'Content-Type: application/json' --post-data "
            '"{\\"key\\":\\"$1\\",\\"value\\":\\"dg==\\"}" http://127.0.0.1:2379/v3/kv/put',
            count,
        )
        written = n1.check_output(
            f"etcdctl --endpoints={endpoints} get --prefix '' --keys-only | grep -c ."
        )
        result["keys_written"] = int(written)
        result["memory"] = {
            "qemu": _qemu_memory(cluster),
            "guest": _on_every_node(cluster, lambda _n, ssh: _guest_memory(ssh, "etcd")),
        }
        result["leader_elections"] = _on_every_node(
            cluster,
            lambda _n, ssh: int(
                ssh.run("grep -c 'elected leader' /var/log/etcd.log").stdout.strip() or 0
            ),
        )
    return result


def _redis_in_sync(ssh: SSHSession, replicas: int) -> bool:
    info = ssh.run("redis-cli -h n1 info replication", timeout=30).stdout
    return f"connected_slaves:{replicas}" in info and info.count("state=online") == replicas


def bench_redis(image: GuestImage, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    plan = NetworkPlan.of(args.nodes)
    replicas = args.nodes - 1
    result: dict[str, Any] = {}
    with Cluster(
        image, plan, disks=_disks(work, "redis"), memory_mib=args.memory, accel=Accel(args.accel)
    ) as cluster:
        result["boot_s"] = round(cluster.boot(), 3)
        n1 = cluster["n1"].ssh
        result["version"] = n1.check_output("redis-server --version").strip()
        t0 = time.monotonic()

        def start(name: str, ssh: SSHSession) -> None:
            ssh.put_bytes(REDIS_START.encode(), "/tmp/redis-start.sh")
            ssh.check_output("sh /tmp/redis-start.sh", timeout=120)

        _on_every_node(cluster, start)
        started = time.monotonic() - t0
        in_sync = _wait("redis replicas in sync", lambda: _redis_in_sync(n1, replicas), 600)
        result["start_commands_s"] = round(started, 3)
        result["in_sync_after_start_s"] = round(in_sync, 3)
        count = args.puts
        set_wait = f"printf 'SET key$i v$i\\nWAIT {replicas} 5000\\n' | redis-cli"
        result["set_wait_per_redis_cli"] = _timed_loop(
            n1, f"{set_wait} | grep -qx {replicas}", count
        )
        result["redis_cli_ping_only"] = _timed_loop(n1, "redis-cli ping", count)
        lines = "".join(f"SET long{i} v{i}\\nWAIT {replicas} 5000\\n" for i in range(count))
        out = n1.run(
            f"s=$(date +%s%N); printf '{lines}' | redis-cli > /tmp/long.out; "
            "e=$(date +%s%N); echo $(( (e - s) / 1000 )); "
            f"grep -cx {replicas} /tmp/long.out",
            timeout=600,
        ).stdout.split()
        result["set_wait_one_redis_cli"] = {
            "per_write_s": round(int(out[0]) / 1e6 / count, 4),
            "acknowledged_by_all": int(out[1]),
            "n": count,
        }
        result["replica_keys"] = _on_every_node(
            cluster, lambda _n, ssh: int(ssh.check_output("redis-cli dbsize").strip())
        )
        result["memory"] = {
            "qemu": _qemu_memory(cluster),
            "guest": _on_every_node(cluster, lambda _n, ssh: _guest_memory(ssh, "redis-server")),
        }
    return result


def _rack_once(
    image: GuestImage, args: argparse.Namespace, work: Path, extra: str
) -> dict[str, Any]:
    """One etcd cluster on powercut disks: puts, a rack cut, every node back, the check."""
    plan = NetworkPlan.of(args.nodes)
    endpoints = ",".join(f"http://{n.address}:2379" for n in plan.nodes)
    tag = "nofsync" if extra else "fsync"
    rundir = Path(tempfile.mkdtemp(prefix="pc-"))
    files: dict[str, tuple[Path, Path, Path]] = {}
    backends: dict[str, CrashBackend] = {}

    def serve(name: str, faults: bool) -> None:
        disk, journal, log = files[name]
        backends[name] = CrashBackend(
            disk,
            disk.parent,
            blockdev=fault_blockdev(disk, journal, log) if faults else None,
            cache=args.rack_mode,
            name="disk",
            socket=rundir / f"{name}.sock",
        )
        backends[name].start()

    result: dict[str, Any] = {"extra_flags": extra, "mode": args.rack_mode, "policy": "lose-all"}
    try:
        for name in plan.names:
            d = work / f"rack-{tag}" / name
            d.mkdir(parents=True)
            files[name] = (d / "disk.img", d / "disk.journal", d / "writes.log")
            make_disk(files[name][0], DISK_BYTES, filesystem="ext4")
            serve(name, faults=True)
        with Cluster(
            image,
            plan,
            disks=lambda n: [VhostUserDisk(rundir / f"{n}.sock")],
            memory_mib=args.memory,
            accel=Accel(args.accel),
            directory=rundir / "cluster",
        ) as cluster:

            def start(name: str, ssh: SSHSession) -> None:
                ssh.put_bytes(ETCD_START.replace("{extra}", extra).encode(), "/tmp/etcd-start.sh")
                ssh.check_output("sh /tmp/etcd-start.sh", timeout=120)

            def healthy() -> float:
                _on_every_node(cluster, start)
                n1 = cluster["n1"].ssh
                try:
                    return _wait("etcd healthy", lambda: _etcd_healthy(n1, endpoints), 600)
                except RuntimeError as exc:
                    raise RuntimeError(f"{exc}; {_etcd_state(cluster, endpoints)}") from None

            result["boot_s"] = round(cluster.boot(), 3)
            result["healthy_s"] = round(healthy(), 3)
            n1 = cluster["n1"].ssh
            # The client: puts through n1's v3 JSON gateway, one `ack N` per answered put.
            client = (
                "i=0; while [ $i -lt 100000 ]; do i=$((i + 1)); "
                "k=$(printf key%s $i | base64); busybox wget -q -O- --post-data "
                '"{\\"key\\":\\"$k\\",\\"value\\":\\"dg==\\"}" '
                "http://127.0.0.1:2379/v3/kv/put 2>/dev/null | grep -q revision "
                "&& echo ack $i; done"
            )
            acked: list[str] = []
            t0 = time.monotonic()
            for line in n1.stream(client, timeout=900):
                if line.startswith("ack "):
                    acked.append(line.split()[1])
                    if len(acked) >= args.rack_acks:
                        break
            result["acks"] = len(acked)
            result["ack_seconds_each"] = round((time.monotonic() - t0) / max(1, len(acked)), 4)
            # The rack cut: every disk frozen, then every QEMU killed at once, then the cut.
            t0 = time.monotonic()
            for backend in backends.values():
                backend.freeze()
            cluster.power_cut()
            result["kill_skew_s"] = cluster.kill_skew
            judged: dict[str, Any] = {}
            for name in plan.names:
                backends[name].kill()
                disk, journal, log = files[name]
                cut = apply_cut(disk, journal, CutPolicy.LOSE_ALL, args.seed)
                promise = reference_promise(args.rack_mode, FaultModel.HOST_POWER_CUT, "lose-all")
                report = oracle.check(disk, log, promise)
                judged[name] = {
                    "cut": cut.summary(),
                    "oracle_ok": report.ok,
                    "oracle": report.summary(),
                }
            result["cut_and_oracles_s"] = round(time.monotonic() - t0, 3)
            result["disks"] = judged
            for name in plan.names:
                serve(name, faults=False)
            t0 = time.monotonic()
            result["reboot_s"] = round(cluster.boot(), 3)
            n1 = cluster["n1"].ssh
            try:
                result["healthy_after_cut_s"] = round(healthy(), 3)
                got = n1.run(
                    f"etcdctl --endpoints={endpoints} --command-timeout=60s get --prefix key "
                    "--keys-only | grep . | sed 's/^key//'",
                    timeout=300,
                )
                found = set(got.stdout.split())
                lost = [a for a in acked if a not in found]
                result["check"] = {
                    "exit": got.exit_code,
                    "found": len(found),
                    "lost": len(lost),
                    "lost_tokens": lost[:20],
                }
            except (RuntimeError, PowercutError) as exc:
                result["check"] = {"error": str(exc)[:500]}
            result["recover_and_check_s"] = round(time.monotonic() - t0, 3)
            result["etcd_log_tail"] = _on_every_node(
                cluster,
                lambda _n, ssh: ssh.run(
                    "grep -E 'panic|fatal|error' /var/log/etcd.log | tail -3"
                ).stdout[-600:],
            )
    finally:
        for backend in backends.values():
            backend.stop()
        shutil.rmtree(rundir, ignore_errors=True)
    return result


def bench_rack(image: GuestImage, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """etcd under a rack cut on powercut disks: as shipped, and with --unsafe-no-fsync."""
    out: dict[str, Any] = {}
    for name, extra in (("etcd", ""), ("etcd --unsafe-no-fsync", "--unsafe-no-fsync")):
        _say(f"rack cut: {name}")
        try:
            out[name] = _rack_once(image, args, work, extra)
        except Exception as exc:  # noqa: BLE001 - record it, try the other
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        _say(json.dumps(out[name], indent=1))
    return out


# Programs started over and over, as a client node does: TCG translates each anew.
_MEMORY_WORK = (
    "for i in $(seq 15); do etcdctl version; mkfs.ext4 -V; fio --version; "
    "xfs_repair -V; done >/dev/null 2>&1"
)


def bench_memory(image: GuestImage, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """QEMU's RSS per node: TCG's default translation buffer against Cluster's cap, alternating."""
    variants = {"qemu-default": None, f"tb-size={TCG_TB_MIB}": TCG_TB_MIB}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    accel = Accel(args.accel)  # --accel is kvm or tcg: nothing to resolve
    for run in range(args.runs):
        for name, tb in variants.items():
            spec = replace(
                MachineSpec.from_image(image, memory_mib=args.memory, name="mem"),
                tcg_tb_mib=tb,
                extra_append=clock_append(accel),
            )
            with QemuMachine(spec, accel=accel) as machine:
                machine.boot()
                assert machine.process is not None
                booted = _status_mib(machine.process.pid)["VmRSS"]
                t0 = time.monotonic()
                machine.ssh.run(_MEMORY_WORK, timeout=900, check=True)
                seconds = time.monotonic() - t0
                after = _status_mib(machine.process.pid)
            runs[name].append(
                {
                    "rss_after_boot_mib": booted,
                    "rss_after_work_mib": after["VmRSS"],
                    "hwm_mib": after["VmHWM"],
                    "work_s": round(seconds, 3),
                }
            )
            _say(f"memory run {run + 1}/{args.runs} {name}: {runs[name][-1]}")
    med = {
        name: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for name, rows in runs.items()
    }
    return {
        "runs": runs,
        "median": med,
        "work": _MEMORY_WORK,
        "work_ratio_capped_to_default": round(
            med[f"tb-size={TCG_TB_MIB}"]["work_s"] / med["qemu-default"]["work_s"], 3
        ),
    }


PARTS = {
    "boot": bench_boot,
    "net": bench_net,
    "etcd": bench_etcd,
    "redis": bench_redis,
    "rack": bench_rack,
    "memory": bench_memory,
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks cluster", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="boots per size in `boot`")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--memory", type=int, default=512, help="MiB per guest")
    parser.add_argument("--puts", type=int, default=20, help="writes timed per client")
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    parser.add_argument("--rack-mode", default="writeback", help="cache mode in `rack`")
    parser.add_argument("--rack-acks", type=int, default=30, help="acks before the rack cut")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--etcd-packages", default=",".join(ETCD_PACKAGES))
    parser.add_argument("--redis-packages", default=",".join(REDIS_PACKAGES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]}; parts: {', '.join(PARTS)}")
    images = {
        "etcd": ensure_image(args.etcd_packages.split(",")),
        "redis": ensure_image(args.redis_packages.split(",")),
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="powercut-bench-cluster-") as tmp:
        for part in parts:
            _say(f"== {part}")
            image = images["redis" if part == "redis" else "etcd"]
            t0 = time.monotonic()
            try:
                results[part] = PARTS[part](image, args, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - record the failure, go on with the rest
                results[part] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            results[part]["part_seconds"] = round(time.monotonic() - t0, 1)
            _say(json.dumps(results[part], indent=1))
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "benchmark": "cluster",
        "command": "python -m benchmarks cluster -- " + " ".join(argv),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine_info(accel=args.accel),
        "method": "one run, parts in order; boot sizes alternate run by run; in-guest times "
        "from date +%s%N around each command; memory from /proc/PID/status (host) and "
        "/proc/meminfo (guest) after the writes",
        "settings": {
            "runs": args.runs,
            "nodes": args.nodes,
            "memory_mib": args.memory,
            "puts": args.puts,
            "cpus_per_guest": 1,
            "images": {k: v.recipe_hash for k, v in images.items()},
            "data_disk": f"{DISK_BYTES >> 20} MiB ext4, built-in virtio-blk, writeback",
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cluster-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    _say(f"recorded in {path}")
    return 0 if not any("error" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
