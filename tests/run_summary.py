"""Plugin (tests/conftest.py): figures a test wants in the run's own output.

A passing test's stdout is not shown (and under pytest-xdist it stays in the worker), so a
test that measures something an operator should see in CI's log - what building the
fresh-host root cost, the security scores - records it with
`record_property("summary", "...")`; the lines are printed at the end of the run, in a
section of their own, whichever worker ran the test.
"""

from __future__ import annotations

import pytest

KEY = "summary"
_lines: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":  # every phase's report carries the item's properties so far
        _lines.extend(str(value) for name, value in report.user_properties if name == KEY)


def pytest_terminal_summary(terminalreporter) -> None:
    if _lines:
        terminalreporter.section("figures recorded by tests")
        for line in _lines:
            terminalreporter.write_line(line)
