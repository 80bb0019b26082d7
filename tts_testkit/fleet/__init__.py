"""A simulated fleet on one Linux machine: nodes that are real hosts to ansible (a Debian 12
container booted with systemd-nspawn, systemd as PID 1, in a network namespace on a bridge,
sshd), plus the mirror in its own namespace. See tts_testkit/fleet/harness.py and docs/testing.md."""
