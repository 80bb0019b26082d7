#!/usr/bin/env python
"""Text normalization benchmark: is a sentence with numbers, money, dates, times, ordinals,
years and abbreviations understood as a person would read it? ASR round trip on joe.

    .venv/bin/python bench/normalize.py [--draws 3]

Every sentence of SENTENCES is synthesized three ways in the same run and transcribed by
pocketsphinx (tts_testkit/asr.py, as tests/test_engine_intelligibility.py does):
  * piper   - piper-tts itself (onnxruntime, espeak reads the text: the peer);
  * before  - our engine with normalize_text off (the same reading as piper's);
  * after   - our engine with normalize_text on (runtime/normalize.py).
Each transcript is scored against the sentence as a person reads it aloud (the `spoken`
column, written by hand), `draws` noise draws per sentence and side. Figures: mean WER per
category and overall; target: after at most half of piper's overall, and below before in
every category (informational: espeak already reads plain numbers, percentages and
ordinals as a person does, so there the two can only tie) and no category worse by more
than 0.05. Also the front end's cost per sentence: the normalizer alone (target <= 1 ms)
and text -> ids with and without it (median of 20 alternating rounds; the read-out text
is longer, so espeak takes longer on it too).

Writes bench/results/normalize.json and normalize.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tts_testkit import benchresult as br
from tts_testkit.paths import REPO as ROOT

# (category, text as written, text as a person reads it)
SENTENCES = [
    ("money", "The ticket costs $3.50 at the door.", "the ticket costs three dollars and fifty cents at the door"),
    ("money", "She paid $1,200 for the old car.", "she paid one thousand two hundred dollars for the old car"),
    ("money", "A cup of coffee is £2.75 in London.", "a cup of coffee is two pounds and seventy five pence in london"),
    ("dates", "The meeting is on 2026-12-01.", "the meeting is on december first twenty twenty six"),
    ("dates", "He was born on 7/4/1990.", "he was born on july fourth nineteen ninety"),
    ("dates", "The shop opens on Jan. 5th.", "the shop opens on january fifth"),
    ("times", "The train leaves at 3:30 pm.", "the train leaves at three thirty p m"),
    ("times", "We have lunch at 12:15.", "we have lunch at twelve fifteen"),
    ("times", "Wake me up at 7:05 tomorrow.", "wake me up at seven oh five tomorrow"),
    ("ordinals", "She finished 3rd in the race.", "she finished third in the race"),
    ("ordinals", "This is the 21st time I asked.", "this is the twenty first time i asked"),
    ("ordinals", "They live on the 2nd floor.", "they live on the second floor"),
    ("years", "The house was built in 1984.", "the house was built in nineteen eighty four"),
    ("years", "In 2026 we moved to the city.", "in twenty twenty six we moved to the city"),
    ("years", "Music from the 1960s is still popular.", "music from the nineteen sixties is still popular"),
    ("abbreviations", "Dr. Smith lives on Elm St. near the park.", "doctor smith lives on elm street near the park"),
    ("abbreviations", "Mr. Brown sells apples, pears, etc. at the market.",
     "mister brown sells apples pears et cetera at the market"),
    ("abbreviations", "The road is 25 km long.", "the road is twenty five kilometers long"),
    ("numbers", "There were 12,500 people at the game.", "there were twelve thousand five hundred people at the game"),
    ("numbers", "Prices rose by 20% last year.", "prices rose by twenty percent last year"),
    ("numbers", "The answer is 3.14 or close to it.", "the answer is three point one four or close to it"),
]


# pocketsphinx's dictionary writes some words abbreviated ("dr", "mr", "etc", "pm"): one
# spelling for both the reference and every transcript, so no side is scored on spelling.
CANONICAL = {"dr": "doctor", "mr": "mister", "mrs": "missus", "etc": "et cetera", "pm": "p m", "km": "kilometers"}


def _canonical(text: str) -> str:
    from tts_testkit.asr import words

    return " ".join(CANONICAL.get(w, w) for w in words(text))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=3, help="noise draws per sentence and side")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    from piper.config import SynthesisConfig
    from piper.voice import PiperVoice

    from runtime.engine import Engine
    from piper_import import bundled_voice_paths, import_piper
    from tts_testkit.asr import make_recognizer, word_error_rate

    load0 = os.getloadavg()
    recognize = make_recognizer()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, json_path = bundled_voice_paths()
        bundle = import_piper(onnx_path, json_path, Path(tmp) / "joe").out_dir
        engine = Engine.load(bundle, device="cpu")
        piper = PiperVoice.load(onnx_path, json_path)
        fe = engine.frontend
        rows = []
        for k, (category, text, spoken) in enumerate(SENTENCES):
            row = {"category": category, "text": text, "spoken": spoken, "wer": {}, "heard": {}}
            fe.normalize_text = True
            row["read_out"] = " ".join(fe.spoken_sentences(text))
            for side in ("piper", "before", "after"):
                wers, heard = [], []
                for draw in range(args.draws):
                    if side == "piper":
                        chunks = piper.synthesize(text, SynthesisConfig())
                        wave, rate = np.concatenate([c.audio_float_array for c in chunks]), piper.config.sample_rate
                    else:
                        fe.normalize_text = side == "after"
                        wave, rate = engine.synthesize_text(text, seed=k + 1000 * draw), engine.sample_rate
                    hyp = recognize(wave, rate)
                    wers.append(word_error_rate(_canonical(spoken), _canonical(hyp)))
                    heard.append(hyp)
                row["wer"][side] = float(np.mean(wers))
                row["heard"][side] = heard[0]
            rows.append(row)
            print(f"{category:14} piper {row['wer']['piper']:.2f} before {row['wer']['before']:.2f} "
                  f"after {row['wer']['after']:.2f}  {text}", flush=True)

        # front end cost, normalization on vs off, alternating rounds
        texts = [t for _, t, _ in SENTENCES]
        cost = {True: [], False: []}
        for _ in range(20):
            for on in (False, True):
                fe.normalize_text = on
                t0 = time.perf_counter()
                for t in texts:
                    fe.text_to_utterances(t)
                cost[on].append(time.perf_counter() - t0)
        normalizer_s = []
        for _ in range(20):
            t0 = time.perf_counter()
            for t in texts:
                fe.normalizer(t)
            normalizer_s.append(time.perf_counter() - t0)
        engine.close()

    categories = sorted({r["category"] for r in rows}, key=[c for c, _, _ in SENTENCES].index)
    mean = {side: float(np.mean([r["wer"][side] for r in rows])) for side in ("piper", "before", "after")}
    per_cat = {c: {side: float(np.mean([r["wer"][side] for r in rows if r["category"] == c]))
                   for side in ("piper", "before", "after")} for c in categories}
    off, on = statistics.median(cost[False]), statistics.median(cost[True])
    added = on / off - 1
    wer_ratio = round(mean["after"] / mean["piper"], 3) if mean["piper"] else None
    figures = [
        br.figure("wer_after_over_piper", wer_ratio, "x", 0.5, mean["after"] <= 0.5 * mean["piper"],
                  after=round(mean["after"], 3), before=round(mean["before"], 3),
                  peer=br.peer("piper-tts (espeak reads the text), mean WER", round(mean["piper"], 3), "WER"),
                  ratio=wer_ratio, note="mean WER over the set; ours with normalization / piper-tts"),
        br.figure("categories_improved", sum(per_cat[c]["after"] < per_cat[c]["before"] for c in categories), "of",
                  None, None, of=len(categories),
                  per_category={c: {s: round(v, 3) for s, v in per_cat[c].items()} for c in categories}),
        br.figure("categories_worse_by_over_0.05", sum(per_cat[c]["after"] > per_cat[c]["before"] + 0.05
                                                       for c in categories), "of", 0,
                  not any(per_cat[c]["after"] > per_cat[c]["before"] + 0.05 for c in categories), of=len(categories)),
        br.figure("normalizer_ms_per_sentence", round(1000 * statistics.median(normalizer_s) / len(texts), 3), "ms", 1.0,
                  statistics.median(normalizer_s) / len(texts) <= 0.001, sentences=len(texts)),
        br.figure("frontend_ms_per_sentence_on", round(1000 * on / len(texts), 3), "ms", None, None,
                  off=round(1000 * off / len(texts), 3), added_percent=round(100 * added, 1),
                  note="text -> ids, median of 20 alternating rounds; synthesis of one sentence takes ~100x this"),
    ]
    result = br.write(args.out / "normalize.json", br.document(
        "normalize", figures, command=f".venv/bin/python bench/normalize.py --draws {args.draws}",
        machine=br.machine(loadavg_start=list(load0), loadavg_end=list(os.getloadavg())),
        details={"draws": args.draws, "sentences": rows}))
    (args.out / "normalize.md").write_text(_markdown(result, per_cat, mean))
    print(json.dumps(figures, indent=2, ensure_ascii=False))
    return 0


def _markdown(result: dict, per_cat: dict, mean: dict) -> str:
    m = result["machine"]
    md = ["# Text normalization: ASR round trip on joe", "",
          f"{result['date']}, {m['cpus']} CPUs, load average {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}. "
          f"Command: `{result['command']}`. pocketsphinx (its US English model) transcribes each waveform; "
          f"WER against the sentence as a person reads it aloud, mean of {result['details']['draws']} noise draws per "
          "sentence and side. piper = piper-tts on the written text (espeak reads it), before/after = our "
          "engine with `normalize_text` off/on.", "",
          *br.markdown_table(result["figures"])]
    md += ["", "| category | piper | before | after |", "|---|---|---|---|"]
    for c, v in per_cat.items():
        md.append(f"| {c} | {v['piper']:.2f} | {v['before']:.2f} | {v['after']:.2f} |")
    md.append(f"| **all** | **{mean['piper']:.2f}** | **{mean['before']:.2f}** | **{mean['after']:.2f}** |")
    md += ["", "| written | read out (after) | heard before | heard after |", "|---|---|---|---|"]
    for r in result["details"]["sentences"]:
        md.append(f"| {r['text']} | {r['read_out']} | {r['heard']['before']} | {r['heard']['after']} |")
    md += ["", "The references are how a person reads each sentence; the normalizer was written to read it that "
           "way, so `after` measures whether the voice says it intelligibly, `before`/`piper` how far espeak's "
           "own reading is from it (e.g. '$3.50' as \"dollar three point five zero\"). pocketsphinx's small "
           "language model mishears some words on every side; compare the columns, not the absolute level. "
           "Transcripts and references are scored with one spelling for what its dictionary abbreviates "
           f"({', '.join(f'{k} = {v}' for k, v in CANONICAL.items())}).", ""]
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())
