"""tts-ctl against a real runtime on a Unix socket (real voice), and --local in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf

from provisioner.cache import CacheWriter
from tts_testkit.paths import VENV_BIN
from tts_testkit.runtime_server import publish_to_cache, start_server

pytestmark = pytest.mark.integration


def ctl(*args, socket=None, config=None, timeout=180):
    cmd = [str(VENV_BIN / "tts-ctl")]
    if socket is not None:
        cmd += ["--socket", str(socket)]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _pcm(path):
    wave, _ = sf.read(str(path), dtype="int16")
    return wave.astype(np.int32)


def test_synth_socket_stream_and_local_give_the_same_audio(server, tmp_path):
    text = "Local and remote agree. Same seed, same audio."
    a, b, c = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.wav"
    r = ctl("synth", text, "-o", a, "--seed", 3, config=server.config)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(a)
    r = ctl("synth", text, "-o", b, "--seed", 3, "--stream", config=server.config)
    assert r.returncode == 0, r.stderr
    r = ctl("synth", text, "-o", c, "--seed", 3, "--local", config=server.config)  # no daemon involved
    assert r.returncode == 0, r.stderr
    remote, local = _pcm(a), _pcm(c)
    assert remote.shape == local.shape and int(np.abs(remote - local).max()) <= 4
    streamed = np.frombuffer(b.read_bytes()[44:], dtype="<i2").astype(np.int32)
    assert streamed.shape == remote.shape and int(np.abs(streamed - remote).max()) <= 4
    mp3 = tmp_path / "x.mp3"
    assert ctl("synth", "Format from the suffix.", "-o", mp3, config=server.config).returncode == 0
    assert sf.info(str(mp3)).format == "MP3"


def test_synth_errors_are_messages_not_tracebacks(server, tmp_path):
    r = ctl("synth", "hi", "-o", tmp_path / "x.wav", "--voice", "nobody", config=server.config)
    assert r.returncode == 1 and "unknown voice 'nobody'" in r.stderr and "Traceback" not in r.stderr
    r = ctl("synth", "   ", "-o", tmp_path / "x.wav", config=server.config)
    assert r.returncode == 1 and "empty" in r.stderr
    r = ctl("synth", "hi", "-o", tmp_path / "x.wav", socket=tmp_path / "missing.sock")
    assert r.returncode == 1 and "no runtime socket" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.wav").exists()


def test_batch_txt_resumes_and_reports_failures(server, tmp_path):
    lines = [f"Batch line number {i}." for i in range(1, 13)]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n")
    out = tmp_path / "out"
    r = ctl("batch", src, "--out-dir", out, "--concurrency", 6, config=server.config)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.glob("*.wav"))
    assert len(files) == 12 and files[0] == "000001.wav" and "000008.wav" in files  # line numbers, blank kept
    assert not list(out.glob(".*part*"))
    # re-run: everything valid is skipped; a damaged output is redone
    (out / "000003.wav").write_bytes(b"junk")
    r = ctl("batch", src, "--out-dir", out, config=server.config)
    assert r.returncode == 0, r.stderr
    assert "1 written, 11 already done, 0 failed" in r.stderr
    assert sf.info(str(out / "000003.wav")).frames > 0


def test_batch_jsonl_csv_ids_failures_and_retries(server, tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"id": "greeting", "text": "Hello there.", "seed": 5}),
        "{not json",
        json.dumps({"id": "bad-voice", "text": "Who am I?", "voice": "nobody"}),
        json.dumps({"id": "empty", "text": "  "}),
        json.dumps({"id": "fast", "text": "Quickly now.", "speed": 1.5}),
    ]) + "\n")
    out = tmp_path / "out"
    r = ctl("batch", jsonl, "--out-dir", out, config=server.config)
    assert r.returncode == 1
    assert {p.name for p in out.glob("*.wav")} == {"greeting.wav", "fast.wav"}
    report = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["line"] for f in report] == [2, 3, 4]
    assert "unknown voice" in report[1]["error"] and "Traceback" not in r.stderr

    # 40 lines at concurrency 40 against a queue of 32, the worker held: 8 requests must be
    # refused with 503 (on any machine); tts-ctl retries them after Retry-After until done
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("id,text\n" + "".join(f"row{i},Row number {i}.\n" for i in range(40)))
    out2 = tmp_path / "out2"
    refused = server.metric("tts_requests_total", endpoint="/v1/synthesize", status="503")
    with server.held():
        proc = subprocess.Popen([str(VENV_BIN / "tts-ctl"), "--config", str(server.config), "batch", str(csv_path),
                                 "--out-dir", str(out2), "--concurrency", "40", "--retries", "8"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(600):  # at most 60 s
            if server.metric("tts_requests_total", endpoint="/v1/synthesize", status="503") >= refused + 8:
                break
            time.sleep(0.1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert server.metric("tts_requests_total", endpoint="/v1/synthesize", status="503") >= refused + 8
    assert len(list(out2.glob("row*.wav"))) == 40
    assert not (out2 / "failures.jsonl").exists()


def test_status_voices_wait_ready(server, tmp_path):
    r = ctl("status", "--json", config=server.config)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["runtime"]["ready"] is True and doc["runtime"]["models"]["joe"]["version"] == "1.0.0"
    assert "provisioner" in doc
    # No provisioner runs beside this server: status points at the alert and metric for it.
    assert doc["watch"] == [{"failure": "provisioner not running", "model": "-", "alert": "TtsMetricsTargetDown",
                             "metric": 'up{job="tts-provisioner"}'}]
    r = ctl("status", config=server.config)
    assert r.returncode == 0 and "serving 1.0.0" in r.stdout
    assert "watch" in r.stdout  # the row naming that alert (rich may wrap its text)
    r = ctl("voices", "--json", config=server.config)
    assert json.loads(r.stdout)["voices"][0]["name"] == "joe"
    assert ctl("wait-ready", "--timeout", 10, config=server.config).returncode == 0
    r = ctl("wait-ready", "--timeout", 1, socket=tmp_path / "none.sock")
    assert r.returncode == 1 and "not ready after 1 s" in r.stderr
    r = ctl("cache", "--help")
    assert r.returncode == 0 and "snapshots" in r.stdout


def test_check_reload_is_the_health_gate_in_one_call(tmp_path, bundle_dir):
    """`check --reload` is what rollout-model.yml and rollback.yml run on each host: it makes
    the runtime re-check the cache, gates on the version that pass left, then checks the
    audio; a version that did not load fails at once with the runtime's load error."""
    bundle = bundle_dir
    cache = tmp_path / "cache"
    publish_to_cache(cache, "joe", "1.0.0", bundle)
    publish_to_cache(cache, "joe", "1.1.0", bundle)
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
    publish_to_cache(cache, "joe", "2.0.0", broken, set_current=False)
    srv = start_server(tmp_path / "srv", cache, max_batch_size=4, queue_size=16)
    try:
        srv.wait_ready()
        CacheWriter(cache).set_current("joe", "1.0.0")  # what `tts-provisioner rollback` does
        r = ctl("check", "--reload", "--voice", "joe", "--expect-version", "1.0.0", "Rolled back.", config=srv.config)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("joe 1.0.0: ok ("), r.stdout
        CacheWriter(cache).set_current("joe", "2.0.0")
        r = ctl("check", "--reload", "--voice", "joe", "--expect-version", "2.0.0", config=srv.config)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "the runtime serves joe 1.0.0, not 2.0.0: loading joe 2.0.0 failed" in r.stderr, r.stderr
        r = ctl("check", "--reload", "--voice", "joe", socket=tmp_path / "none.sock")
        assert r.returncode == 1 and "reload: " in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        srv.stop()


def test_cache_without_the_provisioner_is_a_clear_error(tmp_path):
    # A runtime-only install has no tts-provisioner script beside tts-ctl nor on PATH: the
    # child is told its interpreter lives in an empty directory, and PATH holds nothing else.
    code = (
        f"import sys; sys.executable = {str(tmp_path / 'python')!r}\n"
        "from runtime.ctl import main\n"
        "main(['cache', 'snapshots'])\n"
    )
    r = subprocess.run([str(VENV_BIN / "python"), "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PATH=str(tmp_path)))
    assert r.returncode == 1, r.stderr
    assert "tts-provisioner is not installed" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cache_runs_the_provisioner_cli(tmp_path):
    r = ctl("cache", "snapshots", "--help")
    assert r.returncode == 0 and "Usage: tts-provisioner snapshots" in r.stdout, r.stdout + r.stderr
