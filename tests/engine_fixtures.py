"""Shared fixtures for the engine/importer tests (import the ones you use into the test module).

The expensive objects (imported bundle, loaded engine, onnxruntime session) are cached per
process, so importing these fixtures into several modules still builds each of them once.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest

THREADS = 2


@functools.cache
def _bundle():
    from piper_import import bundled_voice_paths, import_piper

    out = Path(tempfile.mkdtemp(prefix="tts-engine-bundle-"))
    atexit.register(shutil.rmtree, out, True)
    report = import_piper(*bundled_voice_paths(), out / "bundle")
    return report


@functools.cache
def _engine():
    from runtime.engine import Engine

    return Engine.load(_bundle().out_dir, device="cpu", threads=THREADS)


@functools.cache
def _ort_session():
    import onnxruntime as ort

    from piper_import import bundled_voice_paths

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(bundled_voice_paths()[0]), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def import_report():
    return _bundle()


@pytest.fixture(scope="session")
def bundle_dir(import_report) -> Path:
    return import_report.out_dir


@pytest.fixture(scope="session")
def engine():
    return _engine()


@pytest.fixture(scope="session")
def ort_session():
    return _ort_session()


def ort_synthesize(session, ids, noise_scale=0.0, length_scale=1.0, noise_w=0.0):
    """Run Piper's ONNX graph on one id sequence (scales order: noise, length, noise_w)."""
    import numpy as np

    out = session.run(None, {
        "input": np.asarray([ids], dtype=np.int64),
        "input_lengths": np.asarray([len(ids)], dtype=np.int64),
        "scales": np.asarray([noise_scale, length_scale, noise_w], dtype=np.float32),
    })[0]
    return out.reshape(-1)
