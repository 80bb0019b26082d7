"""`tts-runtime serve` with a test engine hook: the real server, voice and engine, except that
every utterance whose phoneme ids are those of one chosen sentence fails in the engine.

    python -m tests.hooked_runtime --config runtime.toml --fail-on "Poisoned sentence."

Why a hook: "a stream whose later sentence cannot be synthesized" must be a fact the test makes,
whatever the machine's speed - a deadline would race the first sentence. Nothing else differs
from the real service (runtime.cli.serve_runtime with a loader that wraps the real engine).
"""

from __future__ import annotations

import argparse
from pathlib import Path


class FailingEngine:
    """The real engine, but an utterance with `fail_ids` raises (as a broken batch would)."""

    def __init__(self, engine, fail_text: str):
        self._engine = engine
        self.fail_ids = tuple(engine.frontend.text_to_utterances(fail_text)[0].ids)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def _check(self, requests) -> None:
        if any(tuple(r.phoneme_ids) == self.fail_ids for r in requests):
            raise RuntimeError("test hook: this utterance fails")

    def synthesize_batch(self, requests, **kwargs):
        self._check(requests)
        return self._engine.synthesize_batch(requests, **kwargs)

    def synthesize_progressive(self, request, on_first_piece, **kwargs):
        self._check([request])
        return self._engine.synthesize_progressive(request, on_first_piece, **kwargs)


def main() -> None:
    from runtime.cli import serve_runtime
    from runtime.config import load_config
    from runtime.models import load_engine
    from runtime.omp import prefer_passive_wait
    from tts_common.logs import configure_logging

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--fail-on", required=True, help="a sentence whose utterance fails in the engine")
    args = ap.parse_args()
    prefer_passive_wait()
    config = load_config(args.config)
    configure_logging(config.log_level)
    serve_runtime(config, loader=lambda snap: FailingEngine(load_engine(config, snap), args.fail_on))


if __name__ == "__main__":
    main()
