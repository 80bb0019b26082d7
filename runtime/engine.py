"""Synthesis engine: loads a voice bundle (safetensors + voice.json) and runs batched VITS inference.

* Weights are read with safetensors only (never pickle).
* Batch invariance: each request's noise comes from its own seeded CPU torch.Generator with
  the request's own length, and the model masks all padding, so a request gives the same audio
  alone or in any batch.
* Devices: "auto" (CUDA when available), "cpu", "cuda" / "cuda:N". On CUDA out-of-memory the
  batch is halved and retried recursively; a single request that still does not fit runs on a
  CPU replica of the model when cpu_fallback is set (structlog warning), otherwise
  EngineOOMError is raised. The GPU model stays loaded for later batches.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import structlog
import torch

from runtime import heap
from runtime.bundle import WEIGHTS_FILE, BundleError, VoiceBundle
from runtime.frontend import TextFrontend
from runtime.vits import VitsConfig, VitsModel
from runtime.vits.lanes import SERIAL, Lanes

from tts_common.errors import TtsError

log = structlog.get_logger(__name__)

# torch's own default (one per core), read before a CPU engine sets intra-op threads to 1.
_DEFAULT_THREADS = torch.get_num_threads()

SENTENCE_PAUSE_S = 0.2
TEXT_BATCH = 16  # sentences of one text synthesized per batch
# Audio handed out first by synthesize_progressive: short enough for an early first byte, long
# enough that the rest of a sentence is decoded before it has played (decoding runs at
# RTF ~0.05 here).
FIRST_PIECE_S = 0.5


class EngineError(TtsError, RuntimeError):
    """The engine cannot load or run (bad bundle, unavailable device, closed engine)."""


class EngineOOMError(EngineError):
    """A single request does not fit on the device and CPU fallback is disabled."""


@dataclass(frozen=True)
class SynthesisRequest:
    phoneme_ids: Sequence[int]  # one sentence's ids (frontend output)
    seed: int = 0
    length_scale: float | None = None  # None -> voice default
    noise_scale: float | None = None
    noise_w: float | None = None
    speaker: int | None = None  # speaker id of a multi-speaker voice; None -> its default speaker
    speed: float = 1.0  # 2.0 = half the duration (VitsModel._prior); on top of length_scale


@dataclass(frozen=True)
class _Resolved:
    ids: tuple[int, ...]
    seed: int
    length_scale: float
    noise_scale: float
    noise_w: float
    speaker: int = 0
    speed: float = 1.0


class UnknownSpeakerError(TtsError, ValueError):
    """A speaker name or id the voice does not have (the API answers 404 with the valid ones)."""


def _out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or the CPU allocator refusing (a RuntimeError, e.g. under MemoryMax=)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator" in text or "not enough memory" in text
                                              or "can't allocate memory" in text)


def _resolve_device(device: str, cpu_fallback: bool) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        dev = torch.device("cuda:0" if device == "cuda" else device)
        if torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count():
            return dev
        if cpu_fallback:
            log.warning("engine.cuda_unavailable_fallback_cpu", requested=device)
            return torch.device("cpu")
        raise EngineError(f"device {device!r} requested but CUDA is not available "
                          f"({torch.cuda.device_count()} device(s))")
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class Engine:
    def __init__(self, model: VitsModel, voice: VoiceBundle, device: torch.device, cpu_fallback: bool,
                 max_chars: int, lanes: Lanes = SERIAL):
        self._model: VitsModel | None = model
        self._lanes = lanes if device.type == "cpu" else SERIAL
        # Lanes of their own for short requests that overtake a long batch: the long batch's
        # lanes are paused meanwhile (Lanes.paused), so the short one has the cores to itself.
        self._express_lanes = Lanes(lanes.n) if device.type == "cpu" else None
        self._express_lock = threading.Lock()
        self._cpu_model: VitsModel | None = model if device.type == "cpu" else None
        self._voice = voice
        self._device = device
        self.cpu_fallback = cpu_fallback
        self.sample_rate: int = voice.sample_rate
        self.voice_name: str = voice.name
        self.num_symbols: int = int(model.cfg.num_symbols)
        self.hop_length: int = model.cfg.hop_length
        self.defaults = asdict(voice.inference)
        self.frontend = TextFrontend(voice.to_dict(), max_chars=max_chars)
        self.num_speakers: int = int(model.cfg.n_speakers)
        # name -> id (piper's speaker_id_map); a voice without names still takes ids
        self.speakers: dict[str, int] = {str(k): int(v) for k, v in voice.speaker_id_map.items()}
        self.default_speaker: int = int(voice.default_speaker_id) if self.num_speakers > 1 else 0
        self.stats = {"batches": 0, "oom_splits": 0, "cpu_fallbacks": 0}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, bundle_dir: Path, device: str = "auto", cpu_fallback: bool = True, threads: int | None = None,
             max_chars: int = 5000) -> "Engine":
        """Load a bundle written by `tts-mirror import-piper`.

        `threads`: on CPU, how many cores one synthesis uses (None: torch's default thread
        count). They run as lanes (runtime/vits/lanes.py) with one torch intra-op thread each,
        so this sets torch's intra-op thread count to 1 for the process. On a GPU it sets
        torch's intra-op thread count (None leaves it alone)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        bundle_dir = Path(bundle_dir)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        t0 = time.perf_counter()
        heap.keep_freed_memory()
        try:
            voice = VoiceBundle.read(bundle_dir)
        except BundleError as exc:
            raise EngineError(str(exc)) from None
        dev = _resolve_device(device, cpu_fallback)
        cfg = voice.hyperparameters
        weights = bundle_dir / WEIGHTS_FILE
        try:
            state = load_file(str(weights), device="cpu")
        except FileNotFoundError as exc:
            raise EngineError(f"bundle {bundle_dir} has no {WEIGHTS_FILE}") from exc
        except (SafetensorError, OSError, ValueError) as exc:
            raise EngineError(f"{weights} is not a readable safetensors file: {exc}") from exc
        model = cls._build(cfg, state, weights)
        if dev.type != "cpu":
            try:
                model = cls._to_device(model, dev)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not cpu_fallback:
                    raise EngineError(f"cannot place the model on {dev}: {exc}") from exc
                log.warning("engine.device_load_failed_fallback_cpu", device=str(dev), error=str(exc))
                model, dev = cls._build(cfg, state, weights), torch.device("cpu")
        if dev.type == "cpu":
            torch.set_num_threads(1)
            lanes = Lanes(threads or _DEFAULT_THREADS)
        else:
            if threads is not None:
                torch.set_num_threads(threads)
            lanes = SERIAL
        engine = cls(model, voice, dev, cpu_fallback, max_chars, lanes)
        log.info("engine.loaded", voice=engine.voice_name, device=str(dev), threads=engine.threads,
                 seconds=round(time.perf_counter() - t0, 3))
        return engine

    @staticmethod
    def _build(cfg: VitsConfig, state: dict[str, torch.Tensor], source: Path) -> VitsModel:
        # Build on the meta device and adopt the loaded tensors: no wasted random init.
        with torch.device("meta"):
            model = VitsModel(cfg)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise EngineError(f"{source} does not match the VITS module: {exc}") from exc
        model.eval().requires_grad_(False)
        model.fuse_for_inference()
        return model

    @staticmethod
    def _to_device(model: VitsModel, dev: torch.device) -> VitsModel:
        model = model.to(dev)
        model.fuse_for_inference()  # rebuild the fast-path weights on the device
        return model

    # ---------------------------------------------------------------- properties
    def speaker_id(self, speaker: int | str | None) -> int:
        """A speaker name (speaker_id_map), an id (int or digits) or None (the default) -> id;
        UnknownSpeakerError naming the valid ones otherwise."""
        if speaker is None or speaker == "":
            return self.default_speaker
        if isinstance(speaker, bool):
            raise UnknownSpeakerError(f"speaker must be a name or an integer id, got {speaker!r}")
        if isinstance(speaker, str):
            if speaker in self.speakers:
                return self.speakers[speaker]
            if not speaker.strip().isdigit():
                raise UnknownSpeakerError(f"voice {self.voice_name!r} has no speaker {speaker!r}; "
                                          f"{self.describe_speakers()}")
            speaker = int(speaker)
        if not isinstance(speaker, int) or not 0 <= speaker < self.num_speakers:
            raise UnknownSpeakerError(f"voice {self.voice_name!r} has no speaker id {speaker!r}; "
                                      f"{self.describe_speakers()}")
        return speaker

    def describe_speakers(self, limit: int = 20) -> str:
        """The valid speakers in words, truncated for catalogs (libritts_r has 904)."""
        if self.num_speakers <= 1:
            return "it is a single-speaker voice (speaker 0 only)"
        names = sorted(self.speakers, key=lambda n: self.speakers[n])
        shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
        return (f"valid: ids 0..{self.num_speakers - 1}" + (f" or names {shown}" if names else "")
                + " (see /v1/voices)")

    def describe_voice(self) -> dict:
        """The voice's shape for /v1/voices and /v1/status: language, quality, rate, speakers,
        and the bytes its weights hold resident (per loaded voice)."""
        model = self._model
        weight_bytes = 0 if model is None else sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return {
            "language": self._voice.language_code,
            "quality": self._voice.quality,
            "sample_rate": self.sample_rate,
            "phoneme_type": self._voice.phoneme_type,
            "num_speakers": self.num_speakers,
            "speakers": dict(sorted(self.speakers.items(), key=lambda kv: kv[1])),
            "default_speaker": self.default_speaker,
            "weights_bytes": weight_bytes,
        }

    @property
    def device(self) -> str:
        return str(self._device)

    def _check_open(self) -> VitsModel:
        if self._model is None:
            raise EngineError("engine is closed")
        return self._model

    # --------------------------------------------------------------- synthesis
    def _resolve(self, i: int, req: SynthesisRequest) -> _Resolved:
        if not isinstance(req, SynthesisRequest):
            raise TypeError(f"request {i}: expected SynthesisRequest, got {type(req).__name__}")
        ids = tuple(int(x) for x in req.phoneme_ids)
        if not ids:
            raise ValueError(f"request {i}: phoneme_ids is empty")
        bad = [x for x in ids if not 0 <= x < self.num_symbols]
        if bad:
            raise ValueError(f"request {i}: phoneme ids out of range [0, {self.num_symbols}): {bad[:5]}")
        vals = {}
        for name in ("length_scale", "noise_scale", "noise_w"):
            v = getattr(req, name)
            v = self.defaults[name] if v is None else float(v)
            if not math.isfinite(v) or v < 0 or (name == "length_scale" and v == 0):
                raise ValueError(f"request {i}: {name} must be a finite number "
                                 f"{'> 0' if name == 'length_scale' else '>= 0'}, got {v}")
            vals[name] = v
        speed = float(req.speed)
        if not math.isfinite(speed) or speed <= 0:
            raise ValueError(f"request {i}: speed must be a finite number > 0, got {speed}")
        try:
            speaker = self.speaker_id(req.speaker)
        except UnknownSpeakerError as exc:
            raise UnknownSpeakerError(f"request {i}: {exc}") from None
        return _Resolved(ids=ids, seed=int(req.seed), speaker=speaker, speed=speed, **vals)

    @property
    def can_overtake(self) -> bool:
        """Whether `express=True` work pauses a batch in progress (CPU engines) instead of
        waiting for it."""
        return self._express_lanes is not None

    @contextmanager
    def _session(self, express: bool) -> Iterator[Lanes]:
        """The lanes one synthesis runs on, under its lock. Express work (at most one at a
        time) pauses the ordinary lanes while it runs; the ordinary batch then goes on with
        exactly the computation it had, so no request's audio changes."""
        if not express or self._express_lanes is None:
            with self._lock:
                yield self._lanes
            return
        with self._express_lock, self._lanes.paused():
            yield self._express_lanes

    def synthesize_batch(self, requests: Sequence[SynthesisRequest], express: bool = False) -> list[np.ndarray]:
        """One float32 mono waveform per request, in request order. `express`: see _session."""
        resolved = [self._resolve(i, r) for i, r in enumerate(requests)]
        if not resolved:
            return []
        with self._session(express) as lanes:
            model = self._check_open()
            try:
                return self._run(model, resolved, self._device, lanes)
            finally:
                heap.release_after_batch()

    def synthesize_progressive(self, request: SynthesisRequest, on_first_piece: Callable[[np.ndarray], None],
                               express: bool = False) -> np.ndarray:
        """One request, for streaming: `on_first_piece` gets the first ~FIRST_PIECE_S of audio
        (the whole waveform if it is shorter) as soon as it is decoded, exactly once; the whole
        waveform is returned. It starts with that piece and is the audio `synthesize_batch`
        gives for the request (the decoder windows overlap by its receptive field)."""
        req = self._resolve(0, request)
        with self._session(express) as lanes:
            model = self._check_open()
            delivered: list[np.ndarray] = []

            def first(audio: torch.Tensor) -> None:
                delivered.append(audio.float().cpu().numpy())
                on_first_piece(delivered[0])

            first_frames = max(1, round(FIRST_PIECE_S * self.sample_rate / model.dec.hop))
            try:
                self.stats["batches"] += 1
                inputs, conditions = self._inputs([req], self._device)
                with torch.inference_mode():
                    wave = model.infer_progressive(*inputs, first_frames, first, lanes,
                                                   **conditions).float().cpu().numpy()
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _out_of_memory(exc):
                    raise
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()
                wave = self._run(model, [req], self._device, lanes)[0]  # CPU fallback / EngineOOMError as usual
                if not delivered:
                    on_first_piece(wave)
            finally:
                heap.release_after_batch()
            return wave

    @property
    def threads(self) -> int:
        """CPU cores one synthesis runs on (1 on a GPU)."""
        return self._lanes.n

    def _run(self, model: VitsModel, reqs: list[_Resolved], dev: torch.device, lanes: Lanes) -> list[np.ndarray]:
        try:
            return self._forward(model, reqs, dev, lanes)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if len(reqs) > 1:
                half = len(reqs) // 2
                self.stats["oom_splits"] += 1
                log.warning("engine.oom_split_batch", device=str(dev), batch=len(reqs), into=[half, len(reqs) - half])
                return self._run(model, reqs[:half], dev, lanes) + self._run(model, reqs[half:], dev, lanes)
            if dev.type != "cpu" and self.cpu_fallback:
                self.stats["cpu_fallbacks"] += 1
                log.warning("engine.oom_cpu_fallback", device=str(dev), phonemes=len(reqs[0].ids))
                return self._forward(self._cpu_replica(), reqs, torch.device("cpu"), SERIAL)
            raise EngineOOMError(f"out of memory on {dev} for a single request of {len(reqs[0].ids)} "
                                 f"phoneme ids (cpu_fallback={self.cpu_fallback})") from exc

    def _cpu_replica(self) -> VitsModel:
        if self._cpu_model is None:
            state = {k: v.detach().to("cpu") for k, v in self._check_open().state_dict().items()}
            self._cpu_model = self._build(self._check_open().cfg, state, Path("<device model>"))
        return self._cpu_model

    def _forward(self, model: VitsModel, reqs: list[_Resolved], dev: torch.device, lanes: Lanes) -> list[np.ndarray]:
        self.stats["batches"] += 1
        with torch.inference_mode():
            inputs, conditions = self._inputs(reqs, dev)
            out = model.infer(*inputs, lanes, **conditions)  # lanes: SERIAL unless a CPU engine
            return [w.float().cpu().numpy() for w in out]

    @staticmethod
    def _inputs(reqs: list[_Resolved], dev: torch.device) -> tuple[tuple, dict]:
        """VitsModel.infer's inputs: (padded ids, lengths, one seeded CPU generator per request,
        scales) and its keyword conditions (speaker ids, speeds)."""
        b, t = len(reqs), max(len(r.ids) for r in reqs)
        ids = torch.zeros(b, t, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, :len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        lengths = torch.tensor([len(r.ids) for r in reqs], dtype=torch.long)
        gens = [torch.Generator(device="cpu").manual_seed(r.seed) for r in reqs]

        def scale(name: str) -> torch.Tensor:
            return torch.tensor([getattr(r, name) for r in reqs], dtype=torch.float32, device=dev)

        speakers = torch.tensor([r.speaker for r in reqs], dtype=torch.long, device=dev)
        speed = scale("speed") if any(r.speed != 1.0 for r in reqs) else None
        return ((ids.to(dev), lengths.to(dev), gens, scale("noise_scale"), scale("length_scale"), scale("noise_w")),
                {"speakers": speakers, "speed": speed})

    def synthesize_text(self, text: str, *, seed: int = 0, length_scale: float | None = None,
                        noise_scale: float | None = None, noise_w: float | None = None,
                        speaker: int | str | None = None) -> np.ndarray:
        """Front end + every utterance (utterance k uses seed + k), sentences joined with a short
        pause, the pieces of a sentence cut for length with none."""
        speaker_id = self.speaker_id(speaker)
        utterances = self.frontend.text_to_utterances(text)
        reqs = [SynthesisRequest(u.ids, seed=seed + k, length_scale=length_scale, noise_scale=noise_scale,
                                 noise_w=noise_w, speaker=speaker_id) for k, u in enumerate(utterances)]
        waves: list[np.ndarray] = []
        for start in range(0, len(reqs), TEXT_BATCH):
            waves.extend(self.synthesize_batch(reqs[start:start + TEXT_BATCH]))
        pause = np.zeros(int(SENTENCE_PAUSE_S * self.sample_rate), dtype=np.float32)
        parts: list[np.ndarray] = []
        for k, w in enumerate(waves):
            if k and utterances[k - 1].ends_sentence:
                parts.append(pause)
            parts.append(w)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def close(self) -> None:
        with self._lock, self._express_lock:
            on_cuda = self._device.type == "cuda"
            self._model = None
            self._cpu_model = None
            self._lanes.close()
            if self._express_lanes is not None:
                self._express_lanes.close()
        if on_cuda:
            torch.cuda.empty_cache()
        log.info("engine.closed", voice=self.voice_name)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
