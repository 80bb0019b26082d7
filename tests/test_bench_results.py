"""bench/results/*.json follow the one schema (tts_testkit/benchresult.py), and the schema
refuses the shapes it replaced."""

from __future__ import annotations

import json

import pytest

from tts_testkit import benchresult as br
from tts_testkit.paths import REPO

pytestmark = pytest.mark.unit

RESULTS = sorted((REPO / "bench" / "results").glob("*.json"))


def test_there_are_results():
    assert len(RESULTS) >= 9, RESULTS


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_committed_results_follow_the_schema(path):
    doc = json.loads(path.read_text())
    assert br.validate(doc) == []
    assert doc["benchmark"] == path.stem  # bench/fleet.py --only rollback writes fleet-rollback.json


def _doc(**figure) -> dict:
    fig = {"name": "x_ratio", "value": 1.2, "unit": "x", "target": 1.3, "met": False, **figure}
    return br.document("demo", [fig], machine=br.machine(), command="bench/demo.py")


def test_a_valid_document_round_trips(tmp_path):
    doc = br.write(tmp_path / "r.json", _doc(peer=br.peer("the old way", 2.0, "x"), ratio=0.6, details={"n": 3}))
    assert br.load(tmp_path / "r.json") == doc
    table = "\n".join(br.markdown_table(doc["figures"]))
    assert "| x_ratio | 1.2 | x | 1.3 | **no** | the old way: 2.0 x (ratio 0.6) |" in table



def test_a_peer_without_a_meaningful_ratio_shows_no_ratio():
    # A peer's count or status code beside ours: ratio null, and the table says nothing of one.
    doc = _doc(value=0, unit="responses", target="0", met=True, peer=br.peer("the old server", 0, "responses"),
               ratio=None)
    assert br.validate(doc) == []
    assert "| the old server: 0 responses |" in "\n".join(br.markdown_table(doc["figures"]))

@pytest.mark.parametrize("change,problem", [
    ({"met": "yes"}, "met must be true, false or null"),                 # the fleet files' "yes"/"no"
    ({"met": None}, "has a target and a value, so met must be"),
    ({"target": None, "met": True}, "met without a target"),
    ({"unit": ""}, "a unit is required"),
    ({"threads": 2}, "unknown keys ['threads']"),                         # extras belong in details
    ({"peer": br.peer("p", 1.0, "x")}, "peer and ratio come together"),
    ({"value": float("nan")}, "value must be"),
])
def test_a_bad_figure_is_named(change, problem):
    assert any(problem in p for p in br.validate(_doc(**change))), br.validate(_doc(**change))


def test_the_old_shapes_are_refused():
    by_name = {"benchmark": "bounds", "date": "2026-12-05T07:52:07+00:00", "machine": {"cpus": 2},
               "figures": {"peak_rss_above_idle_mib": {"value": 609.1, "target": "<= 1536", "met": True}}}
    problems = br.validate(by_name)
    assert "figures must be a list" in problems and any("schema must be" in p for p in problems)
    no_unit = dict(_doc(), figures=[{"figure": "egress", "value": 1.0, "target": None, "met": None}])
    assert any("missing ['name', 'unit']" in p for p in br.validate(no_unit))


def test_an_invalid_document_is_not_written(tmp_path):
    with pytest.raises(br.BenchResultError, match="met must be"):
        br.write(tmp_path / "r.json", _doc(met="no"))
    assert list(tmp_path.iterdir()) == []
