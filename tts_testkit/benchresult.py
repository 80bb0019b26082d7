"""The one shape of bench/results/*.json: every benchmark writes through `write`, and
tests/test_bench_results.py checks every committed file with `validate`.

A results file is one JSON object:

    {
      "schema": "tts-fleet-bench/1",
      "benchmark": "sync",                  the script (fleet-rollback: bench/fleet.py --only rollback)
      "date": "2026-12-02T07:02:33+00:00",  when the run ended, ISO 8601 with the UTC offset
      "command": ".venv/bin/python bench/sync.py --servers nanio rclone",
                                            what ran; null only in files recorded before this
                                            schema whose run did not record it
      "machine": {"cpus": 2, ...},          at least the CPU count; whatever else the run records
                                            (cpu model, platform, load averages, tool versions)
      "figures": [figure, ...],             what the benchmark measured, names unique
      "details": {...}                      everything else it records: settings, raw rounds,
                                            per-node and per-sentence data, notes
    }

and a figure:

    {
      "name": "cpu_batch8_throughput_ratio",
      "value": 1.139,                       a number; a bool, text or list where the benchmark
                                            records one; null = not measured (the note says why)
      "unit": "x",                          "x" for a ratio; may be "" only for a text or bool value
      "target": 1.3,                        what it must meet (a number, or a text such as
                                            "<= 1.35"); null = informational
      "met": false,                         true/false when there is a target and a value, else null
      "peer": {"name": "the same 8 requests one at a time", "value": 31.36, "unit": "audio-s/s"},
                                            optional: the peer's measurement in the same run
      "ratio": 1.139,                       with a peer: ours compared with it, as the benchmark
                                            computes it (e.g. a median of per-round ratios, so not
                                            always value / peer.value); == value when the figure
                                            is that comparison
      "note": "...",                        optional, one line
      "details": {...}                      optional: the figure's own extra data
    }
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tts_common.atomic import write_atomic

SCHEMA = "tts-fleet-bench/1"
TOP_KEYS = ("schema", "benchmark", "date", "command", "machine", "figures", "details")
FIGURE_KEYS = ("name", "value", "unit", "target", "met")
OPTIONAL_FIGURE_KEYS = ("peer", "ratio", "note", "details")
PEER_KEYS = ("name", "value", "unit")


class BenchResultError(ValueError):
    """A results document that does not follow the schema (the message lists every problem)."""


def figure(name: str, value: Any, unit: str, target: Any = None, met: bool | None = None, *,
           peer: dict | None = None, ratio: float | None = None, note: str | None = None, **details) -> dict:
    """One figure; keyword arguments beyond the schema's go to its `details`."""
    fig = {"name": name, "value": value, "unit": unit, "target": target, "met": met}
    if peer is not None or ratio is not None:  # both or neither (validate says which is missing)
        fig["peer"], fig["ratio"] = peer, ratio
    if note is not None:
        fig["note"] = note
    if details:
        fig["details"] = details
    return fig


def peer(name: str, value: Any, unit: str) -> dict:
    return {"name": name, "value": value, "unit": unit}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """How this process was started, as a person would type it from the checkout."""
    return " ".join([".venv/bin/python", *sys.argv])


def machine(**extra) -> dict:
    """The machine's description every benchmark records, plus what it adds (load averages,
    tool versions)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), **extra}


def document(benchmark: str, figures: list[dict], *, machine: dict, details: dict | None = None,
             command: str | None = None, date: str | None = None) -> dict:
    return {"schema": SCHEMA, "benchmark": benchmark, "date": date or now(),
            "command": command if command is not None else command_line(),
            "machine": machine, "figures": figures, "details": details or {}}


def write(path: Path, doc: dict) -> dict:
    """Validate `doc` and write it to `path` (whole or not at all); returns it."""
    problems = validate(doc)
    if problems:
        raise BenchResultError(f"{path}: not a valid bench result: " + "; ".join(problems))
    write_atomic(path, json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return doc


def load(path: Path) -> dict:
    """A results file, validated."""
    doc = json.loads(Path(path).read_text())
    problems = validate(doc)
    if problems:
        raise BenchResultError(f"{path}: not a valid bench result: " + "; ".join(problems))
    return doc


def figures_by_name(doc: dict) -> dict[str, dict]:
    return {f["name"]: f for f in doc["figures"]}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_value(value) -> bool:
    if isinstance(value, list):
        return all(_is_value(v) for v in value)
    return value is None or isinstance(value, (str, bool)) or _is_number(value)


def _validate_peer(where: str, p) -> list[str]:
    if not isinstance(p, dict) or set(p) != set(PEER_KEYS):
        return [f"{where}: peer must be an object with exactly {list(PEER_KEYS)}"]
    problems = []
    if not isinstance(p["name"], str) or not p["name"]:
        problems.append(f"{where}: peer name must be a non-empty string")
    if not _is_value(p["value"]):
        problems.append(f"{where}: peer value must be a number, bool, text, list or null")
    if not isinstance(p["unit"], str):
        problems.append(f"{where}: peer unit must be a string")
    return problems


def _validate_figure(i: int, f) -> list[str]:
    if not isinstance(f, dict):
        return [f"figures[{i}] is not an object"]
    where = f"figures[{i}] ({f.get('name', '?')})"
    missing = [k for k in FIGURE_KEYS if k not in f]
    unknown = [k for k in f if k not in FIGURE_KEYS + OPTIONAL_FIGURE_KEYS]
    problems = [f"{where}: missing {missing}"] if missing else []
    if unknown:
        problems.append(f"{where}: unknown keys {unknown} (extra data goes in 'details')")
    if missing:
        return problems
    value, target, met = f["value"], f["target"], f["met"]
    if not isinstance(f["name"], str) or not f["name"]:
        problems.append(f"{where}: name must be a non-empty string")
    if not _is_value(value):
        problems.append(f"{where}: value must be a number, bool, text, list or null")
    if not isinstance(f["unit"], str):
        problems.append(f"{where}: unit must be a string")
    elif not f["unit"] and not isinstance(value, (str, bool)):
        problems.append(f"{where}: a unit is required unless the value is a text or a bool")
    if target is not None and not (isinstance(target, str) or _is_number(target)):
        problems.append(f"{where}: target must be a number, a text or null")
    if met is not None and not isinstance(met, bool):
        problems.append(f"{where}: met must be true, false or null (not {met!r})")
    elif target is not None and value is not None and met is None:
        problems.append(f"{where}: has a target and a value, so met must be true or false")
    elif target is None and met is not None:
        problems.append(f"{where}: met without a target")
    if ("peer" in f) != ("ratio" in f):
        problems.append(f"{where}: peer and ratio come together")
    if "peer" in f:
        problems += _validate_peer(where, f["peer"])
    if "ratio" in f and f["ratio"] is not None and not _is_number(f["ratio"]):
        problems.append(f"{where}: ratio must be a number or null")
    if "note" in f and not isinstance(f["note"], str):
        problems.append(f"{where}: note must be a string")
    if "details" in f and not isinstance(f["details"], dict):
        problems.append(f"{where}: details must be an object")
    return problems


def validate(doc) -> list[str]:
    """Every way `doc` departs from the schema (empty: it follows it)."""
    if not isinstance(doc, dict):
        return ["the document is not a JSON object"]
    problems = []
    missing = [k for k in TOP_KEYS if k not in doc]
    unknown = [k for k in doc if k not in TOP_KEYS]
    if missing:
        problems.append(f"missing {missing}")
    if unknown:
        problems.append(f"unknown keys {unknown} (extra data goes in 'details')")
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema must be {SCHEMA!r}, not {doc.get('schema')!r}")
    if not isinstance(doc.get("benchmark"), str) or not doc.get("benchmark"):
        problems.append("benchmark must be a non-empty string")
    try:
        if datetime.fromisoformat(doc.get("date")).utcoffset() is None:
            problems.append("date must carry its UTC offset")
    except (TypeError, ValueError):
        problems.append(f"date must be ISO 8601, not {doc.get('date')!r}")
    if "command" in doc and doc["command"] is not None and not (isinstance(doc["command"], str) and doc["command"]):
        problems.append("command must be a non-empty string (or null for a legacy run that did not record it)")
    m = doc.get("machine")
    if not isinstance(m, dict) or not isinstance(m.get("cpus"), int) or isinstance(m.get("cpus"), bool):
        problems.append("machine must be an object with the CPU count in 'cpus'")
    if "details" in doc and not isinstance(doc["details"], dict):
        problems.append("details must be an object")
    figures = doc.get("figures")
    if not isinstance(figures, list):
        problems.append("figures must be a list")
        return problems
    for i, f in enumerate(figures):
        problems += _validate_figure(i, f)
    names = [f.get("name") for f in figures if isinstance(f, dict)]
    dupes = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if dupes:
        problems.append(f"figure names must be unique: {dupes}")
    return problems


def markdown_table(figures: list[dict]) -> list[str]:
    """The figures as a Markdown table (what every bench/results/*.md shows)."""
    def cell(v) -> str:
        return "" if v is None else str(v)

    rows = ["| figure | value | unit | target | met | peer (same run) |", "|---|---|---|---|---|---|"]
    for f in figures:
        met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
        p = f.get("peer")
        ratio = "" if f.get("ratio") is None else f" (ratio {f['ratio']})"  # null: no meaningful ratio
        peer_cell = f"{p['name']}: {p['value']} {p['unit']}{ratio}" if p else ""
        rows.append(f"| {f['name']} | {cell(f['value'])} | {f['unit']} | {cell(f['target'])} | {met} | {peer_cell} |")
    return rows


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (0 <= q <= 1), rounded to 0.01; None if empty."""
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return round(values[lo] + (values[hi] - values[lo]) * (k - lo), 2)
