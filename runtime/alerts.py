"""Which alert and which metric watch each failure `tts-ctl status` can see on a node.

One table (POINTERS) for `tts-ctl status` and docs/operations.md's failure table: the
alert names are those of the role's rule file (ansible/roles/tts_node/templates/
tts-fleet.rules.yml.j2), the metrics those of provisioner/metrics.py and runtime/api/
metrics.py; tests/test_metrics_unit.py checks each name exists there.
"""

from __future__ import annotations

from typing import Any

# failure -> (alert, metric to look at)
POINTERS: dict[str, tuple[str, str]] = {
    "provisioner not running": ("TtsMetricsTargetDown", 'up{job="tts-provisioner"}'),
    "sync failed": ("TtsSyncFailing", "tts_provisioner_sync_failures_total{cause}"),
    "cache damaged": ("TtsSyncFailing", "tts_provisioner_verification_failures_total"),
    "not at the wanted version": ("TtsVersionMismatch", "tts_provisioner_model_wanted_info, tts_voice_info"),
    "rollback hold": ("TtsRollbackHeld", "tts_provisioner_rollback_held"),
    "runtime unreachable": ("TtsMetricsTargetDown", 'up{job="tts-runtime"}'),
    "runtime not ready": ("TtsRuntimeNotReady", "tts_ready"),
    "voice does not load": ("TtsVoiceLoadFailed", "tts_voice_load_failed"),
    "queue full": ("TtsQueueFull", 'tts_errors_total{kind="queue_full"}'),
    "inference worker not alive": ("TtsRestarting", "process_start_time_seconds"),
}


def diagnose(prov: dict[str, Any] | None, rt: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, which model or "-", alert, metric) for every failure the two status
    documents show; empty when all is well."""
    found: list[tuple[str, str]] = []
    if prov is None or prov.get("state") == "stopped":
        found.append(("provisioner not running", "-"))
    for name, m in sorted(((prov or {}).get("models") or {}).items()):
        if m.get("state") == "error":
            found.append(("sync failed", name))
        elif m.get("state") == "damaged":
            found.append(("cache damaged", name))
    if "error" in rt:
        found.append(("runtime unreachable", "-"))
    else:
        if not rt.get("ready"):
            found.append(("runtime not ready", "-"))
        if rt.get("worker_alive") is False:
            found.append(("inference worker not alive", "-"))
        q = rt.get("queue") or {}
        if q.get("capacity") and q.get("depth", 0) >= q["capacity"]:
            found.append(("queue full", "-"))
        for name, r in sorted((rt.get("models") or {}).items()):
            wanted = (((prov or {}).get("models") or {}).get(name) or {}).get("wanted_version")
            if r.get("last_error") and r.get("loaded") and wanted and r.get("version") != wanted:
                found.append(("voice does not load", name))
            elif wanted and r.get("loaded") and r.get("version") != wanted:
                found.append(("not at the wanted version", name))
    return [(what, model, *POINTERS[what]) for what, model in found]
