"""Dev tools shared by the test suite (tests/), the benchmarks (bench/) and the demo
(scripts/demo.py): the real components they start and the one bench result schema.

Nothing here is imported by the product (mirror/, provisioner/, runtime/), and nothing here
imports pytest: pytest fixtures live in tests/ (conftest.py and the plugins it registers).

- paths: the checkout, its venv, where sandboxes see the venv
- s3servers: nanio and `rclone serve s3` on 127.0.0.1 (S3Server, STARTERS, free_port)
- provisioner_setup: signing keys, models put on a mirror byte by byte, provisioner configs
- runtime_server: the real voice as a bundle, published into a cache; `tts-runtime serve`
- load: the request texts and concurrent client loop of the runtime benchmarks
- tracker: a real opentracker configured by the tts_tracker role's template
- asr: pocketsphinx round trip and word error rate
- voice_factory: test voices of every Piper shape, built with piper's own model code
- throttle_proxy: a per-connection throttling, byte-counting TCP proxy (a script too)
- fleet: a simulated fleet of nodes on one machine (harness, load client, rollout steps)
- nspawn: a fresh minimal Debian 12 with systemd as PID 1 (debootstrap root cached outside the
  checkout, overlay machines under systemd-nspawn); ansible_plugins: its `tts_nspawn` connection
- waits: bounded polling
- wheel: a wheel of this checkout (what the ansible role installs)
- benchresult: the schema, writer and validator of bench/results/*.json
"""
