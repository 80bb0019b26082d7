#!/usr/bin/env bash
# Set up a fresh Debian machine for tts-fleet: aria2c from Debian, Python deps in .venv.
# Idempotent: a second run only checks. Needs root (or sudo) for apt-get the first time.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v aria2c >/dev/null 2>&1 || need_apt+=(aria2)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# systemd-analyze/-socket-activate/-sysusers/-tmpfiles and `systemd --user` for the unit
# tests (tests/test_systemd*.py, tests/test_ansible.py); systemd need not be PID 1.
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# The fleet's BitTorrent tracker (tests/test_tracker.py; ansible role tts_tracker).
command -v opentracker >/dev/null 2>&1 || need_apt+=(opentracker)
# Prometheus and promtool (tests/test_alert_rules.py, tests/test_prometheus_fleet.py): the
# role's alert rules are unit-tested with `promtool test rules`, and a real Prometheus scrapes
# the simulated fleet.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# The simulated fleet (tts_testkit/fleet/harness.py, tests/test_fleet.py, bench/fleet.py): the
# controller's ssh client, iptables (the mirror's egress counter, the units' address filters),
# ip/bridge; sudo for the single-host sandboxes' become_user. The nodes' own sshd, sudo and the
# roles' packages are in their cached Debian 12 root (below), not taken from this host.
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v sudo >/dev/null 2>&1 || need_apt+=(sudo)
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# A second MP3 decoder beside libsndfile (tests/test_runtime_trust.py).
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
# A fresh minimal Debian 12 under a real systemd (tests/test_fresh_host.py,
# tts_testkit/nspawn.py) and the fleet's nodes: the root from debootstrap, booted with
# systemd-nspawn.
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
command -v systemd-nspawn >/dev/null 2>&1 || need_apt+=(systemd-container)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]} with apt-get" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
    if [[ " ${need_apt[*]} " == *" opentracker "* ]] && [ -d /run/systemd/system ]; then
        # Only the tests run it; Debian's package would leave a tracker running on :6969.
        $SUDO systemctl disable --now opentracker.service >/dev/null 2>&1 || true
    fi
    if [[ " ${need_apt[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        # Only the tests run it (on their own port and files); Debian's package would leave a
        # Prometheus (and its node exporter) running on :9090/:9100.
        $SUDO systemctl disable --now prometheus.service prometheus-node-exporter.service >/dev/null 2>&1 || true
    fi
fi

extras="${TTS_FLEET_EXTRAS:-dev}"
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$extras"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv
fi
if [ ! -f "$stamp" ]; then
    echo "setup: installing Python dependencies into .venv (torch pinned by constraints.txt)" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    # pip's notes about unused index locations are noise; real errors still show.
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]" 2> >(grep -v "is neither a file nor a directory" >&2)
    rm -f .venv/.installed-*
    touch "$stamp"
fi
