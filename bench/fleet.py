"""Fleet rollout benchmark: N nodes (default 10) of tts_testkit/fleet/harness.py, ansible over SSH.

Each node a Debian 12 container booted with systemd-nspawn (systemd 252 as PID 1) in its
own network namespace; the role with its production defaults (system manager, LoadCredential=).
Steps, on one fleet: the nodes boot, then sit idle for --idle-window seconds (what the
harness itself costs per node: CPU and memory of each machine's cgroups); site.yml from
nothing (then again: changed=0 expected); a load client on every node; rollout-model.yml
1.0.0 -> 1.1.0 (canary 1, then waves of --batch); rollback.yml back to 1.0.0 (timed per
task with ansible.posix.profile_tasks). Figures: rollout wall time, per-node time from the
rollout's start to the first request answered by 1.1.0 (p50/p95), requests sent/failed,
mirror egress / model size (iptables byte counter in the mirror's namespace), rollback
wall time, and the fleet's CPU time (cgroup cpu.stat) and memory (each machine's v1 memory
cgroup: now and peak; and the sum of RSS, sampled, as the old harness measured it).

There is no peer to run beside it: plain-HTTP egress (about N x the model) is the baseline
the P2P work (issue 16) is to cut. Targets from the issue: 0 failed requests, rollback of
10 nodes < 60 s.

    .venv/bin/python bench/fleet.py [--nodes 10] [--batch 3] [--mirror nanio|rclone]
    .venv/bin/python bench/fleet.py --only rollback [--rollbacks 3]

--only rollback skips the second site.yml run and the rollout play: after the install, the
channel moves to 1.1.0 and every node's provisioner syncs it by itself (its own poll) and the
runtime hot-swaps, so every node holds both versions; then rollback.yml runs under the same
per-node traffic, back and forth between the two kept snapshots (--rollbacks times), and
writes bench/results/fleet-rollback.json. The target is judged on the slowest of the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from tts_testkit import benchresult as br
from tts_testkit.fleet import harness
from tts_testkit.fleet import rollout as fr
from tts_testkit.paths import REPO
from tts_testkit.waits import wait_until
from tts_testkit.wheel import build_wheel


PROFILE = "ansible.posix.profile_tasks"


def task_times(output: str) -> dict[str, float]:
    """profile_tasks' recap: "Task name ----- 12.34s" -> {task name: seconds} (a task's time
    is its slowest host's: the linear strategy waits for every host before the next task)."""
    import re

    recap = output.split("TASKS RECAP", 1)[-1]
    return {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(.+?) -+ (\d+\.\d+)s$", recap, re.M)}


def timed_rollback(fleet: harness.Fleet, clients: "fr.Clients", version: str, log: str,
                   ansible_dir: Path | None = None) -> dict:
    """rollback.yml (of `ansible_dir`, default this checkout's) to `version` under the clients'
    traffic: wall time, per-task times, requests sent/failed while it ran, each node's first
    answer from `version`."""
    env = {"ANSIBLE_CALLBACKS_ENABLED": PROFILE}
    if ansible_dir is not None:
        env["ANSIBLE_CONFIG"] = str(ansible_dir / "ansible.cfg")
    playbook = str((ansible_dir or REPO / "ansible") / "rollback.yml")
    started, t0 = time.time(), time.monotonic()
    out = fleet.playbook(playbook, "-e", "model=joe", "-e", f"version={version}", log=log, timeout=900, env=env)
    wall = time.monotonic() - t0
    load = os.getloadavg()
    clients.wait_answered(2)
    summary = clients.summary(since=started, new_version=version)
    firsts = [s["first_new_s"] for s in summary.values() if s["first_new_s"] is not None]
    return {
        "version": version, "rc": out.returncode, "wall_s": round(wall, 1), "loadavg_at_end": [round(x, 2) for x in load],
        "requests_sent": sum(s["sent"] for s in summary.values()),
        "requests_failed": sum(s["failed"] for s in summary.values()),
        "failures": {n: s["failures"] for n, s in summary.items() if s["failures"]},
        "nodes_on_version": len(firsts), "first_answer_p50_s": br.percentile(firsts, 0.5), "first_answer_max_s": max(firsts, default=None),
        "task_s": task_times(out.stdout),
    }


class Sampler(threading.Thread):
    """Peaks of the fleet's memory: the sum of RSS (the old harness's measure) and the sum of
    the machines' memory cgroups (page cache included)."""

    def __init__(self, fleet: harness.Fleet, every: float = 2.0):
        super().__init__(daemon=True)
        self.fleet, self.every, self.peak, self.stop_event = fleet, every, 0, threading.Event()
        self.peak_cgroups = 0

    def run(self) -> None:
        while not self.stop_event.wait(self.every):
            try:
                self.peak = max(self.peak, self.fleet.rss_bytes())
                self.peak_cgroups = max(self.peak_cgroups, sum((n.memory() or {}).get("current", 0)
                                                               for n in self.fleet.nodes))
            except Exception:
                pass


def idle_cost(fleet: harness.Fleet, window: float) -> dict:
    """What the harness costs per node with nothing of ours installed: each machine's CPU
    time for its boot, its CPU over `window` seconds of idling, its memory (cgroup) and the
    sum of its processes' RSS. Means over the nodes; per node in `per_node`."""
    mib = 2**20
    booted = {n.name: n.cpu_seconds() for n in fleet.nodes}
    time.sleep(window)
    per_node = {}
    for node in fleet.nodes:
        memory = node.memory() or {}
        per_node[node.name] = {
            "boot_cpu_s": round(booted[node.name], 2),
            "idle_cpu_pct": round(100 * (node.cpu_seconds() - booted[node.name]) / window, 2),
            "memory_current_mib": round(memory.get("current", 0) / mib, 1),
            "memory_rss_mib": round(memory.get("rss", 0) / mib, 1),
            "rss_sum_mib": round(node.rss_bytes() / mib, 1), "processes": len(node.machine.pids())}
    mean = {key: round(statistics.mean(v[key] for v in per_node.values()), 2) for key in next(iter(per_node.values()))}
    return {"window_s": window, "mean": mean, "per_node": per_node}


# Units of the figures (each a key of the run's `figures` dict); the targets join them by name.
UNITS = {"site_install_s": "s", "site_install_egress_ratio": "x", "site_install_cpu_s": "s", "site_second_run_s": "s",
         "site_second_run_changed": "tasks", "rollout_rc": "exit code", "rollout_wall_s": "s",
         "time_to_new_version_p50_s": "s", "time_to_new_version_p95_s": "s", "nodes_on_new_version": "nodes",
         "rollout_requests_sent": "requests", "rollout_requests_failed": "requests",
         "rollout_requests_retried_503": "requests", "rollout_mirror_egress_bytes": "bytes", "model_bytes": "bytes",
         "rollout_mirror_egress_ratio": "x", "rollout_harness_cpu_s": "s", "rollback_rc": "exit code",
         "rollback_wall_s": "s", "rollback_loadavg_at_end": "load", "rollback_requests_sent": "requests",
         "rollback_requests_failed": "requests", "serving_after_rollback": "versions", "harness_peak_rss_mib": "MiB",
         "harness_cpu_total_s": "s", "bench_wall_s": "s", "channel_move_to_all_serving_s": "s",
         "fleet_boot_s": "s", "node_boot_cpu_s": "s", "node_idle_cpu_pct": "%", "node_idle_memory_mib": "MiB",
         "node_idle_rss_sum_mib": "MiB", "node_peak_memory_mib_max": "MiB", "node_peak_memory_mib_mean": "MiB",
         "harness_peak_memory_cgroups_mib": "MiB", "node_cpu_total_s_mean": "s",
         "rollback_wall_s_ours": "s", "rollback_wall_s_peer": "s", "peer_over_ours_median": "x",
         "rollback_wall_s_slowest": "s", "nodes_on_version": "nodes"}


def write(out: Path, benchmark: str, figures: dict, targets: dict, details: dict) -> None:
    """`figures`: name -> value; `targets`: name -> (target, value, met), joined to the figure
    of that name or a figure of its own."""
    figs = {name: br.figure(name, value, UNITS[name]) for name, value in figures.items()}
    for name, (target, value, met) in targets.items():
        figs.setdefault(name, br.figure(name, value, UNITS[name])).update(target=target, met=bool(met))
    machine = br.machine(mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                         loadavg_at_end=[round(x, 2) for x in os.getloadavg()])
    doc = br.write(out, br.document(benchmark, list(figs.values()), machine=machine, details=details))
    print(json.dumps(doc, indent=2))


def rollback_only(args, fleet: harness.Fleet, bucket: str, figures: dict, t_all: float) -> int:
    """Both versions on every node the cheap way (the channel moves; each provisioner syncs
    by itself), then rollback.yml back and forth under traffic."""
    from tts_testkit.provisioner_setup import set_channel

    t0 = time.monotonic()
    set_channel(fleet.mirror.server.client(), bucket, fr.MODEL, "stable", "1.1.0")
    wait_until(lambda: all(fr.serving(n) == "1.1.0" for n in fleet.nodes), 900, interval=2,
                       what="every node serving 1.1.0 after the channel moved")
    figures["channel_move_to_all_serving_s"] = round(time.monotonic() - t0, 1)
    peer_dir = None
    if args.peer_ref:
        # The peer: the same play as it was at --peer-ref (its ansible/ tree), on the same
        # nodes under the same traffic, alternating with ours.
        import subprocess

        peer_dir = args.work / f"ansible-{args.peer_ref.replace('/', '_')}"
        peer_dir.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.peer_ref, "ansible"], check=True,
                                 capture_output=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", str(peer_dir), "--strip-components=1"], input=archive, check=True,
                       timeout=60)
    runs, peer_runs = [], []
    clients = fr.Clients(fleet, fleet.nodes).start()
    try:
        clients.wait_answered(2)
        for i in range(args.rollbacks):
            pair = [("ours", None, runs)] + ([(f"peer {args.peer_ref}", peer_dir, peer_runs)] if peer_dir else [])
            for who, where, into in (pair if i % 2 == 0 else pair[::-1]):  # each goes first in turn
                version = "1.0.0" if (len(runs) + len(peer_runs)) % 2 == 0 else "1.1.0"
                run = timed_rollback(fleet, clients, version, log=f"rollback-{len(runs) + len(peer_runs) + 1}.log",
                                     ansible_dir=where)
                print(f"rollback {who}: {run}", flush=True)
                into.append(run)
    finally:
        clients.stop()
    figures["bench_wall_s"] = round(time.monotonic() - t_all, 1)
    worst = max(r["wall_s"] for r in runs)
    if peer_runs:
        figures["rollback_wall_s_ours"] = [r["wall_s"] for r in runs]
        figures["rollback_wall_s_peer"] = [r["wall_s"] for r in peer_runs]
        figures["peer_over_ours_median"] = round(statistics.median(r["wall_s"] for r in peer_runs)
                                                 / statistics.median(r["wall_s"] for r in runs), 2)
        print(f"rollback wall time, peer ({args.peer_ref}) / ours, medians: {figures['peer_over_ours_median']}",
              flush=True)
    targets = {
        "rollback_wall_s_slowest": ("< 60", worst, worst < 60),
        "rollback_requests_failed": ("== 0", sum(r["requests_failed"] for r in runs + peer_runs),
                                     all(r["requests_failed"] == 0 for r in runs + peer_runs)),
        "rollback_rc": ("== 0 every run", [r["rc"] for r in runs], all(r["rc"] == 0 for r in runs)),
        "nodes_on_version": (f"== {args.nodes} every run", [r["nodes_on_version"] for r in runs],
                             all(r["nodes_on_version"] == args.nodes for r in runs)),
    }
    setup = {"nodes": args.nodes, "mirror": args.mirror, "rollbacks": args.rollbacks,
             "client": "one per node, sequential requests without pause, 'Fleet check.'",
             "two_versions": "site.yml installs 1.0.0; the channel moves to 1.1.0 and every node syncs it"}
    if peer_runs:
        setup["peer_ref"] = args.peer_ref
    write(args.out, "fleet-rollback", figures, targets,
          {"setup": setup, "rollbacks": runs, "peer_rollbacks": peer_runs})
    return 0 if all(ok for _, _, ok in targets.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--batch", default="3", help="hosts per wave after the canary")
    parser.add_argument("--mirror", default="nanio", choices=["nanio", "rclone"])
    parser.add_argument("--only", choices=["rollback"], default=None,
                        help="rollback: install, both versions on every node, then only rollback.yml")
    parser.add_argument("--rollbacks", type=int, default=3, help="with --only rollback: runs, back and forth")
    parser.add_argument("--peer-ref", default="main",
                        help="with --only rollback: also run rollback.yml as of this git ref, alternating ('' = none)")
    parser.add_argument("--idle-window", type=float, default=20.0,
                        help="seconds the booted nodes sit idle while their own cost is measured")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "tts-bench-fleet")
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/fleet.json (fleet-rollback.json with --only rollback)")
    args = parser.parse_args()
    if args.out is None:
        args.out = REPO / "bench/results" / ("fleet-rollback.json" if args.only else "fleet.json")
    if args.rollbacks < 1:
        parser.error("--rollbacks must be at least 1")
    reason = harness.unavailable()
    if reason:
        print(f"bench/fleet.py: {reason}", file=sys.stderr)
        return 2
    import shutil

    from tts_testkit.provisioner_setup import make_keys

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    figures: dict = {}
    t_all = time.monotonic()
    wheel = build_wheel(args.work / "wheel")
    with harness.Fleet(args.work, args.nodes, mirror_kind=args.mirror) as fleet:
        idle = idle_cost(fleet, args.idle_window)
        print(f"fleet of {args.nodes} booted in {fleet.boot_s} s; idle, per node: {idle['mean']}", flush=True)
        figures.update(fleet_boot_s=fleet.boot_s, node_boot_cpu_s=idle["mean"]["boot_cpu_s"],
                       node_idle_cpu_pct=idle["mean"]["idle_cpu_pct"],
                       node_idle_memory_mib=idle["mean"]["memory_current_mib"],
                       node_idle_rss_sum_mib=idle["mean"]["rss_sum_mib"])
        sampler = Sampler(fleet)
        sampler.start()
        (args.work / "keys").mkdir()
        keys = make_keys(args.work / "keys")
        bucket = fleet.mirror.server.new_bucket()
        size_100 = fr.publish(fleet, bucket, keys, "1.0.0", channel="stable")
        size_110 = fr.publish(fleet, bucket, keys, "1.1.0")
        fleet.inventory(fr.group_vars(fleet, bucket, keys, wheel))
        print(f"fleet of {args.nodes} booted; model {size_110 / 2**20:.1f} MiB", flush=True)

        egress0, cpu0, t0 = fleet.mirror.egress_bytes(), fleet.cpu_seconds(), time.monotonic()
        out = fleet.playbook("site.yml", log="site-1.log", timeout=3000)
        site_s = time.monotonic() - t0
        if out.returncode != 0:
            print(out.stdout[-5000:], file=sys.stderr)
            return 1
        figures["site_install_s"] = round(site_s, 1)
        figures["site_install_egress_ratio"] = round((fleet.mirror.egress_bytes() - egress0) / size_100, 2)
        figures["site_install_cpu_s"] = round(fleet.cpu_seconds() - cpu0, 1)
        if args.only == "rollback":
            return rollback_only(args, fleet, bucket, figures, t_all)
        t0 = time.monotonic()
        out = fleet.playbook("site.yml", log="site-2.log", timeout=3000)
        figures["site_second_run_s"] = round(time.monotonic() - t0, 1)
        figures["site_second_run_changed"] = sum(r["changed"] for r in fr.recap(out.stdout).values())
        print(f"site.yml: {figures}", flush=True)

        clients = fr.Clients(fleet, fleet.nodes).start()
        try:
            clients.wait_answered(2)
            egress0, cpu0 = fleet.mirror.egress_bytes(), fleet.cpu_seconds()
            started, t0 = time.time(), time.monotonic()
            out = fleet.playbook("rollout-model.yml", "-e", "model=joe", "-e", "version=1.1.0", "-e",
                                 f"batch={args.batch}", log="rollout.log", timeout=3000)
            rollout_s = time.monotonic() - t0
            rollout_rc = out.returncode
            rollout_cpu = fleet.cpu_seconds() - cpu0
            egress = fleet.mirror.egress_bytes() - egress0
            clients.wait_answered(2)
            summary = clients.summary(since=started, new_version="1.1.0")
            rollback = timed_rollback(fleet, clients, "1.0.0", log="rollback.log")
        finally:
            clients.stop()
        sampler.stop_event.set()
        peaks = {n.name: round((n.memory() or {}).get("peak", 0) / 2**20) for n in fleet.nodes}
        node_cpu = {n.name: round(n.cpu_seconds(), 1) for n in fleet.nodes}
        serving = [fr.serving(n) for n in fleet.nodes]
        firsts = [s["first_new_s"] for s in summary.values() if s["first_new_s"] is not None]
        figures.update({
            "rollout_rc": rollout_rc,
            "rollout_wall_s": round(rollout_s, 1),
            "time_to_new_version_p50_s": br.percentile(firsts, 0.5),
            "time_to_new_version_p95_s": br.percentile(firsts, 0.95),
            "nodes_on_new_version": len(firsts),
            "rollout_requests_sent": sum(s["sent"] for s in summary.values()),
            "rollout_requests_failed": sum(s["failed"] for s in summary.values()),
            "rollout_requests_retried_503": sum(s["retried"] for s in summary.values()),
            "rollout_mirror_egress_bytes": egress,
            "model_bytes": size_110,
            "rollout_mirror_egress_ratio": round(egress / size_110, 2),
            "rollout_harness_cpu_s": round(rollout_cpu, 1),
            "rollback_rc": rollback["rc"],
            "rollback_wall_s": rollback["wall_s"],
            "rollback_requests_sent": rollback["requests_sent"],
            "rollback_requests_failed": rollback["requests_failed"],
            "serving_after_rollback": sorted(set(map(str, serving))),
            "harness_peak_rss_mib": round(sampler.peak / 2**20),
            "harness_peak_memory_cgroups_mib": round(sampler.peak_cgroups / 2**20),
            "node_peak_memory_mib_max": max(peaks.values()),
            "node_peak_memory_mib_mean": round(statistics.mean(peaks.values())),
            "node_cpu_total_s_mean": round(statistics.mean(node_cpu.values()), 1),
            "harness_cpu_total_s": round(fleet.cpu_seconds(), 1),
        })
        per_node = {name: {"first_new_s": s["first_new_s"], "sent": s["sent"], "failed": s["failed"]}
                    for name, s in summary.items()}
    figures["bench_wall_s"] = round(time.monotonic() - t_all, 1)

    targets = {
        "rollout_requests_failed": ("== 0", figures["rollout_requests_failed"], figures["rollout_requests_failed"] == 0),
        "rollback_requests_failed": ("== 0", figures["rollback_requests_failed"],
                                     figures["rollback_requests_failed"] == 0),
        "rollback_wall_s": ("< 60", figures["rollback_wall_s"], figures["rollback_wall_s"] < 60),
        "nodes_on_new_version": (f"== {args.nodes}", figures["nodes_on_new_version"],
                                 figures["nodes_on_new_version"] == args.nodes),
    }
    write(args.out, "fleet", figures, targets, {
        "setup": {"nodes": args.nodes, "canary": 1, "batch": args.batch, "mirror": args.mirror,
                  "client": "one per node, sequential requests without pause, 'Fleet check.'",
                  "harness": "systemd-nspawn --boot per node (systemd 252 as PID 1), ansible over SSH, "
                             "role defaults (system manager, LoadCredential=)",
                  "node_root": fleet.root.build},
        "idle": idle, "node_peak_memory_mib": peaks, "node_cpu_total_s": node_cpu,
        "rollback": {"loadavg_at_end": rollback["loadavg_at_end"], "task_s": rollback["task_s"]},
        "per_node": per_node,
    })
    return 0 if all(ok for _, _, ok in targets.values()) and rollout_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
