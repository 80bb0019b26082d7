"""Plugin (tests/conftest.py): the order modules run in.

Whole modules in the order fleet, integration, unit; each module keeps its own order and
its place among its kind. scripts/test.sh runs the suite on several workers (pytest-xdist,
`--dist loadfile`: a worker takes a module whole, in this order), so the modules of several
minutes start first and the short ones fill the end, instead of one fleet module starting
when every other worker is nearly done.
"""

from __future__ import annotations

import pytest

RANK = {"fleet": 0, "integration": 1, "unit": 2}


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(trylast=True)  # after pytest groups items by parametrized session fixtures
def pytest_collection_modifyitems(config, items) -> None:
    module_rank: dict[str, int] = {}
    for item in items:
        kind = next((m.name for m in item.iter_markers() if m.name in RANK), "unit")
        module_rank[_module(item)] = min(module_rank.get(_module(item), RANK["unit"]), RANK[kind])
    items.sort(key=lambda item: module_rank[_module(item)])  # stable: every other order kept
