#!/usr/bin/env bash
# Set up, then run the whole test suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || exit $?
# Several workers (pytest-xdist, a module whole per worker): most tests wait on subprocesses,
# servers, sockets and playbooks rather than on the CPU. TTS_TEST_WORKERS=0: one process.
workers="${TTS_TEST_WORKERS:-3}"
parallel=()
if [ "$workers" != 0 ]; then
    parallel=(-n "$workers" --dist loadfile)
fi
.venv/bin/python -m pytest -q -ra --durations=15 "${parallel[@]}" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 0
fi
exit "$rc"
