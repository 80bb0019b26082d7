#!/usr/bin/env bash
# The main job on the embedded default: set up, then publish the bundled voice to a local
# S3 server, provision the cache, start the runtime and synthesize a WAV (path printed).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
