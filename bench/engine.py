#!/usr/bin/env python
"""Engine benchmark: our PyTorch VITS vs piper-tts (onnxruntime), side by side in one run.

    .venv/bin/python bench/engine.py [--threads 2] [--repeats 5]

Figures (bench/results/engine.json + engine.md):
  * CPU real-time factor (synthesis seconds / audio seconds) on 20 sentences, same phoneme ids
    and thread count for both (our threads run as lanes, piper's as onnxruntime intra-op
    threads); median of per-sentence ratios ours/piper (target <= 1.0). Each sentence is
    timed alternately (piper, ours) `repeats` times, each call 50 ms after the previous one,
    and the minimum kept, so load from other processes hits both sides alike.
  * Batched CPU throughput: 8 requests in one batch vs one at a time (target >= 1.3x), plus
    the same on a one-lane engine and the lane scaling of each, which show where the gain
    comes from (arithmetic saved per core vs cores kept busy).
  * Load time: Engine.load(bundle) to the end of the first synthesis (target <= 3 s).
  * GPU figures: only when CUDA is available (otherwise recorded as not measured).

    .venv/bin/python bench/engine.py --shapes x_low,high,multi [--threads 2] [--repeats 5]

measures the other Piper voice shapes (built full size by tts_testkit/voice_factory.py with piper's
own model code, random weights) beside onnxruntime running piper's exported graph in the same
run, and merges their figures into the same files (joe's figures are kept):
  * CPU RTF ratio ours / onnxruntime (median over the 20 sentences of joe's figure, German ones
    for the German voice; same ids, speaker 1 for the multi-speaker voice), target <= 1.0;
  * resident memory one loaded voice adds (RSS after load + first synthesis minus before),
    beside onnxruntime's session for the same graph;
  * load time to first synthesis (warm: torch imported), target <= 3 s.
"""

from __future__ import annotations

import os
import sys

# As runtime/engine.py sets it (before torch is imported). Our engine runs one intra-op thread
# per lane, so the policy no longer changes its speed; it is recorded with the machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from tts_testkit import benchresult as br  # noqa: E402
from tts_testkit.paths import REPO as ROOT  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there, how are you doing today?",
    "Please call Stella and ask her to bring these things with her from the store.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "Yes, indeed.",
    "The rain in Spain stays mainly in the plain.",
    "A journey of a thousand miles begins with a single step.",
    "She sells seashells by the seashore, and the shells she sells are surely seashells.",
    "Turn left at the next street, then walk two blocks to the station.",
    "Our server fleet keeps a verified model cache and answers on a local socket.",
    "Wow!",
    "Colorless green ideas sleep furiously.",
    "We hold these truths to be self-evident, that all men are created equal.",
    "The children are playing in the garden while their parents prepare dinner.",
    "Can you help me find my keys?",
    "Four score and seven years ago our fathers brought forth on this continent a new nation.",
    "The weather forecast says it will rain tomorrow afternoon.",
    "Peter Piper picked a peck of pickled peppers.",
    "Thank you very much for your help.",
    "In the beginning the universe was created, which made a lot of people very angry.",
]


SETTLE_S = 0.05


def _machine() -> dict:
    import onnxruntime

    return br.machine(isa=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
                      onnxruntime=onnxruntime.__version__, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                      loadavg_start=list(os.getloadavg()))


def _piper_voice(threads: int):
    import onnxruntime as ort
    from piper.voice import PiperVoice

    from piper_import import bundled_voice_paths

    onnx_path, json_path = bundled_voice_paths()
    voice = PiperVoice.load(onnx_path, json_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    voice.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return voice


def _rtf_pair(engine, piper, cfg, req, repeats: int):
    """(our audio, our RTF, onnxruntime's RTF) for one request: both warmed up, then
    timed alternately, the best of `repeats` each."""
    ours_audio = engine.synthesize_batch([req])[0]
    piper_audio = piper.phoneme_ids_to_audio(list(req.phoneme_ids), cfg)
    t_ours, t_piper = [], []
    for _ in range(repeats):
        # A short pause before each timed call lets the other side's threads park first:
        # onnxruntime's pool spins for a while after a run and took our cores otherwise
        # (measured: a one-word sentence 60 ms alone, 82 ms right after piper).
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        piper.phoneme_ids_to_audio(list(req.phoneme_ids), cfg)
        t_piper.append(time.perf_counter() - t0)
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        engine.synthesize_batch([req])
        t_ours.append(time.perf_counter() - t0)
    ours_rtf = min(t_ours) / (len(ours_audio) / engine.sample_rate)
    piper_rtf = min(t_piper) / (len(piper_audio) / engine.sample_rate)
    return ours_audio, ours_rtf, piper_rtf


def measure_rtf(engine, threads: int, repeats: int) -> dict:
    from piper.config import SynthesisConfig

    from runtime.engine import SynthesisRequest

    piper = _piper_voice(threads)
    cfg = SynthesisConfig()
    rows = []
    for k, text in enumerate(SENTENCES):
        ids = [i for sent in engine.frontend.text_to_sentence_ids(text) for i in sent]
        ours_audio, ours_rtf, piper_rtf = _rtf_pair(engine, piper, cfg, SynthesisRequest(ids, seed=k), repeats)
        rows.append({"ids": len(ids), "audio_s": round(len(ours_audio) / engine.sample_rate, 3),
                     "ours_rtf": round(ours_rtf, 4), "piper_rtf": round(piper_rtf, 4),
                     "ratio": round(ours_rtf / piper_rtf, 3)})
    return {
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "ours_median_rtf": statistics.median(r["ours_rtf"] for r in rows),
        "piper_median_rtf": statistics.median(r["piper_rtf"] for r in rows),
        "rows": rows,
    }


def measure_batch(engines: dict[int, object], repeats: int, batch: int = 8) -> dict:
    """Per engine (keyed by lane count): the best of `repeats` for one batch of 8 requests and
    for the same 8 one at a time, every measurement interleaved with the others and started
    after the same pause, so drift on this shared box hits all of them alike."""
    from runtime.engine import SynthesisRequest

    any_engine = next(iter(engines.values()))
    reqs = [SynthesisRequest([i for s in any_engine.frontend.text_to_sentence_ids(t) for i in s], seed=k)
            for k, t in enumerate(SENTENCES[:batch])]
    audio_s = sum(len(w) for w in any_engine.synthesize_batch(reqs)) / any_engine.sample_rate
    best: dict[tuple[int, str], float] = {}
    for _ in range(repeats):
        for n, engine in engines.items():
            for mode in ("batched", "sequential"):
                time.sleep(SETTLE_S)
                t0 = time.perf_counter()
                if mode == "batched":
                    engine.synthesize_batch(reqs)
                else:
                    for r in reqs:
                        engine.synthesize_batch([r])
                dt = time.perf_counter() - t0
                best[(n, mode)] = min(best.get((n, mode), dt), dt)
    return {n: {"audio_s": audio_s, "batched_aps": audio_s / best[(n, "batched")],
                "sequential_aps": audio_s / best[(n, "sequential")]} for n in engines}


def measure_load(bundle: Path, threads: int, repeats: int = 3) -> dict:
    from runtime.engine import Engine

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        eng = Engine.load(bundle, device="cpu", threads=threads)
        eng.synthesize_text("Hello.")
        times.append(time.perf_counter() - t0)
        eng.close()
    # cold: a fresh interpreter, imports included (informational)
    code = ("import time; t=time.perf_counter(); from runtime.engine import Engine; "
            f"e=Engine.load({str(bundle)!r}, device='cpu', threads={threads}); e.synthesize_text('Hello.'); "
            "print(time.perf_counter()-t)")
    cold = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return {"warm_median": statistics.median(times), "cold_process": float(cold.stdout.strip().splitlines()[-1])}


def measure_gpu(bundle: Path) -> list[dict]:
    if not torch.cuda.is_available():
        reason = "no CUDA device on this machine (and none was lent to this task)"
        return [br.figure("gpu_single_rtf", None, "x", 0.005, None, note=f"not measured: {reason}"),
                br.figure("gpu_best_audio_seconds_per_s", None, "audio-s/s", 500, None, note=f"not measured: {reason}")]
    from runtime.engine import Engine, SynthesisRequest

    eng = Engine.load(bundle, device="cuda")
    name = torch.cuda.get_device_name(0)
    ids = [[i for s in eng.frontend.text_to_sentence_ids(t) for i in s] for t in SENTENCES]
    figs = []
    single = []
    for k, seq in enumerate(ids):
        eng.synthesize_batch([SynthesisRequest(seq, seed=k)])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        w = eng.synthesize_batch([SynthesisRequest(seq, seed=k)])[0]
        torch.cuda.synchronize()
        single.append((time.perf_counter() - t0) / (len(w) / eng.sample_rate))
    rtf = statistics.median(single)
    figs.append(br.figure("gpu_single_rtf", round(rtf, 5), "x", 0.005, rtf <= 0.005, device=name))
    best = 0.0
    for bs in (1, 8, 32, 64):
        reqs = [SynthesisRequest(ids[k % len(ids)], seed=k) for k in range(bs)]
        eng.synthesize_batch(reqs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        waves = eng.synthesize_batch(reqs)
        torch.cuda.synchronize()
        aps = sum(len(w) for w in waves) / eng.sample_rate / (time.perf_counter() - t0)
        best = max(best, aps)
        figs.append(br.figure(f"gpu_audio_seconds_per_s_batch{bs}", round(aps, 1), "audio-s/s", None, None, device=name))
        figs.append(br.figure(f"gpu_peak_memory_batch{bs}", round(torch.cuda.max_memory_allocated() / 2**20, 1), "MiB",
                              None, None, device=name))
    figs.append(br.figure("gpu_best_audio_seconds_per_s", round(best, 1), "audio-s/s", 500, best >= 500, device=name))
    eng.close()
    return figs


# The other shapes read the same 20 sentences as joe's figure (German ones of the same spread,
# one word to two clauses, for the German multi-speaker voice): a median over 4 sentences moved
# +-0.1 between runs on this shared machine.
SHAPE_SENTENCES = {
    "en-us": SENTENCES,
    "de": [
        "Der schnelle braune Fuchs springt über den faulen Hund.",
        "Hallo, wie geht es dir heute?",
        "Bitte rufen Sie mich zurück, wenn Sie eine Minute Zeit haben.",
        "Es war ein klarer, kalter Tag im April, und die Uhren schlugen dreizehn.",
        "Ja, genau.",
        "Der Regen in Spanien fällt hauptsächlich in der Ebene.",
        "Auch eine Reise von tausend Meilen beginnt mit einem einzigen Schritt.",
        "Fischers Fritz fischt frische Fische, frische Fische fischt Fischers Fritz.",
        "Biegen Sie an der nächsten Straße links ab und gehen Sie zwei Blocks bis zum Bahnhof.",
        "Unsere Server halten einen geprüften Modellspeicher und antworten auf einem lokalen Socket.",
        "Toll!",
        "Farblose grüne Ideen schlafen wütend.",
        "Die Kinder spielen im Garten, während ihre Eltern das Abendessen vorbereiten.",
        "Kannst du mir helfen, meine Schlüssel zu finden?",
        "Die Wettervorhersage sagt, dass es morgen Nachmittag regnen wird.",
        "Vielen Dank für Ihre Hilfe.",
        "Im Anfang war das Wort, und das Wort war bei Gott.",
        "Wer zuerst kommt, mahlt zuerst, sagt ein altes Sprichwort.",
        "Der Zug nach Berlin fährt heute wegen Bauarbeiten eine halbe Stunde später ab.",
        "Am Ende des Tages zählt nur, was wir gemeinsam erreicht haben.",
    ],
}


def measure_shape(shape: str, base: Path, threads: int, repeats: int) -> list[dict]:
    """One full-size voice of `shape`: RTF ratio vs onnxruntime, RSS per loaded voice, load time."""
    import gc

    import onnxruntime as ort
    from piper.config import SynthesisConfig
    from piper.voice import PiperVoice

    from runtime import heap
    from runtime.engine import Engine, SynthesisRequest
    from piper_import import import_piper
    from tts_testkit import voice_factory

    onnx_path, json_path = voice_factory.build(shape, base / "onnx")
    bundle = import_piper(onnx_path, json_path, base / shape).out_dir
    spec = voice_factory.SHAPES[shape]
    speaker = 1 if spec["speakers"] > 1 else None

    # a first load pays this process's one-time costs (lazy imports, espeak start): not the voice's
    Engine.load(bundle, device="cpu", threads=threads).close()
    gc.collect()
    heap.release_after_batch(force=True)
    rss0, t0 = heap.rss_bytes(), time.perf_counter()
    engine = Engine.load(bundle, device="cpu", threads=threads)
    engine.synthesize_text("Hello.", speaker=speaker)
    load_s = time.perf_counter() - t0
    heap.release_after_batch(force=True)
    rss_ours = heap.rss_bytes() - rss0

    rss1 = heap.rss_bytes()
    piper = PiperVoice.load(onnx_path, json_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    piper.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    cfg = SynthesisConfig(speaker_id=speaker)
    piper.phoneme_ids_to_audio([1, 0, 20, 0, 2], cfg)
    rss_ort = heap.rss_bytes() - rss1

    rows = []
    for k, text in enumerate(SHAPE_SENTENCES[spec["espeak"]]):
        ids = [i for sent in engine.frontend.text_to_sentence_ids(text) for i in sent]
        _, ours_rtf, piper_rtf = _rtf_pair(engine, piper, cfg, SynthesisRequest(ids, seed=k, speaker=speaker), repeats)
        rows.append(ours_rtf / piper_rtf)
    engine.close()
    ratio = statistics.median(rows)
    desc = (f"{spec['quality']}, resblock {spec['resblock']}, hidden {spec['hidden']}, {spec['sample_rate']} Hz, "
            f"{spec['speakers']} speaker(s), {spec['espeak']}")
    return [
        br.figure(f"shape_{shape}_cpu_rtf_ratio_ours_over_onnxruntime_median", round(ratio, 3), "x", 1.0, ratio <= 1.0,
                  threads=threads, sentences=len(rows), per_sentence=[round(r, 3) for r in rows], voice=desc),
        br.figure(f"shape_{shape}_rss_per_loaded_voice", round(rss_ours / 2**20, 1), "MiB", None, None,
                  onnxruntime_session_mib=round(rss_ort / 2**20, 1), voice=desc,
                  note="RSS after Engine.load + first synthesis minus before (onnxruntime: its session, same graph)"),
        br.figure(f"shape_{shape}_load_to_first_synthesis_cpu", round(load_s, 3), "s", 3.0, load_s <= 3.0, voice=desc,
                  note="Engine.load(bundle) + first synthesis, torch already imported"),
    ]


def _write(result: dict, out: Path) -> None:
    br.write(out, result)
    machine, figures = result["machine"], result["figures"]
    md = ["# Engine benchmark", "", f"{result['date']} on {machine['cpu']} ({machine['cpus']} cores, {machine['isa']}), "
          f"torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, OMP_WAIT_POLICY={machine['omp_wait_policy']}, "
          f"load average {machine['loadavg_start'][0]:.1f} -> {machine['loadavg_end'][0]:.1f}.", "",
          *br.markdown_table(figures)]
    md += ["", f"Every timed call follows a {SETTLE_S * 1000:.0f} ms pause, so neither engine is timed while the other's "
           "threads still spin (docs/engine.md, 'Measuring fairly').", ""]
    shapes = result["details"].get("shapes")
    if shapes:
        md += ["## Other voice shapes", "",
               f"{shapes['date']}, load average {shapes['loadavg'][0]:.1f} -> {shapes['loadavg'][1]:.1f}: the machine is "
               "shared with other jobs and was loaded, so absolute RTFs are noisy; the ratios are measured in the same "
               "run, alternating calls, minimum of repeats. Voices: full-size random-weight voices built with piper's "
               "SynthesizerTrn (tts_testkit/voice_factory.py); onnxruntime runs piper's exported graph of the same voice.", ""]
        for f in figures:
            d = f.get("details", {})
            if f["name"].startswith("shape_") and "voice" in d:
                extra = f" (onnxruntime session {d['onnxruntime_session_mib']} MiB)" if "onnxruntime_session_mib" in d else ""
                md.append(f"* `{f['name']}` = {f['value']} {f['unit']}{extra} - {d['voice']}")
        md.append("")
    md += ["Reproduce: `.venv/bin/python bench/engine.py` (joe) and `.venv/bin/python bench/engine.py --shapes "
           "x_low,high,multi` (see docs/engine.md for what the figures mean).", ""]
    out.with_suffix(".md").write_text("\n".join(md))


def main_shapes(args) -> int:
    shapes = [s for s in args.shapes.split(",") if s]
    loadavg0 = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-shapes-") as tmp:
        figures = [f for shape in shapes for f in measure_shape(shape, Path(tmp), args.threads, args.repeats)]
    # joe's figures (and the run they came from: date, command, machine) stay; this run is in details.shapes
    result = br.load(args.out) if args.out.is_file() else br.document("engine", [], machine=_machine())
    result["machine"].setdefault("loadavg_end", list(os.getloadavg()))
    keep = [f for f in result["figures"] if not any(f["name"].startswith(f"shape_{s}_") for s in shapes)]
    result["figures"] = keep + figures
    result["details"]["shapes"] = {"date": br.now(), "command": br.command_line(),
                                   "loadavg": [loadavg0[0], os.getloadavg()[0]], "threads": args.threads,
                                   "repeats": args.repeats, "shapes": shapes}
    _write(result, args.out)
    for f in figures:
        print(f"{f['name']:<64} {f['value']!s:>10} {f['unit']:<6} target {f['target']}  met {f['met']}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None,
                    help="comma-separated voice shapes (x_low,high,multi): measure those and merge into --out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds per figure; the minimum is kept (bursts on a shared box last seconds)")
    ap.add_argument("--bundle", type=Path, help="existing bundle dir (default: import the bundled voice into a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    args = ap.parse_args()
    if args.shapes:
        return main_shapes(args)

    from runtime.engine import Engine

    tmp = None
    bundle = args.bundle
    import_s = None
    if bundle is None:
        from piper_import import bundled_voice_paths, import_piper

        tmp = tempfile.TemporaryDirectory(prefix="bench-engine-")
        t0 = time.perf_counter()
        bundle = import_piper(*bundled_voice_paths(), Path(tmp.name) / "bundle").out_dir
        import_s = time.perf_counter() - t0

    engine = Engine.load(bundle, device="cpu", threads=args.threads)
    machine = _machine()
    load = measure_load(bundle, args.threads)
    rtf = measure_rtf(engine, args.threads, args.repeats)
    # A one-lane engine beside it separates what batching saves per core from what it gains by
    # keeping every core busy (the two multiply to the 8-request figure).
    one_lane = Engine.load(bundle, device="cpu", threads=1) if args.threads > 1 else engine
    batches = measure_batch({args.threads: engine, 1: one_lane}, args.repeats)
    batch, per_core = batches[args.threads], batches[1]
    figures = [
        br.figure("cpu_rtf_ratio_ours_over_piper_median", round(rtf["median_ratio"], 3), "x", 1.0,
                  rtf["median_ratio"] <= 1.0, threads=args.threads, sentences=len(SENTENCES),
                  peer=br.peer("piper-tts (onnxruntime), median RTF", round(rtf["piper_median_rtf"], 4), "x"),
                  ratio=round(rtf["median_ratio"], 3)),
        br.figure("cpu_rtf_ours_median", round(rtf["ours_median_rtf"], 4), "x", None, None, threads=args.threads),
        br.figure("cpu_rtf_piper_median", round(rtf["piper_median_rtf"], 4), "x", None, None, threads=args.threads),
        br.figure("cpu_batch8_throughput_ratio", round(batch["batched_aps"] / batch["sequential_aps"], 3), "x", 1.3,
                  batch["batched_aps"] / batch["sequential_aps"] >= 1.3,
                  batched_audio_s_per_s=round(batch["batched_aps"], 2), threads=args.threads,
                  peer=br.peer("the same 8 requests one at a time", round(batch["sequential_aps"], 2), "audio-s/s"),
                  ratio=round(batch["batched_aps"] / batch["sequential_aps"], 3)),
        br.figure("cpu_batch8_throughput_ratio_one_lane", round(per_core["batched_aps"] / per_core["sequential_aps"], 3),
                  "x", None, None, threads=1,
                  note="the same 8 requests on a 1-lane engine: what batching saves per core"),
        br.figure("cpu_lane_scaling_single_requests", round(batch["sequential_aps"] / per_core["sequential_aps"], 3),
                  "x", None, None, note=f"one request at a time, {args.threads} lanes over 1"),
        br.figure("cpu_lane_scaling_batch8", round(batch["batched_aps"] / per_core["batched_aps"], 3),
                  "x", None, None, note=f"batch of 8, {args.threads} lanes over 1"),
        br.figure("load_to_first_synthesis_cpu", round(load["warm_median"], 3), "s", 3.0, load["warm_median"] <= 3.0,
                  note="Engine.load(bundle) + first synthesis, torch already imported"),
        br.figure("load_to_first_synthesis_cpu_cold_process", round(load["cold_process"], 3), "s", None, None,
                  note="fresh interpreter incl. importing torch (informational)"),
    ]
    if import_s is not None:
        figures.append(br.figure("import_piper_seconds", round(import_s, 2), "s", None, None))
    figures.extend(measure_gpu(bundle))
    machine["loadavg_end"] = list(os.getloadavg())
    result = br.document("engine", figures, machine=machine, details={"per_sentence": rtf["rows"]})
    if args.out.is_file():  # keep the other shapes' figures from an earlier --shapes run
        old = br.load(args.out)
        result["figures"] += [f for f in old["figures"] if f["name"].startswith("shape_")]
        if "shapes" in old["details"]:
            result["details"]["shapes"] = old["details"]["shapes"]
    _write(result, args.out)
    for f in figures:
        print(f"{f['name']:<48} {f['value']!s:>10} {f['unit']:<10} target {f['target']}  met {f['met']}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
