"""The alert rules the role ships, unit-tested with promtool (Debian package prometheus).

The rule file is the role's template rendered by monitoring.yml with the role's defaults
(tests/monitoring_helpers.py), so what is tested is what an operator installs; the cases
(tests/data/alert_rules.test.yml) check each alert fires on the faulty node with its
summary, not before its `for:`, and not on the healthy node beside it.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.monitoring_helpers import PROMTOOL, REPO, render_monitoring

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: run scripts/setup.sh (Debian package prometheus)")]

CASES = REPO / "tests/data/alert_rules.test.yml"
ALERTS = {"TtsSyncFailing", "TtsVersionMismatch", "TtsVoiceLoadFailed", "TtsRuntimeNotReady", "TtsMetricsTargetDown",
          "TtsErrorRatioHigh", "TtsQueueFull", "TtsCacheDiskNearlyFull", "TtsTrustedMetadataExpiring", "TtsRestarting",
          "TtsFleetFetchesFromMirror", "TtsRollbackHeld"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    work = tmp_path_factory.mktemp("rules")
    return work, render_monitoring(work, {"n1": "10.0.0.1", "n2": "10.0.0.2"})


def test_rules_pass_promtool_check_and_every_alert_has_a_case(rendered):
    _, mon = rendered
    out = subprocess.run([PROMTOOL, "check", "rules", str(mon.rules)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rules = [r for g in yaml.safe_load(mon.rules.read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert alerts == ALERTS
    for rule in (r for r in rules if "alert" in r):
        assert rule["annotations"]["summary"].strip() and rule["annotations"].get("description"), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    tested = {t["alertname"] for case in yaml.safe_load(CASES.read_text())["tests"] for t in case["alert_rule_test"]}
    assert tested == ALERTS


def test_promtool_unit_tests(rendered):
    work, mon = rendered
    cases = yaml.safe_load(CASES.read_text())
    cases["rule_files"] = [str(mon.rules)]
    path = work / "alert_rules.test.yml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    out = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]


def test_a_broken_rule_is_refused_before_it_is_installed(tmp_path):
    """The role validates the rule file with promtool: an expression that does not parse
    (here a `for:` that is not a duration) stops the play and leaves nothing behind."""
    with pytest.raises(AssertionError, match="promtool check rules|failed to validate"):
        render_monitoring(tmp_path, {"n1": "10.0.0.1"}, tts_node_alert_5xx_ratio="0.05 +")
    assert not (tmp_path / "prometheus-files/rules/tts-fleet.rules.yml").exists()


def test_targets_name_every_node_with_its_ports(rendered):
    _, mon = rendered
    prov = yaml.safe_load((mon.file_sd / "tts-provisioner.yml").read_text())
    rt = yaml.safe_load((mon.file_sd / "tts-runtime.yml").read_text())
    assert prov == [{"targets": ["10.0.0.1:9771"], "labels": {"node": "n1"}},
                    {"targets": ["10.0.0.2:9771"], "labels": {"node": "n2"}}]
    assert [t["targets"] for t in rt] == [["10.0.0.1:9772"], ["10.0.0.2:9772"]]


def test_one_for_duration_overrides_only_its_alert(tmp_path):
    mon = render_monitoring(tmp_path, {"n1": "10.0.0.1"}, tts_node_alert_for={"sync_failing": "30m"})
    rules = {r["alert"]: r for g in yaml.safe_load(mon.rules.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert rules["TtsSyncFailing"]["for"] == "30m" and "failed for 30m" in rules["TtsSyncFailing"]["annotations"]["summary"]
    assert rules["TtsVersionMismatch"]["for"] == "30m" and rules["TtsVoiceLoadFailed"]["for"] == "5m"
