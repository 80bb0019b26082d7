"""Peer-to-peer distribution benchmark (issue 16): N nodes (default 10) pull one model
over plain HTTP and with [p2p], in the same run, then the faults; mirror egress counted
at the mirror's side.

The fleet is tts_testkit/fleet/harness.py (each node a systemd-nspawn container in a network
namespace of its own on one bridge, the mirror - a real S3 server - in its own; the bench's
work directory bound into every node at its own path). In the mirror's namespace, in front of the S3
server: tts_testkit/throttle_proxy.py capping every TCP connection (--rate-mib MiB/s, the
scarce mirror), with an iptables byte counter on the proxy's port (what left the mirror
for the nodes), and Debian's opentracker with the model's info-hashes whitelisted. Each
node runs `tts-provisioner run` directly (no ansible: what is measured is the
distribution) with a fresh cache per scenario unless said. The model: --mib MiB in three
files (50 / 35 / 15 %). Scenarios, one after the other:

- http: every node fetches from the mirror (the peer: about N x the model);
- p2p: [p2p] on, fleet = the nodes, one node per file web-seeds at once;
- restart: after p2p, every daemon stopped; one node started again on its cache must seed
  without fetching the model (mirror egress, its status), then a node with an empty cache
  and no mirror of its own for 30 s (web_seed_nodes = 0) fetches the model from it alone;
- kill: as p2p, the node web-seeding the largest file SIGKILLed at 25 % of it;
- corrupt: one node holds the model and seeds it, then its blobs are overwritten in place
  with random bytes (what it serves fails every piece hash); the other N-1 start: they
  must complete with verified snapshots and no bad blob anywhere;
- tracker-down: the tracker stopped; every node must fall back to the mirror and complete.

Targets (issue 16): p2p egress / model <= 1.5 (HTTP about N); kill <= 2.0; every node
(but the killed one and the liar) READY with a verified snapshot.

    flock /work/.heavy.lock .venv/bin/python bench/p2p.py [--nodes 10] [--mib 512] [--rate-mib 10]
"""

from __future__ import annotations

import argparse
import hashlib
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

from mirror.publish import publish_dir
from mirror.remote import Mirror
from provisioner.cache import CacheReader
from provisioner.p2p import rank
from tts_testkit import benchresult as br
from tts_testkit.benchresult import percentile as pct
from tts_testkit.fleet import harness
from tts_testkit.paths import REPO
from tts_testkit.provisioner_setup import make_keys, write_config
from tts_testkit.tracker import OPENTRACKER, render_config

TRACKER_PORT = 6969
PROXY_PORT = 9100
MiB = 1024 * 1024
TARGETS = {"p2p": 1.5, "kill": 2.0}
SPLIT = (0.50, 0.35, 0.15)


class Bench:
    def __init__(self, fleet: harness.Fleet, work: Path, bucket: str, keys, files: dict):
        self.fleet, self.work, self.bucket, self.keys, self.files = fleet, work, bucket, keys, files
        self.names = [n.name for n in fleet.nodes]
        self.model_bytes = sum(f.size for f in files.values())
        self.big = max(files.values(), key=lambda f: f.size)
        self.tracker: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None
        mirror = fleet.mirror
        # Counts what the proxy sends to the nodes: the mirror's egress (its only door).
        harness.run(["ip", "netns", "exec", mirror.netns, "iptables", "-A", "OUTPUT", "-o", "eth0", "-p", "tcp",
                     "--sport", str(PROXY_PORT)])

    # -- the mirror's side
    def egress(self) -> int:
        out = harness.run(["ip", "netns", "exec", self.fleet.mirror.netns, "iptables", "-L", "OUTPUT", "-v", "-x", "-n"])
        for line in out.stdout.splitlines():
            if f"spt:{PROXY_PORT}" in line:
                return int(line.split()[1])
        raise RuntimeError(f"no egress counter for port {PROXY_PORT}: {out.stdout}")

    def start_proxy(self, rate_mib: float) -> None:
        mirror = self.fleet.mirror
        self.proxy = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{mirror.netns}", sys.executable, "-m", "tts_testkit.throttle_proxy",
             "--listen-host", mirror.address, "--listen-port", str(PROXY_PORT), "--target-host", mirror.address,
             "--target-port", str(harness.MIRROR_PORT), "--rate-mib", str(rate_mib),
             "--stats-file", str(self.work / "proxy.stats")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=mirror.cgroup.join)
        assert self.proxy.stdout.readline().strip() == "ready", "throttle proxy did not start"

    def start_tracker(self) -> None:
        mirror = self.fleet.mirror
        rootdir = self.work / "tracker"
        rootdir.mkdir(exist_ok=True)
        os.chmod(rootdir, 0o755)
        (rootdir / "whitelist.txt").write_text("".join(f.btih + "\n" for f in self.files.values()))
        conf = rootdir / "tracker.conf"
        conf.write_text(render_config(rootdir, TRACKER_PORT).replace(f"127.0.0.1:{TRACKER_PORT}",
                                                                    f"{mirror.address}:{TRACKER_PORT}"))
        self.tracker = subprocess.Popen(["nsenter", f"--net=/run/netns/{mirror.netns}", OPENTRACKER, "-f", str(conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        preexec_fn=mirror.cgroup.join)
        harness.wait_until(lambda: harness._port_open(mirror.address, TRACKER_PORT), 30, what="opentracker")

    def stop_tracker(self) -> None:
        if self.tracker and self.tracker.poll() is None:
            self.tracker.terminate()
            self.tracker.wait(timeout=10)
        harness.wait_until(lambda: not harness._port_open(self.fleet.mirror.address, TRACKER_PORT), 30,
                           what="the tracker down")

    def close(self) -> None:
        for proc in (self.tracker, self.proxy):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)

    # -- nodes
    def config(self, node: harness.Node, root: Path, p2p: bool, **p2p_settings) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        mirror = self.fleet.mirror
        creds = mirror.server.write_credentials(root / "creds.toml")
        entry = dict(name="primary", endpoint=f"http://{mirror.address}:{PROXY_PORT}", bucket=self.bucket,
                     credentials_file=creds)
        extra = ""
        if p2p:
            settings = {"enabled": True, "trackers": [f"http://{mirror.address}:{TRACKER_PORT}/announce"],
                        "node_id": node.name, "fleet": self.names, "upload_limit": "0", "stall_seconds": 5.0,
                        **p2p_settings}
            extra = "[p2p]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
        config = write_config(root, [entry], self.keys, models='name = "bench"\nchannel = "stable"', extra=extra)
        # The provisioner's defaults (8 connections, 8M splits), not the tests' small ones.
        config.write_text(config.read_text().replace("poll_interval = 1", "poll_interval = 3600")
                          .replace("connections = 4", "connections = 8")
                          .replace('min_split_size = "1M"', 'min_split_size = "8M"'))
        return config

    def start(self, node: harness.Node, config: Path) -> subprocess.Popen:
        return node.popen([str(harness.VENV / "bin/tts-provisioner"), "--config", str(config), "run"],
                          stdout=subprocess.DEVNULL, stderr=(config.parent / "stderr.log").open("a"),
                          env=dict(os.environ, TTS_LOG_FORMAT="json"))

    def watch(self, procs: dict[str, subprocess.Popen], roots: dict[str, Path], started: float,
              until=None, kill: tuple[str, Path, int] | None = None, timeout: float = 900) -> tuple[dict, str | None]:
        """Poll status.json until every node is READY (and `until(status)` holds), or the
        safety net expires. kill = (node, partial file, bytes): SIGKILL that node's daemon
        once its partial file holds that many bytes. Returns ({node: s to READY}, killed)."""
        ready_at: dict[str, float] = {}
        killed = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in procs.items():
                if name in ready_at or name == killed:
                    continue
                st = status_of(roots[name])
                if st.get("pid") == getattr(proc, "inside_pid", proc.pid) and st.get("ready") and (until is None or until(st)):
                    ready_at[name] = round(time.monotonic() - started, 2)
                if kill and killed is None and name == kill[0]:
                    partial = kill[1]
                    if partial.exists() and partial.stat().st_blocks * 512 >= kill[2]:
                        proc.send_signal(signal.SIGKILL)
                        killed = name
            if len(ready_at) + (killed is not None) == len(procs):
                break
            time.sleep(0.2)
        return ready_at, killed

    @staticmethod
    def stop(procs: dict[str, subprocess.Popen]) -> None:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def verified(self, root: Path) -> bool:
        cache = CacheReader(root / "cache")
        snap = cache.current("bench")
        return snap is not None and not cache.check_snapshot(snap, full_hash=True)

    @staticmethod
    def bad_blobs(root: Path) -> list[str]:
        """Blobs whose bytes do not hash to their name (none may ever exist)."""
        bad = []
        for blob in sorted((root / "cache/blobs/sha256").glob("*")):
            h = hashlib.sha256()
            with blob.open("rb") as f:
                while chunk := f.read(4 * MiB):
                    h.update(chunk)
            if h.hexdigest() != blob.name:
                bad.append(f"{root.name}:{blob.name[:12]}")
        return bad

    def summary(self, name: str, p2p: bool, roots: dict[str, Path], ready_at: dict, started: float, egress0: int,
                killed: str | None = None, expected: int | None = None, **extra) -> dict:
        wall = round(time.monotonic() - started, 2)
        egress = self.egress() - egress0
        times = list(ready_at.values())
        result = {
            "scenario": name, "p2p": p2p, "nodes": len(roots), "killed": killed,
            "ready": len(ready_at), "verified": sum(self.verified(r) for n, r in roots.items() if n != killed),
            "expected": len(roots) - (killed is not None) if expected is None else expected, "wall_s": wall,
            "egress_bytes": egress, "model_bytes": self.model_bytes,
            "egress_over_model": round(egress / self.model_bytes, 3),
            "ready_p50_s": pct(times, 0.5), "ready_p95_s": pct(times, 0.95), "ready_max_s": max(times) if times else None,
            **extra,
            "per_node_ready_s": ready_at,
            "p2p_status": {n: status_of(r).get("p2p") for n, r in roots.items()} if p2p else None,
        }
        print(json.dumps({k: v for k, v in result.items() if k not in {"per_node_ready_s", "p2p_status"}}), flush=True)
        return result

    def first_for(self, entry) -> str:
        return min(self.names, key=lambda n: rank(n, self.names, entry.sha256))

    # -- scenarios
    def everyone(self, name: str, p2p: bool, kill_first: bool = False, keep: bool = False) -> dict:
        roots = {n.name: self.work / name / n.name for n in self.fleet.nodes}
        configs = {n.name: self.config(n, roots[n.name], p2p) for n in self.fleet.nodes}
        egress0, started = self.egress(), time.monotonic()
        procs = {n.name: self.start(n, configs[n.name]) for n in self.fleet.nodes}
        kill = None
        if kill_first:
            first = self.first_for(self.big)
            kill = (first, roots[first] / "cache/partial" / self.big.sha256, self.big.size // 4)
        try:
            ready_at, killed = self.watch(procs, roots, started, kill=kill)
        finally:
            self.stop(procs)
        result = self.summary(name, p2p, roots, ready_at, started, egress0, killed=killed)
        if not keep:
            shutil.rmtree(self.work / name, ignore_errors=True)  # N x the model on disk
        return result

    def restart(self, after: str) -> dict:
        """On the caches `after` left (all daemons stopped): one node starts again and must
        seed every file without fetching anything; then a node with an empty cache that
        may not use the mirror for 30 s gets the whole model from it."""
        seed, fresh = self.fleet.nodes[0], self.fleet.nodes[1]
        roots = {seed.name: self.work / after / seed.name, fresh.name: self.work / "restart" / fresh.name}
        nfiles = len(self.files)
        egress0, started = self.egress(), time.monotonic()
        procs = {seed.name: self.start(seed, roots[seed.name] / "provisioner.toml")}
        try:
            ready_at, _ = self.watch(procs, roots, started, until=lambda s: (s.get("p2p") or {}).get("seeding") == nfiles)
            seed_status = status_of(roots[seed.name]).get("p2p") or {}
            restart_egress = self.egress() - egress0
            refetched = seed_status.get("from_peers", 0) + seed_status.get("from_mirror", 0)
            config = self.config(fresh, roots[fresh.name], True, web_seed_nodes=0, stall_seconds=30.0)
            t1 = time.monotonic()
            procs[fresh.name] = self.start(fresh, config)
            fresh_ready, _ = self.watch({fresh.name: procs[fresh.name]}, roots, t1)
            ready_at.update(fresh_ready)
            # The seed's counters refresh every few seconds: wait (bounded) for them.
            harness.wait_until(lambda: (status_of(roots[seed.name]).get("p2p") or {}).get("uploaded", 0)
                               >= self.model_bytes, 60, what="the restarted seed's upload count")
        except AssertionError:
            pass  # reported below: the figures say what did not happen
        finally:
            self.stop(procs)
        fresh_status = status_of(roots[fresh.name]).get("p2p") or {}
        result = self.summary(
            "restart", True, roots, ready_at, started, egress0, expected=2,
            restart_egress_bytes=restart_egress, restart_refetched_bytes=refetched,
            restarted_seeding=f"{seed_status.get('seeding')}/{nfiles}",
            restarted_uploaded=(status_of(roots[seed.name]).get("p2p") or {}).get("uploaded"),
            fresh_from_peers=fresh_status.get("from_peers"), fresh_from_mirror=fresh_status.get("from_mirror"))
        shutil.rmtree(self.work / after, ignore_errors=True)
        shutil.rmtree(self.work / "restart", ignore_errors=True)
        return result

    def corrupt(self) -> dict:
        """The last node holds the model and seeds it, then serves garbage: its blobs are
        overwritten in place (same inode, same size) with random bytes, so every piece it
        sends fails its SHA-1. The others start and must complete cleanly."""
        liar, others = self.fleet.nodes[-1], self.fleet.nodes[:-1]
        roots = {n.name: self.work / "corrupt" / n.name for n in self.fleet.nodes}
        # Alone in its own fleet it web-seeds every file at once (setting it up is not measured).
        lconf = self.config(liar, roots[liar.name], True, fleet=[liar.name])
        lproc = self.start(liar, lconf)
        procs = {}
        try:
            self.watch({liar.name: lproc}, roots, time.monotonic(),
                       until=lambda s: (s.get("p2p") or {}).get("seeding") == len(self.files))
            blobs = sorted((roots[liar.name] / "cache/blobs/sha256").glob("*"))
            assert len(blobs) == len(self.files), blobs
            for blob in blobs:
                size = blob.stat().st_size
                with blob.open("r+b") as f:
                    for off in range(0, size, 4 * MiB):
                        f.write(os.urandom(min(4 * MiB, size - off)))
                    f.flush()
                    os.fsync(f.fileno())
            uploaded0 = (status_of(roots[liar.name]).get("p2p") or {}).get("uploaded", 0)
            configs = {n.name: self.config(n, roots[n.name], True) for n in others}
            egress0, started = self.egress(), time.monotonic()
            procs = {n.name: self.start(n, configs[n.name]) for n in others}
            ready_at, _ = self.watch(procs, {n: roots[n] for n in procs}, started)
            time.sleep(6)  # the liar's upload counter refreshes every 5 s
        finally:
            self.stop({**procs, liar.name: lproc})
        liar_uploaded = (status_of(roots[liar.name]).get("p2p") or {}).get("uploaded", 0) - uploaded0
        honest = {n: roots[n] for n in procs}
        bad = [b for r in honest.values() for b in self.bad_blobs(r)]
        quarantined = sum(1 for r in honest.values() for _ in (r / "cache/quarantine").glob("**/*") if _.is_file())
        result = self.summary("corrupt", True, honest, ready_at, started, egress0, liar=liar.name,
                              liar_uploaded_bytes=liar_uploaded, bad_blobs_on_honest_nodes=bad,
                              quarantined_files=quarantined,
                              liar_ranked_first_for=[p for p, f in self.files.items() if self.first_for(f) == liar.name])
        shutil.rmtree(self.work / "corrupt", ignore_errors=True)
        return result


def status_of(root: Path) -> dict:
    try:
        return json.loads((root / "run" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def figures_of(by: dict, nodes: int) -> list[dict]:
    http, p2p = by["http"], by["p2p"]
    f = br.figure
    figs = [
        f("mirror egress / model, HTTP (every node from the mirror)", http["egress_over_model"], "x"),
        f("mirror egress / model, p2p", p2p["egress_over_model"], "x", f"<= {TARGETS['p2p']}",
          p2p["egress_over_model"] <= TARGETS["p2p"]),
        f("p2p egress / HTTP egress", round(p2p["egress_bytes"] / http["egress_bytes"], 3), "x"),
        f("time to the last node READY, HTTP / p2p (s)", f"{http['ready_max_s']} / {p2p['ready_max_s']}", "s"),
        f("p2p time to last READY / HTTP",
          round(p2p["ready_max_s"] / http["ready_max_s"], 2) if http["ready_max_s"] and p2p["ready_max_s"] else None, "x"),
        f("every node READY and verified (http, p2p)", f"{http['verified']}/{nodes}, {p2p['verified']}/{nodes}", "",
          "all", http["verified"] == p2p["verified"] == nodes),
    ]
    if "kill" in by:
        k = by["kill"]
        figs += [f("fault: the node fetching the largest file from the mirror SIGKILLed at 25 %: egress / model",
                   k["egress_over_model"], "x", f"<= {TARGETS['kill']}", k["egress_over_model"] <= TARGETS["kill"]),
                 f("fault kill: the other nodes READY and verified", f"{k['verified']}/{k['expected']}", "", "all",
                   k["verified"] == k["expected"] == k["ready"])]
    if "corrupt" in by:
        c = by["corrupt"]
        figs += [f("fault: a peer serving corrupted pieces: the others READY and verified",
                   f"{c['verified']}/{c['expected']} (the liar uploaded {c['liar_uploaded_bytes'] / MiB:.0f} MiB)", "",
                   "all", c["verified"] == c["expected"] == c["ready"]),
                 f("fault corrupt: bad blobs on the other nodes", len(c["bad_blobs_on_honest_nodes"]), "blobs", 0,
                   not c["bad_blobs_on_honest_nodes"]),
                 f("fault corrupt: egress / model", c["egress_over_model"], "x")]
    if "tracker-down" in by:
        t = by["tracker-down"]
        figs += [f("fault: tracker down: nodes READY and verified (fell back to the mirror)",
                   f"{t['verified']}/{t['expected']}", "", "all", t["verified"] == t["expected"] == t["ready"]),
                 f("fault tracker down: egress / model, time to last READY (s)",
                   f"{t['egress_over_model']}, {t['ready_max_s']}", "")]
    if "restart" in by:
        r = by["restart"]
        seeding, of = r["restarted_seeding"].split("/")
        figs += [f("fault: a node restarted after completion: bytes re-fetched, files seeded",
                   f"{r['restart_refetched_bytes']} B, {r['restarted_seeding']} "
                   f"(mirror egress meanwhile {r['restart_egress_bytes'] / 1024:.0f} KiB)", "",
                   "0 B, all", r["restart_refetched_bytes"] == 0 and seeding == of),
                 f("fault restart: a fresh node fed by the restarted seed alone: from peers / from mirror (MiB)",
                   f"{(r['fresh_from_peers'] or 0) / MiB:.0f} / {(r['fresh_from_mirror'] or 0) / MiB:.0f}", "",
                   "model / 0", r["fresh_from_peers"] == r["model_bytes"] and r["fresh_from_mirror"] == 0)]
    return figs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--mib", type=int, default=512, help="the model's size, in three files (50/35/15 %%)")
    parser.add_argument("--rate-mib", type=float, default=10.0, help="the mirror's cap per TCP connection")
    parser.add_argument("--mirror", choices=["nanio", "rclone"], default="nanio")
    parser.add_argument("--only", default="http,p2p,restart,kill,corrupt,tracker-down")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if (reason := harness.unavailable()) or OPENTRACKER is None:
        print(f"cannot run: {reason or 'opentracker missing (scripts/setup.sh)'}", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    # Bound into every node (shared_rw); not under /tmp, which nspawn gives each node its own.
    work = Path(tempfile.mkdtemp(prefix="tts-bench-p2p-", dir=str(REPO.parent)))
    load = [os.getloadavg()[0]]
    results = []
    try:
        with harness.Fleet(work / "fleet", args.nodes, mirror_kind=args.mirror, shared_rw=(work,)) as fleet:
            keys = make_keys(work)
            bucket = fleet.mirror.server.new_bucket()
            model = work / "model"
            model.mkdir()
            sizes = [int(args.mib * share) for share in SPLIT[:-1]]
            sizes.append(args.mib - sum(sizes))  # exactly --mib in all
            for i, mib in enumerate(sizes):
                with (model / f"part-{i}.safetensors").open("wb") as f:
                    for _ in range(mib):
                        f.write(os.urandom(MiB))
            mirror = Mirror.connect(fleet.mirror.server.endpoint, bucket, fleet.mirror.server.credentials)
            publish_dir(model, name="bench", version="1.0", mirror=mirror, signing_key=keys.private, channel="stable")
            shutil.rmtree(model)
            files = {f.path: f for f in mirror.manifest("bench", "1.0")[0].files}
            bench = Bench(fleet, work, bucket, keys, files)
            try:
                bench.start_proxy(args.rate_mib)
                bench.start_tracker()
                if "http" in only:
                    results.append(bench.everyone("http", p2p=False))
                    load.append(os.getloadavg()[0])
                if "p2p" in only:
                    results.append(bench.everyone("p2p", p2p=True, keep="restart" in only))
                    load.append(os.getloadavg()[0])
                    if "restart" in only:
                        results.append(bench.restart(after="p2p"))
                if "kill" in only:
                    results.append(bench.everyone("kill", p2p=True, kill_first=True))
                    load.append(os.getloadavg()[0])
                if "corrupt" in only:
                    results.append(bench.corrupt())
                    load.append(os.getloadavg()[0])
                if "tracker-down" in only:
                    bench.stop_tracker()
                    results.append(bench.everyone("tracker-down", p2p=True))
                    load.append(os.getloadavg()[0])
            finally:
                bench.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {r["scenario"]: r for r in results}
    figures = figures_of(by, args.nodes) if {"http", "p2p"} <= set(by) else []
    br.write(args.out / "p2p.json", br.document(
        "p2p", figures, machine=br.machine(kernel=platform.release(), load_average=[round(x, 1) for x in load]),
        details={"mirror": args.mirror, "nodes": args.nodes,
                 "model": {"files": {p: f.size for p, f in files.items()}, "bytes": sum(f.size for f in files.values())},
                 "rate_mib_per_connection": args.rate_mib, "scenarios": results}))
    for f in figures:
        print(f"{f['name']}: {f['value']} (target {f['target']}, met {f['met']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
