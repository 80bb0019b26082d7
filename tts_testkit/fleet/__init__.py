"""A simulated fleet on one Linux machine: nodes that look like real hosts to ansible
(network namespace, private /etc /opt /var /run /tmp /root, sshd, a service manager),
plus the mirror in its own namespace. See tts_testkit/fleet/harness.py and docs/testing.md."""
