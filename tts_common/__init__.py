"""The bottom layer of tts-fleet: what every daemon and CLI shares.

Logging set-up, sd_notify, atomic file writes, the TOML config loader, the error base
and its mapping to CLI output, and retry backoff. Nothing here imports another
package of this project (import-linter checks it: see pyproject.toml), so
`mirror`, `provisioner` and `runtime` can all build on it without a cycle.
"""
