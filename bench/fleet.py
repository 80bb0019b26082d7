"""Fleet rollout benchmark: N nodes (default 10) of tests/fleet/harness.py, ansible over SSH.

Steps, on one fleet: site.yml from nothing (then again: changed=0 expected); a load client on
every node; rollout-model.yml 1.0.0 -> 1.1.0 (canary 1, then waves of --batch); rollback.yml
back to 1.0.0. Figures: rollout wall time, per-node time from the rollout's start to the
first request answered by 1.1.0 (p50/p95), requests sent/failed, mirror egress / model size
(iptables byte counter in the mirror's namespace), rollback wall time, and the harness's own
CPU time (cgroup cpuacct) and memory (sum of RSS, sampled).

There is no peer to run beside it: plain-HTTP egress (about N x the model) is the baseline
the P2P work (issue 16) is to cut. Targets from the issue: 0 failed requests, rollback of
10 nodes < 60 s.

    .venv/bin/python bench/fleet.py [--nodes 10] [--batch 3] [--mirror nanio|rclone]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fleet import harness  # noqa: E402
from tests.fleet import rollout as fr  # noqa: E402


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return round(values[lo] + (values[hi] - values[lo]) * (k - lo), 2)


class Sampler(threading.Thread):
    def __init__(self, fleet: harness.Fleet, every: float = 2.0):
        super().__init__(daemon=True)
        self.fleet, self.every, self.peak, self.stop_event = fleet, every, 0, threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.every):
            try:
                self.peak = max(self.peak, self.fleet.rss_bytes())
            except Exception:
                pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--batch", default="3", help="hosts per wave after the canary")
    parser.add_argument("--mirror", default="nanio", choices=["nanio", "rclone"])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "tts-bench-fleet")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/fleet.json")
    args = parser.parse_args()
    reason = harness.unavailable()
    if reason:
        print(f"bench/fleet.py: {reason}", file=sys.stderr)
        return 2
    import shutil

    from tests.provisioner_helpers import make_keys

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    figures: dict = {}
    t_all = time.monotonic()
    wheel = fr.build_wheel(args.work / "wheel")
    with harness.Fleet(args.work, args.nodes, mirror_kind=args.mirror) as fleet:
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

            rb_started, t0 = time.time(), time.monotonic()
            out_rb = fleet.playbook("rollback.yml", "-e", "model=joe", "-e", "version=1.0.0", log="rollback.log",
                                    timeout=900)
            rollback_s = time.monotonic() - t0
            clients.wait_answered(2)
            rb_summary = clients.summary(since=rb_started, new_version="1.0.0")
        finally:
            clients.stop()
        sampler.stop_event.set()
        serving = [fr.serving(n) for n in fleet.nodes]
        firsts = [s["first_new_s"] for s in summary.values() if s["first_new_s"] is not None]
        figures.update({
            "rollout_rc": rollout_rc,
            "rollout_wall_s": round(rollout_s, 1),
            "time_to_new_version_p50_s": pct(firsts, 0.5),
            "time_to_new_version_p95_s": pct(firsts, 0.95),
            "nodes_on_new_version": len(firsts),
            "rollout_requests_sent": sum(s["sent"] for s in summary.values()),
            "rollout_requests_failed": sum(s["failed"] for s in summary.values()),
            "rollout_requests_retried_503": sum(s["retried"] for s in summary.values()),
            "rollout_mirror_egress_bytes": egress,
            "model_bytes": size_110,
            "rollout_mirror_egress_ratio": round(egress / size_110, 2),
            "rollout_harness_cpu_s": round(rollout_cpu, 1),
            "rollback_rc": out_rb.returncode,
            "rollback_wall_s": round(rollback_s, 1),
            "rollback_requests_sent": sum(s["sent"] for s in rb_summary.values()),
            "rollback_requests_failed": sum(s["failed"] for s in rb_summary.values()),
            "serving_after_rollback": sorted(set(map(str, serving))),
            "harness_peak_rss_mib": round(sampler.peak / 2**20),
            "harness_cpu_total_s": round(fleet.cpu_seconds(), 1),
        })
        per_node = {name: {"first_new_s": s["first_new_s"], "sent": s["sent"], "failed": s["failed"]}
                    for name, s in summary.items()}
    figures["bench_wall_s"] = round(time.monotonic() - t_all, 1)

    targets = {
        "rollout_requests_failed": ("== 0", figures["rollout_requests_failed"] == 0),
        "rollback_requests_failed": ("== 0", figures["rollback_requests_failed"] == 0),
        "rollback_wall_s": ("< 60", figures["rollback_wall_s"] < 60),
        "nodes_on_new_version": (f"== {args.nodes}", figures["nodes_on_new_version"] == args.nodes),
    }
    result = {
        "benchmark": "fleet", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "loadavg_at_end": os.getloadavg()},
        "setup": {"nodes": args.nodes, "canary": 1, "batch": args.batch, "mirror": args.mirror,
                  "client": "one per node, sequential requests without pause, 'Fleet check.'"},
        "figures": figures,
        "targets": {k: {"target": t, "value": figures[k], "met": "yes" if ok else "no"} for k, (t, ok) in targets.items()},
        "per_node": per_node,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if all(ok for _, ok in targets.values()) and rollout_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
