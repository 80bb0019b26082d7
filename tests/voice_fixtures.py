"""Fixtures over the real voice (a pytest plugin: tests/conftest.py registers it, so every
test module sees these without importing them).

The expensive objects are session-scoped and built once per test run, whichever modules ask
for them: the bundled Piper voice converted to a runtime bundle, one CPU engine on it, an
onnxruntime session on piper's graph, and a cache with the voice published as joe 1.0.0.
`server` is a running `tts-runtime serve` on that cache, one per test module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tts_testkit.runtime_server import import_voice, publish_to_cache, start_server

THREADS = 2  # the engine fixture's lanes (tests/test_engine_fast_paths.py checks it)
SERVER_MAX_CHARS = 600  # the `server` fixture's max_chars


@pytest.fixture(scope="session")
def import_report(tmp_path_factory):
    """The ImportReport of converting the bundled voice (joe)."""
    return import_voice(tmp_path_factory.mktemp("voice") / "joe-bundle")


@pytest.fixture(scope="session")
def bundle_dir(import_report) -> Path:
    """The real voice as a runtime bundle (read-only: tests that change a bundle copy it)."""
    return import_report.out_dir


@pytest.fixture(scope="session")
def engine(bundle_dir):
    """One in-process CPU engine on the real voice, for every test that synthesizes in-process
    or needs reference audio (loading it twice is wasted time)."""
    from runtime.engine import Engine

    eng = Engine.load(bundle_dir, device="cpu", threads=THREADS)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def ort_session():
    """onnxruntime on piper's own graph of the voice, the reference the engine is held to."""
    import onnxruntime as ort

    from piper_import import bundled_voice_paths

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(bundled_voice_paths()[0]), opts, providers=["CPUExecutionProvider"])


def ort_synthesize(session, ids, noise_scale=0.0, length_scale=1.0, noise_w=0.0):
    """Run Piper's ONNX graph on one id sequence (scales order: noise, length, noise_w)."""
    import numpy as np

    out = session.run(None, {
        "input": np.asarray([ids], dtype=np.int64),
        "input_lengths": np.asarray([len(ids)], dtype=np.int64),
        "scales": np.asarray([noise_scale, length_scale, noise_w], dtype=np.float32),
    })[0]
    return out.reshape(-1)


@pytest.fixture(scope="session")
def voice_cache(tmp_path_factory, bundle_dir) -> Path:
    """A cache with the real voice published as joe 1.0.0 and current."""
    cache = tmp_path_factory.mktemp("voice-cache")
    publish_to_cache(cache, "joe", "1.0.0", bundle_dir)
    return cache


@pytest.fixture(scope="module")
def server(voice_cache, tmp_path_factory):
    """A running, ready runtime on a temp Unix socket (one per test module)."""
    srv = start_server(tmp_path_factory.mktemp("srv"), voice_cache, max_batch_size=8, max_wait_ms=20,
                       queue_size=32, max_chars=SERVER_MAX_CHARS, request_timeout_s=2)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
