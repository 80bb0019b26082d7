"""Peer-to-peer distribution benchmark: N nodes (default 10) pull one model, over plain
HTTP and then with [p2p], in the same run; mirror egress counted at the mirror's side.

The fleet is tests/fleet/harness.py (each node a network namespace on one bridge, the
mirror - a real S3 server - in its own, with an iptables byte counter on its S3 port).
Each node runs `tts-provisioner run` directly (no ansible: what is measured is the
distribution) with a fresh cache per scenario; Debian's opentracker runs in the mirror's
namespace with the model's info-hashes whitelisted. Scenarios, one after the other:

- http: every node fetches from the mirror (the baseline: about N x the model);
- p2p: [p2p] on, fleet = the nodes, one node per file web-seeds at once;
- p2p-kill: as p2p, but the node ranked first for the largest file is killed (SIGKILL)
  once it holds a quarter of it: the others must fall back (stall_seconds) and finish.

Figures per scenario: mirror egress / model size, time from start to READY per node
(p50/p95/max), wall time. Targets (issue 16): p2p egress at most about 1x the model
(judged: <= 1.3x), every node READY with a verified snapshot.

    .venv/bin/python bench/p2p.py [--nodes 10] [--mib 256] [--mirror nanio|rclone]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.fleet import pct  # noqa: E402
from mirror.publish import publish_dir  # noqa: E402
from mirror.remote import Mirror  # noqa: E402
from provisioner.p2p import rank  # noqa: E402
from tests.fleet import harness  # noqa: E402
from tests.provisioner_helpers import make_keys, write_config  # noqa: E402
from tests.tracker_helpers import OPENTRACKER, render_config  # noqa: E402

TRACKER_PORT = 6969
MiB = 1024 * 1024
EGRESS_TARGET = 1.3


def start_tracker(fleet: harness.Fleet, work: Path, hashes: list[str]) -> subprocess.Popen:
    rootdir = work / "tracker"
    rootdir.mkdir()
    os.chmod(rootdir, 0o755)
    (rootdir / "whitelist.txt").write_text("".join(h + "\n" for h in hashes))
    conf = rootdir / "tracker.conf"
    conf.write_text(render_config(rootdir, TRACKER_PORT).replace(f"127.0.0.1:{TRACKER_PORT}",
                                                                f"{fleet.mirror.address}:{TRACKER_PORT}"))
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{fleet.mirror.netns}", OPENTRACKER, "-f", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=fleet.mirror.cgroup.join)
    harness.wait_until(lambda: harness._port_open(fleet.mirror.address, TRACKER_PORT), 30, what="opentracker")
    return proc


def node_config(node: harness.Node, root: Path, fleet: harness.Fleet, bucket: str, keys, p2p: bool) -> Path:
    root.mkdir(parents=True)
    creds = fleet.mirror.server.write_credentials(root / "creds.toml")
    mirror = dict(name="primary", endpoint=f"http://{fleet.mirror.address}:{harness.MIRROR_PORT}", bucket=bucket,
                  credentials_file=creds)
    extra = ""
    if p2p:
        names = [n.name for n in fleet.nodes]
        extra = (f'[p2p]\nenabled = true\ntrackers = ["http://{fleet.mirror.address}:{TRACKER_PORT}/announce"]\n'
                 f'node_id = "{node.name}"\nfleet = {json.dumps(names)}\nupload_limit = "0"\nstall_seconds = 5.0\n')
    config = write_config(root, [mirror], keys, models='name = "bench"\nchannel = "stable"', extra=extra)
    # The provisioner's defaults (8 connections, 8M splits), not the tests' small ones.
    config.write_text(config.read_text().replace("poll_interval = 1", "poll_interval = 3600")
                      .replace("connections = 4", "connections = 8").replace('min_split_size = "1M"', 'min_split_size = "8M"'))
    return config


def status_of(root: Path) -> dict:
    try:
        return json.loads((root / "run" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def scenario(fleet: harness.Fleet, work: Path, bucket: str, keys, files: dict, name: str, p2p: bool,
             kill_first: bool = False, timeout: float = 900) -> dict:
    roots = {n.name: work / name / n.name for n in fleet.nodes}
    configs = {n.name: node_config(n, roots[n.name], fleet, bucket, keys, p2p) for n in fleet.nodes}
    big = max(files.values(), key=lambda f: f.size)
    first = min((n.name for n in fleet.nodes), key=lambda n: rank(n, [x.name for x in fleet.nodes], big.sha256))
    egress0 = fleet.mirror.egress_bytes()
    started = time.monotonic()
    procs = {n.name: n.popen([str(harness.VENV / "bin/tts-provisioner"), "--config", str(configs[n.name]), "run"],
                             stdout=subprocess.DEVNULL, stderr=(roots[n.name] / "stderr.log").open("w"),
                             env=dict(os.environ, TTS_LOG_FORMAT="json"))
             for n in fleet.nodes}
    ready_at: dict[str, float] = {}
    killed = None
    deadline = started + timeout
    try:
        while len(ready_at) + (killed is not None) < len(fleet.nodes) and time.monotonic() < deadline:
            for n in fleet.nodes:
                if n.name in ready_at or n.name == killed:
                    continue
                st = status_of(roots[n.name])
                if st.get("pid") == procs[n.name].pid and st.get("ready"):
                    ready_at[n.name] = round(time.monotonic() - started, 2)
                if kill_first and killed is None and n.name == first:
                    partial = roots[n.name] / "cache/partial" / big.sha256
                    if partial.exists() and partial.stat().st_blocks * 512 >= big.size // 4:
                        procs[n.name].send_signal(signal.SIGKILL)
                        killed = n.name
            time.sleep(0.2)
    finally:
        wall = round(time.monotonic() - started, 2)
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    egress = fleet.mirror.egress_bytes() - egress0
    total = sum(f.size for f in files.values())
    verified = 0
    from provisioner.cache import CacheReader

    for n in fleet.nodes:
        cache = CacheReader(roots[n.name] / "cache")
        snap = cache.current("bench")
        if snap is not None and not cache.check_snapshot(snap, full_hash=True):
            verified += 1
    times = list(ready_at.values())
    result = {
        "scenario": name, "p2p": p2p, "nodes": len(fleet.nodes), "killed": killed,
        "ready": len(ready_at), "verified": verified, "wall_s": wall,
        "egress_bytes": egress, "model_bytes": total, "egress_over_model": round(egress / total, 3),
        "ready_p50_s": pct(times, 0.5), "ready_p95_s": pct(times, 0.95), "ready_max_s": max(times) if times else None,
        "per_node_ready_s": ready_at,
        "p2p_status": {n.name: status_of(roots[n.name]).get("p2p") for n in fleet.nodes} if p2p else None,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in {"per_node_ready_s", "p2p_status"}}), flush=True)
    shutil.rmtree(work / name, ignore_errors=True)  # the caches: N x the model on disk
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--mib", type=int, default=256, help="size of the model's large file")
    parser.add_argument("--mirror", choices=["nanio", "rclone"], default="nanio")
    parser.add_argument("--skip-kill", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if (reason := harness.unavailable()) or OPENTRACKER is None:
        print(f"cannot run: {reason or 'opentracker missing (scripts/setup.sh)'}", file=sys.stderr)
        return 2
    # Not under /tmp, /root or /run: those are private to each node.
    work = Path(tempfile.mkdtemp(prefix="tts-bench-p2p-", dir=str(REPO.parent)))
    load = [os.getloadavg()[0]]
    try:
        with harness.Fleet(work / "fleet", args.nodes, mirror_kind=args.mirror) as fleet:
            keys = make_keys(work)
            bucket = fleet.mirror.server.new_bucket()
            model = work / "model"
            model.mkdir()
            (model / "model.safetensors").write_bytes(os.urandom(args.mib * MiB))
            (model / "config.json").write_text('{"sample_rate": 22050}\n')
            mirror = Mirror.connect(fleet.mirror.server.endpoint, bucket, fleet.mirror.server.credentials)
            publish_dir(model, name="bench", version="1.0", mirror=mirror, signing_key=keys.private, channel="stable")
            files = {f.path: f for f in mirror.manifest("bench", "1.0")[0].files}
            tracker = start_tracker(fleet, work, sorted(f.btih for f in files.values()))
            try:
                results = [scenario(fleet, work, bucket, keys, files, "http", p2p=False)]
                load.append(os.getloadavg()[0])
                results.append(scenario(fleet, work, bucket, keys, files, "p2p", p2p=True))
                load.append(os.getloadavg()[0])
                if not args.skip_kill:
                    results.append(scenario(fleet, work, bucket, keys, files, "p2p-kill", p2p=True, kill_first=True))
                    load.append(os.getloadavg()[0])
            finally:
                tracker.terminate()
                tracker.wait(timeout=10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {r["scenario"]: r for r in results}
    p2p = by["p2p"]
    figures = [
        {"figure": "mirror egress / model, HTTP (every node from the mirror)", "value": by["http"]["egress_over_model"],
         "target": None, "met": None},
        {"figure": "mirror egress / model, p2p", "value": p2p["egress_over_model"], "target": f"<= {EGRESS_TARGET}",
         "met": p2p["egress_over_model"] <= EGRESS_TARGET},
        {"figure": "p2p egress / HTTP egress", "value": round(p2p["egress_bytes"] / by["http"]["egress_bytes"], 3),
         "target": None, "met": None},
        {"figure": "every node READY and verified (http, p2p)",
         "value": f"{by['http']['verified']}/{args.nodes}, {p2p['verified']}/{args.nodes}",
         "target": "all", "met": by["http"]["verified"] == p2p["verified"] == args.nodes},
    ]
    if "p2p-kill" in by:
        kill = by["p2p-kill"]
        figures.append({"figure": "p2p with the first web seed killed at 25 %: egress / model",
                        "value": kill["egress_over_model"], "target": None, "met": None})
        figures.append({"figure": "p2p with the first web seed killed: the other nodes READY and verified",
                        "value": f"{kill['verified']}/{args.nodes - 1}", "target": "all",
                        "met": kill["verified"] >= args.nodes - 1})
    doc = {
        "benchmark": "p2p", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "kernel": platform.release(), "load_average": [round(x, 1) for x in load]},
        "command": "bench/p2p.py " + " ".join(sys.argv[1:]), "mirror": args.mirror, "nodes": args.nodes,
        "figures": figures, "scenarios": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "p2p.json").write_text(json.dumps(doc, indent=2) + "\n")
    for f in figures:
        print(f"{f['figure']}: {f['value']} (target {f['target']}, met {f['met']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
