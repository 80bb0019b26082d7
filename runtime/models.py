"""Which engine serves each voice, how it gets there, and how text becomes engine work.

`ModelHolder` keeps one loaded engine per voice. The inference worker holds
`holder.lock` for the duration of a batch (the express worker `holder.express_lock`);
`install()` loads the new engine beside the
old one *without* the lock, then swaps the reference under it (so the swap lands
between batches), and only then closes the old engine. A load that fails leaves the old
engine serving.

`ModelManager` is the loop that drives it: it asks the readiness gate about every
configured voice, loads what is loadable and newer than what is served, and then sleeps
on filesystem events (or a reload request) until something changes. It tells systemd
READY=1 the first time every voice can synthesize, and keeps STATUS= current.

`plan_requests`/`join_sentences` are the one definition of how text turns into
per-sentence engine requests and back into one waveform; the server and
`tts-ctl synth --local` both use them, which is why they give the same audio.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import structlog

from provisioner.cache import COMPLETE_MARKER, Snapshot
from tts_common.backoff import backoff_delay
from tts_common.notify import notify

from .config import RuntimeConfig
from .engine_api import SynthesisEngine
from .gate import SwitchWatcher, ReadinessGate

if TYPE_CHECKING:
    from .engine import SynthesisRequest

log = structlog.get_logger(__name__)

RECHECK_S = 30.0  # safety-net re-check when no filesystem event arrives
# A version that failed to load is tried again when its snapshot changes, on an operator's
# reload, or after this backoff (doubling per failure, at most LOAD_RETRY_CAP_S): never merely
# because something else changed in the watched directories (the provisioner's status file).
LOAD_RETRY_BASE_S = 30.0
LOAD_RETRY_CAP_S = 1800.0
SEED_LIMIT = 2**63


# -- text -> requests -> audio --------------------------------------------------------

def sentence_seed(seed: int, index: int) -> int:
    """Each sentence gets its own seed, so a sentence's audio does not depend on where
    the split fell in a batch or a stream."""
    return (seed + index) % SEED_LIMIT


def plan_requests(engine: SynthesisEngine, text: str, **options: Any) -> list[SynthesisRequest]:
    """One SynthesisRequest per utterance (plan_utterances without the pauses)."""
    return plan_utterances(engine, text, **options)[0]


def plan_utterances(
    engine: SynthesisEngine,
    text: str,
    *,
    seed: int = 0,
    length_scale: float | None = None,
    noise_scale: float | None = None,
    noise_w: float | None = None,
    speed: float | None = None,
    speaker: int | str | None = None,
) -> tuple[list[SynthesisRequest], list[float]]:
    """One SynthesisRequest per utterance (a sentence, or a piece of one cut for length),
    seeded like Engine.synthesize_text (seed + k), and for each the seconds of silence that
    follow it (join_sentences): the sentence pause, scaled like the speech by 1/speed, or 0
    between the pieces of one cut sentence. Raises the frontend's TextTooLongError /
    EmptyTextError, the engine's UnknownSpeakerError."""
    from .engine import SENTENCE_PAUSE_S, SynthesisRequest

    speed = 1.0 if speed is None else float(speed)
    speaker_id = engine.speaker_id(speaker)
    utterances = engine.frontend.text_to_utterances(text)
    requests = [
        SynthesisRequest(phoneme_ids=tuple(u.ids), seed=sentence_seed(seed, i), length_scale=length_scale,
                         noise_scale=noise_scale, noise_w=noise_w, speaker=speaker_id, speed=speed)
        for i, u in enumerate(utterances)
    ]
    return requests, [SENTENCE_PAUSE_S / speed if u.ends_sentence else 0.0 for u in utterances]


def silence(sample_rate: int, seconds: float | None = None) -> np.ndarray:
    from .engine import SENTENCE_PAUSE_S

    # the engine's own pause by default, so joined audio equals Engine.synthesize_text's
    seconds = SENTENCE_PAUSE_S if seconds is None else seconds
    return np.zeros(int(round(seconds * sample_rate)), dtype=np.float32)


def join_sentences(waves: list[np.ndarray], sample_rate: int, pauses: list[float] | None = None) -> np.ndarray:
    """Utterances -> one waveform: after each utterance, the seconds of silence its `pauses`
    entry gives (plan_utterances; None: the sentence pause after every one); pieces of one cut
    sentence have 0 and join directly."""
    if not waves:
        return np.zeros(0, dtype=np.float32)
    parts: list[np.ndarray] = []
    for i, wave in enumerate(waves):
        if i:
            parts.append(silence(sample_rate, None if pauses is None else pauses[i - 1]))
        parts.append(np.asarray(wave, dtype=np.float32))
    return np.concatenate(parts)


def synthesize_local(engine: SynthesisEngine, requests: list[SynthesisRequest], max_batch: int = 8) -> list[np.ndarray]:
    """In-process synthesis in batches (the engine is batch-invariant per seed)."""
    waves: list[np.ndarray] = []
    for start in range(0, len(requests), max_batch):
        waves.extend(engine.synthesize_batch(requests[start : start + max_batch]))
    return waves


# -- loaded engines ---------------------------------------------------------------------

def snapshot_identity(snap: Snapshot) -> tuple:
    """What changes when a snapshot is rebuilt or repaired in place: its directory and
    COMPLETE marker (a repaired file is re-linked by a rename in its directory)."""
    try:
        marker = (snap.path / COMPLETE_MARKER).stat().st_mtime_ns
        return (str(snap.path), marker, snap.path.stat().st_mtime_ns)
    except OSError:
        return (str(snap.path), None, None)


@dataclass
class LoadFailure:
    """The version current/<name> names that did not load, and when to try it again."""

    version: str
    identity: tuple
    failures: int
    retry_at: float  # time.monotonic()

    def due(self, snap: Snapshot, now: float) -> bool:
        return (snap.version != self.version or snapshot_identity(snap) != self.identity
                or now >= self.retry_at)


@dataclass(eq=False)
class LoadedModel:
    name: str
    engine: SynthesisEngine
    snapshot: Snapshot
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    # ModelHolder's reference count: jobs queued or running on this engine, plus requests
    # planned on it and not yet queued. A replaced (retired) engine is closed when it drops to 0.
    users: int = 0
    retired: bool = False
    closed: bool = False

    @property
    def version(self) -> str:
        return self.snapshot.version

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.snapshot.version,
            "snapshot": str(self.snapshot.path),
            "device": self.engine.device,
            "sample_rate": self.engine.sample_rate,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "load_seconds": round(self.load_seconds, 3),
            **self.engine.describe_voice(),
        }


def load_engine(config: RuntimeConfig, snapshot: Snapshot) -> SynthesisEngine:
    from .engine import Engine

    engine = Engine.load(
        snapshot.path, device=config.device, cpu_fallback=config.cpu_fallback, threads=config.threads or None,
        max_chars=config.max_chars,
    )
    engine.frontend.max_utterance_ids = config.max_utterance_ids
    engine.frontend.normalize_text = config.normalizes(snapshot.name)
    return engine


class ModelHolder:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by the worker for a whole batch
        self.express_lock = threading.Lock()  # likewise by the express worker (scheduler: overtaking)
        self._refs = threading.Lock()  # LoadedModel.users / retired / closed
        self._models: dict[str, LoadedModel] = {}

    def get(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def names(self) -> list[str]:
        return sorted(self._models)

    def install(self, name: str, snapshot: Snapshot, loader: Callable[[Snapshot], SynthesisEngine]) -> LoadedModel:
        """Load beside the old engine, swap between batches; the old one is closed once the
        last job planned on it is done (at once when none is). Raises whatever the loader
        raises; the old engine then keeps serving."""
        started = time.monotonic()
        engine = loader(snapshot)
        new = LoadedModel(name, engine, snapshot, load_seconds=time.monotonic() - started)
        with self.lock, self.express_lock:
            old = self._models.get(name)
            self._models[name] = new
        if old is not None:
            with self._refs:
                old.retired = True
                done = self._closable(old)
            if done:
                _close(old)
            else:
                log.info("replaced engine kept for its queued work", model=name, version=old.version,
                         jobs=old.users, serving=new.version)
        return new

    def acquire(self, model: LoadedModel, count: int = 1, *, retired_ok: bool = False) -> bool:
        """Count `count` more users of `model`; False (nothing counted) when it is closed, or
        retired and not `retired_ok` (a request planned on an engine that has just been
        replaced is planned again on the new one)."""
        with self._refs:
            if model.closed or (model.retired and not retired_ok):
                return False
            model.users += count
            return True

    def release(self, model: LoadedModel, count: int = 1) -> None:
        """A user is done; the last user of a retired engine closes it (on a thread of its own:
        this runs wherever a job's future completes, the scheduler's lock possibly held)."""
        with self._refs:
            model.users -= count
            done = self._closable(model)
        if done:
            threading.Thread(target=_close, args=(model,), name="engine-release", daemon=True).start()

    @staticmethod
    def _closable(model: LoadedModel) -> bool:
        """Under _refs: whether `model` is to be closed now (marks it closed)."""
        if model.retired and model.users <= 0 and not model.closed:
            model.closed = True
            return True
        return False

    def close_all(self) -> None:
        with self.lock, self.express_lock:
            models, self._models = list(self._models.values()), {}
        for model in models:
            with self._refs:
                model.closed = True
            _close(model)


def _close(model: LoadedModel) -> None:
    try:
        model.engine.close()
        log.info("engine released", model=model.name, version=model.version)
    except Exception as exc:  # releasing must never take the service down
        log.warning("closing engine failed", error=str(exc))


class ModelManager:
    """Background thread: gate -> load -> watch for moves -> hot swap."""

    def __init__(self, config: RuntimeConfig, loader: Callable[[Snapshot], SynthesisEngine] | None = None):
        self.config = config
        self.names = list(config.models)
        self.gate = ReadinessGate(config.cache_dir, config.provisioner_runtime_dir, config.verify_full_hash)
        self.watcher = SwitchWatcher([self.gate.reader.current_dir, config.provisioner_runtime_dir])
        self.holder = ModelHolder()
        self.loader = loader or (lambda snap: load_engine(config, snap))
        self.reasons: dict[str, str] = {name: "starting" for name in self.names}
        self.errors: dict[str, str | None] = {name: None for name in self.names}
        self._failed: dict[str, LoadFailure] = {}  # name -> the version whose load failed
        self.load_failures: dict[str, int] = {name: 0 for name in self.names}  # since start (metrics)
        self._stop = threading.Event()
        self._force = threading.Event()
        self._cycles = 0  # passes finished
        self._started = 0  # passes begun
        self._cycle_cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._ready_sent = False
        self._last_status = ""

    # -- state ------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return all(self.holder.get(name) is not None for name in self.names)

    @property
    def reason(self) -> str:
        waiting = [self.reasons[n] for n in self.names if self.holder.get(n) is None]
        return "; ".join(waiting) if waiting else ""

    def failed_version(self, name: str) -> str | None:
        """The version current/<name> names, when its load failed (the old one serves)."""
        failure = self._failed.get(name)
        return failure.version if failure else None

    def describe(self) -> dict[str, Any]:
        out = {}
        for name in self.names:
            loaded = self.holder.get(name)
            entry: dict[str, Any] = loaded.describe() if loaded else {"version": None}
            entry["loaded"] = loaded is not None
            entry["waiting"] = None if loaded else self.reasons[name]
            entry["last_error"] = self.errors[name]
            out[name] = entry
        return out

    # -- control ----------------------------------------------------------------
    def start(self) -> None:
        self.watcher.start()
        self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.watcher.poke()
        if self._thread:
            self._thread.join(timeout=30)
        self.watcher.stop()
        self.holder.close_all()

    def request_reload(self) -> int:
        """Re-check the cache now (also retrying a version that failed); returns the
        cycle number to pass to wait_cycle()."""
        # The first pass to begin after this one returns must finish: one pass when the
        # manager is idle, the next one when a pass is under way (it may have checked this
        # model already). Waiting for "finished + 1" cost an idle runtime a whole
        # RECHECK_S (up to 30 s) per POST /v1/reload: the health gate's reload.
        with self._cycle_cond:
            self._force.set()
            target = self._started
        self.watcher.poke()
        return target

    def wait_cycle(self, cycle: int, timeout: float) -> bool:
        with self._cycle_cond:
            return self._cycle_cond.wait_for(lambda: self._cycles > cycle, timeout=timeout)

    # -- loop -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cycle_cond:  # with request_reload's: a forced pass is counted as begun
                self._started += 1
                forced = self._force.is_set()
                self._force.clear()
            try:
                self.check_once(retry_failed=forced)
            except Exception:  # never let a surprise end the loop: status shows the rest
                log.exception("model check failed")
            with self._cycle_cond:
                self._cycles += 1
                self._cycle_cond.notify_all()
            self.watcher.wait(self._next_wait())

    def _next_wait(self) -> float:
        """Until the next event, the safety-net re-check, or the earliest load retry."""
        retries = [f.retry_at - time.monotonic() for f in self._failed.values()]
        return max(0.05, min([RECHECK_S, *retries]))

    def check_once(self, retry_failed: bool = True) -> None:
        """One pass over the voices. A version that failed to load is tried again only with
        `retry_failed` (an operator's reload) or when due (LoadFailure.due)."""
        for name in self.names:
            if self._stop.is_set():
                return
            result = self.gate.check(name)
            loaded = self.holder.get(name)
            if not result.ok:
                self.reasons[name] = result.reason
                if loaded is not None and "does not match" in result.reason:
                    log.warning("current snapshot damaged; keeping the loaded model", model=name, reason=result.reason)
                continue
            snap = result.snapshot
            assert snap is not None
            if loaded is not None and loaded.snapshot.path == snap.path:
                self._failed.pop(name, None)  # current is back at what serves (a rollback)
                continue
            failure = self._failed.get(name)
            if failure is not None and not retry_failed and not failure.due(snap, time.monotonic()):
                continue
            self._load(name, snap, previous=loaded)
        self._report()

    def _load(self, name: str, snap: Snapshot, previous: LoadedModel | None) -> None:
        log.info("loading model", model=name, version=snap.version, replacing=previous.snapshot.version if previous else None)
        self.reasons[name] = f"loading {name} {snap.version}"
        self._report()
        try:
            model = self.holder.install(name, snap, self.loader)
        except Exception as exc:  # a bad model must not take the old one (or the service) down
            before = self._failed.get(name)
            failures = before.failures + 1 if before and before.version == snap.version else 1
            delay = backoff_delay(failures - 1, base=LOAD_RETRY_BASE_S, cap=LOAD_RETRY_CAP_S)
            self._failed[name] = LoadFailure(snap.version, snapshot_identity(snap), failures,
                                             time.monotonic() + delay)
            self.load_failures[name] = self.load_failures.get(name, 0) + 1
            self.errors[name] = f"loading {name} {snap.version} failed: {type(exc).__name__}: {exc}"
            self.reasons[name] = self.errors[name]
            log.error(
                "model load failed",
                model=name,
                version=snap.version,
                error=f"{type(exc).__name__}: {exc}",
                still_serving=previous.snapshot.version if previous else None,
            )
            return
        self._failed.pop(name, None)
        self.errors[name] = None
        self.reasons[name] = ""
        log.info(
            "model loaded",
            model=name,
            version=snap.version,
            device=model.engine.device,
            seconds=round(model.load_seconds, 2),
            replaced=previous.snapshot.version if previous else None,
        )

    def _report(self) -> None:
        if self.ready:
            versions = ", ".join(f"{n} {self.holder.get(n).snapshot.version}" for n in self.names)  # type: ignore[union-attr]
            status = f"serving {versions}"
        else:
            status = self.reason
        if not self._ready_sent and self.ready:
            self._ready_sent = True
            notify(READY=1, STATUS=status)
            self._last_status = status
        elif status != self._last_status:
            notify(STATUS=status)
            self._last_status = status
