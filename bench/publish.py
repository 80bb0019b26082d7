"""Publish throughput: `tts-mirror publish` vs a single-stream minio SDK upload.

Same run, same local nanio server, same three files (600 + 300 + 124 MiB of random
data, 1 GiB in all, in a temp dir under /tmp that is removed afterwards):

- baseline: `Minio.fput_object` of each file in turn (what `mc cp` does: one stream);
- publish:  `mirror.publish.publish_dir` (hash in parallel, multipart upload in
            parallel, HEAD-confirm, manifest + signature);
- hashing alone: `hash_files` over the same files (page cache warm), for reference.

Each upload goes to a fresh key prefix; rounds alternate baseline/publish; the ratio
is the median of the per-round ratios (each round's pair shares that moment's load -
other work on this 2-core machine makes absolute times noisy). nanio's own CPU time
is recorded too: it shares the same cores, and it is what caps the figure. Writes bench/results/publish.json and publish.md.

    .venv/bin/python bench/publish.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minio import Minio  # noqa: E402

from mirror.publish import default_transfer_config, hash_files, publish_dir, scan_dir  # noqa: E402
from mirror.remote import Mirror  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from tests.conftest import start_nanio  # noqa: E402

MiB = 1024 * 1024
SIZES_MIB = {"model.safetensors": 600, "vocoder.safetensors": 300, "frontend.bin": 124}
TARGET = 1.5


def make_files(directory: Path) -> None:
    block = 8 * MiB
    for name, size_mib in SIZES_MIB.items():
        with open(directory / name, "wb") as f:
            for _ in range(size_mib * MiB // block):
                f.write(os.urandom(block))


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--chunk-mib", type=int, default=16)
    ap.add_argument("--no-s3-checksum", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tts-bench-publish-", dir="/tmp"))
    server = None
    try:
        model = work / "model"
        model.mkdir()
        make_files(model)
        total = sum(SIZES_MIB.values()) * MiB
        files = scan_dir(model)

        hash_times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            hash_files(files)
            hash_times.append(time.perf_counter() - t0)

        server = start_nanio(work / "s3" / "data")
        creds = server.credentials
        client = server.client()
        client.create_bucket(Bucket="baseline")
        host = server.endpoint.removeprefix("http://")
        minio = Minio(host, access_key=creds.access_key, secret_key=creds.secret_key, secure=False)
        mirror = Mirror.connect(server.endpoint, "mirror", creds, max_pool_connections=args.concurrency + 8)
        key = Ed25519PrivateKey.generate()
        config = default_transfer_config(max_concurrency=args.concurrency, chunk_mib=args.chunk_mib)

        pid = server.process.pid
        load_before = os.getloadavg()
        base_times, pub_times, pub_cpu, base_srv, pub_srv = [], [], [], [], []
        for r in range(args.rounds):
            s0, t0 = process_cpu_seconds(pid), time.perf_counter()
            for f in files:
                minio.fput_object("baseline", f"r{r}/{f.path}", str(f.source))
            base_times.append(time.perf_counter() - t0)
            base_srv.append(process_cpu_seconds(pid) - s0)

            s0, c0, t0 = process_cpu_seconds(pid), cpu_seconds(), time.perf_counter()
            report = publish_dir(model, name="bench", version=f"r{r}", mirror=mirror, signing_key=key,
                                 create_bucket=True, transfer_config=config,
                                 s3_checksum=not args.no_s3_checksum)
            pub_times.append(time.perf_counter() - t0)
            pub_cpu.append(cpu_seconds() - c0)
            pub_srv.append(process_cpu_seconds(pid) - s0)
            assert len(report.uploaded) == len(files), report
            print(f"round {r}: minio fput_object {base_times[-1]:.2f} s, publish {pub_times[-1]:.2f} s "
                  f"(client CPU {pub_cpu[-1]:.2f} s), nanio CPU {base_srv[-1]:.2f} / {pub_srv[-1]:.2f} s, "
                  f"ratio {base_times[-1] / pub_times[-1]:.2f}x, hashing alone {hash_times[r]:.2f} s", flush=True)
            # Keep the server's disk use bounded: one round's objects at a time.
            for prefix, bucket in ((f"r{r}/", "baseline"), (f"models/bench/r{r}/", "mirror")):
                for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
                    client.delete_object(Bucket=bucket, Key=obj["Key"])
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    load_after = os.getloadavg()
    base, pub, hashing = (statistics.median(x) for x in (base_times, pub_times, hash_times))
    base_mibs, pub_mibs, hash_mibs = (total / MiB / t for t in (base, pub, hashing))
    # Rounds run back to back, so each round's ratio shares that moment's machine load.
    ratio = statistics.median(b / p for b, p in zip(base_times, pub_times))
    gib = total / 1024**3
    figures = [
        {"name": "publish throughput / minio fput_object throughput", "value": round(ratio, 2), "unit": "x",
         "target": f">= {TARGET}", "met": ratio >= TARGET},
        {"name": "publish throughput (hash + upload + confirm + manifest)", "value": round(pub_mibs, 1),
         "unit": "MiB/s", "target": None, "met": None},
        {"name": "minio fput_object single-stream throughput", "value": round(base_mibs, 1), "unit": "MiB/s",
         "target": None, "met": None},
        {"name": "hashing alone (sha256, files in parallel, page cache warm)", "value": round(hash_mibs, 1),
         "unit": "MiB/s", "target": None, "met": None},
        {"name": "publish client CPU per GiB", "value": round(statistics.median(pub_cpu) / gib, 2),
         "unit": "s", "target": None, "met": None},
        {"name": "nanio server CPU per GiB, minio fput_object", "value": round(statistics.median(base_srv) / gib, 2),
         "unit": "s", "target": None, "met": None},
        {"name": "nanio server CPU per GiB, publish", "value": round(statistics.median(pub_srv) / gib, 2),
         "unit": "s", "target": None, "met": None},
    ]
    result = {
        "machine": machine(),
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "command": "bench/publish.py " + " ".join(sys.argv[1:]),
        "settings": {"files_mib": SIZES_MIB, "rounds": args.rounds, "max_concurrency": args.concurrency,
                     "chunk_mib": args.chunk_mib, "s3_checksum": not args.no_s3_checksum,
                     "server": "nanio on 127.0.0.1 (same machine, same cores)"},
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "raw_seconds": {"minio_fput_object": base_times, "publish": pub_times, "hashing": hash_times,
                        "publish_client_cpu": pub_cpu, "nanio_cpu_baseline": base_srv, "nanio_cpu_publish": pub_srv},
        "figures": figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "publish.json").write_text(json.dumps(result, indent=2) + "\n")
    for f in figures:
        print(f"{f['name']}: {f['value']} {f['unit']}" + (f" (target {f['target']}: {'met' if f['met'] else 'NOT met'})" if f["target"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
