"""Several voices in one runtime, each hot-swapped on its own - real process, real socket,
the real joe voice beside a small test voice (tts_testkit/voice_factory.py).

tests/test_runtime_lifecycle.py swaps and fails one voice; tests/test_voice_shapes.py serves
several at once. The gap filled here: moving one voice's `current/` swaps only that voice
while both keep serving, and a voice whose new version fails to load keeps its old one while
the other still swaps. Also each voice's own `normalize_text` setting, end to end."""

from __future__ import annotations

import io
import json
import shutil
import threading

import pytest

from tts_testkit.runtime_server import publish_to_cache, start_server
from tts_testkit.waits import wait_until

pytestmark = pytest.mark.integration

pytest.importorskip("piper.train.vits.models")
pytest.importorskip("onnx")


def _loads(srv, model: str) -> list[str]:
    """Versions of `model` the server loaded, in order, from its JSON log."""
    out = []
    for line in srv.log().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "model loaded" and rec.get("model") == model:
            out.append(rec.get("version"))
    return out


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    from piper_import import import_piper
    from tts_testkit import voice_factory

    base = tmp_path_factory.mktemp("small-voice")
    onnx_path, json_path = voice_factory.build("x_low", base / "onnx", small=True)
    return import_piper(onnx_path, json_path, base / "bundle").out_dir


def test_each_voice_swaps_and_fails_on_its_own(small_bundle, tmp_path, bundle_dir, engine):
    import soundfile as sf

    from runtime.engine import Engine

    joe = bundle_dir
    cache = tmp_path / "cache"
    publish_to_cache(cache, "joe", "1.0.0", joe)
    publish_to_cache(cache, "small", "1.0.0", small_bundle)
    srv = start_server(tmp_path / "srv", cache, models=["joe", "small"], max_batch_size=4, queue_size=16,
                       normalize_text={"small": False})
    text = "It costs $3.50."
    body = {"text": text, "format": "wav", "noise_scale": 0, "noise_w": 0}

    def versions(c):
        models = c.get("/v1/status").json()["models"]
        return {name: (m["version"], m["last_error"]) for name, m in models.items()}

    def speak(c, voice):
        r = c.post("/v1/synthesize", json=dict(body, voice=voice))
        assert r.status_code == 200, r.text
        return sf.read(io.BytesIO(r.content), dtype="float32")[0]

    try:
        srv.wait_ready(120)
        with srv.client(60.0) as c:
            assert versions(c) == {"joe": ("1.0.0", None), "small": ("1.0.0", None)}

            # each voice reads "$3.50" as its own setting says: joe reads it out, small does not
            # (same ids, same length: noise 0; the lengths on/off differ, so this can fail)
            def local_lengths(engine):
                out = {}
                for on in (True, False):
                    engine.frontend.normalize_text = on
                    out[on] = len(engine.synthesize_text(text, noise_scale=0, noise_w=0))
                engine.frontend.normalize_text = True
                return out

            small_local = Engine.load(small_bundle, device="cpu", threads=1)
            try:
                small_lengths = local_lengths(small_local)
            finally:
                small_local.close()
            joe_lengths = local_lengths(engine)
            assert small_lengths[True] != small_lengths[False] and joe_lengths[True] != joe_lengths[False]
            assert len(speak(c, "small")) == small_lengths[False]
            assert len(speak(c, "joe")) == joe_lengths[True]

            # small moves to 1.1.0 while joe is being asked for audio: only small swaps
            results: list[int] = []
            stop = threading.Event()

            def hammer():
                with srv.client(60.0) as hc:
                    while not stop.is_set() and len(results) < 100:
                        results.append(hc.post("/v1/synthesize", json={"text": "Still here.", "voice": "joe"}).status_code)

            t = threading.Thread(target=hammer)
            t.start()
            try:
                wait_until(lambda: len(results) >= 1, 60, what="a first joe request before the swap")
                publish_to_cache(cache, "small", "1.1.0", small_bundle)
                wait_until(lambda: versions(c)["small"] == ("1.1.0", None), 60, what="small swapped to 1.1.0")
                after = len(results)
                wait_until(lambda: len(results) >= min(after + 2, 100), 60, what="joe requests after the swap")
            finally:
                stop.set()
                t.join(timeout=60)
            assert results and set(results) == {200}, results
            assert versions(c)["joe"] == ("1.0.0", None)
            assert _loads(srv, "joe") == ["1.0.0"] and _loads(srv, "small") == ["1.0.0", "1.1.0"]
            speak(c, "joe"), speak(c, "small")

            # joe's 2.0.0 cannot load: joe keeps 1.0.0 and says why; small still swaps to 1.2.0
            broken = tmp_path / "broken"
            shutil.copytree(joe, broken)
            (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
            publish_to_cache(cache, "joe", "2.0.0", broken)
            wait_until(lambda: versions(c)["joe"][1], 60, what="joe's failed load")
            version, error = versions(c)["joe"]
            assert version == "1.0.0" and "2.0.0" in error
            publish_to_cache(cache, "small", "1.2.0", small_bundle)
            wait_until(lambda: versions(c)["small"] == ("1.2.0", None), 60, what="small swapped to 1.2.0")
            assert versions(c)["joe"][0] == "1.0.0"
            assert c.get("/readyz").status_code == 200
            speak(c, "joe"), speak(c, "small")
            assert _loads(srv, "joe") == ["1.0.0"] and _loads(srv, "small") == ["1.0.0", "1.1.0", "1.2.0"]
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-2000:]
    assert "Traceback" not in srv.log()
