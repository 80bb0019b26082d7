"""A node with a real service manager for third-party model servers (tests/test_anymodel.py).

`ModelNode` starts `systemd --user` as PID 1 of nothing - a user manager of root - inside
`unshare --mount` (overlays on /etc, /opt, /var; a tmpfs on /run: the host is untouched),
with the shipped units installed unchanged: tts-provisioner.service and
tts-model@.service, plus per-model drop-ins carrying the operator's command. The test
process stays outside the namespace: it talks to the servers over loopback (the network
namespace is shared), publishes to the S3 server directly, and runs `systemctl`,
`journalctl`-like reads and our CLIs inside with `nsenter --mount`.

Limits (the same as tests/test_ansible.py, docs/testing.md): a user manager, not PID 1;
credentials by file (a tts-owned 0600 file) instead of LoadCredential=; IPAddressDeny=
not enforced.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sysconfig
import textwrap
import time
from pathlib import Path

from tests.ops_helpers import SYSTEMD_DIR, sandbox_prelude
from tts_testkit.waits import wait_until
from tts_testkit.paths import REPO, SANDBOX_VENV, VENV
from tts_testkit.piper_versions import piper_voice, voice_files  # noqa: F401 (re-exported)
from tts_testkit.provisioner_setup import Keys, make_keys

SETUP = r"""
{prelude}
mkdir -p /run/systemd/system /etc/systemd/user /opt/tts-fleet /etc/tts-fleet/private /var/log/units
# The units run /opt/tts-fleet/venv/bin/...: a venv of the system python (the test venv's
# interpreter lives under /root, which ProtectHome= hides), reaching the test venv's
# packages and this checkout through a .pth file, as the ansible sandbox does.
/usr/bin/python3 -m venv --without-pip /opt/tts-fleet/venv
echo "import site; site.addsitedir('{site}')" >/opt/tts-fleet/venv/lib/python3.11/site-packages/tts-test.pth
for tool in tts-provisioner:provisioner.cli tts-ctl:runtime.ctl; do
  printf '#!/opt/tts-fleet/venv/bin/python\nfrom %s import main\nmain()\n' "${{tool#*:}}" >/opt/tts-fleet/venv/bin/${{tool%%:*}}
  chmod 0755 /opt/tts-fleet/venv/bin/${{tool%%:*}}
done
systemd-sysusers {repo}/systemd/sysusers.d/tts-fleet.conf 2>/dev/null
systemd-tmpfiles --create {repo}/systemd/tmpfiles.d/tts-fleet.conf
cp -r {work}/etc/. /etc/
chown -R root:tts /etc/tts-fleet && chmod 0640 /etc/tts-fleet/provisioner.toml
chown tts:tts /etc/tts-fleet/private /etc/tts-fleet/private/mirror.toml
chmod 0700 /etc/tts-fleet/private && chmod 0600 /etc/tts-fleet/private/mirror.toml
export XDG_RUNTIME_DIR=/run XDG_CACHE_HOME=/var/cache XDG_CONFIG_HOME=/var/lib
exec systemd --user >{work}/manager.log 2>&1
"""


class ModelNode:
    """One sandboxed server: the provisioner and model units under a real user manager."""

    def __init__(self, work: Path, s3_server, bucket: str, models: list[str], aria2_limit: str = "0"):
        self.work, self.s3, self.bucket, self.models = work, s3_server, bucket, models
        self.keys: Keys = make_keys(work)
        self.proc: subprocess.Popen | None = None
        self.aria2_limit = aria2_limit

    # -- set-up ----------------------------------------------------------------------------
    def _write_etc(self, dropins: dict[str, str]) -> None:
        etc = self.work / "etc"
        units = etc / "systemd/user"
        (etc / "tts-fleet/private").mkdir(parents=True)
        units.mkdir(parents=True)
        for unit in ("tts-provisioner.service", "tts-model@.service"):
            shutil.copy(SYSTEMD_DIR / unit, units / unit)
        # A user manager hands LoadCredential= files to root only: the daemon reads a tts-owned file.
        (units / "tts-provisioner.service.d").mkdir()
        (units / "tts-provisioner.service.d/test.conf").write_text("[Service]\nLoadCredential=\n")
        # No journald here (systemd is not PID 1): every unit's output goes to a file per unit.
        (units / "service.d").mkdir()
        (units / "service.d/log.conf").write_text("[Service]\nStandardOutput=append:/var/log/units/%n.log\n"
                                                  "StandardError=inherit\n")
        for unit, text in dropins.items():
            (units / f"{unit}.d").mkdir()
            (units / f"{unit}.d/command.conf").write_text(text)
        self.s3.write_credentials(etc / "tts-fleet/private/mirror.toml")
        shutil.copy(self.keys.public, etc / "tts-fleet/mirror.pub")
        models = "".join(f'\n[[models]]\nname = "{m}"\nchannel = "stable"\n' for m in self.models)
        (etc / "tts-fleet/provisioner.toml").write_text(textwrap.dedent(f"""\
            cache_dir = "/var/cache/tts-fleet"
            runtime_dir = "/run/tts-provisioner"
            poll_interval = 2
            keep_snapshots = 5
            public_keys = ["/etc/tts-fleet/mirror.pub"]
            disk_margin_mb = 1
            [aria2]
            connections = 2
            min_split_size = "1M"
            max_download_limit = "{self.aria2_limit}"
            [[mirrors]]
            name = "primary"
            endpoint = "{self.s3.endpoint}"
            bucket = "{self.bucket}"
            credentials_file = "/etc/tts-fleet/private/mirror.toml"
            """) + models)

    def start(self, dropins: dict[str, str]) -> None:
        self._write_etc(dropins)
        site = SANDBOX_VENV / Path(sysconfig.get_paths()["purelib"]).relative_to(VENV)
        script = SETUP.format(prelude=sandbox_prelude(self.work), site=site, repo=REPO, work=self.work)
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: self.proc.poll() is not None or self.exists("/run/systemd/private"), 60,
                   what="the user manager's control socket")
        assert self.proc.poll() is None, self.proc.stderr.read().decode()[-2000:]
        # A user manager creates its notify socket 0755; User=tts services need to reach it.
        self.sh("chmod 0777 /run/systemd/notify")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:  # bounded as a safety net: on a loaded machine the servers' stop can take minutes
            self.sh("systemctl --user stop 'tts-model@*.service' tts-provisioner.service", check=False, timeout=600)
        except subprocess.TimeoutExpired:
            pass  # the manager is stopped below either way
        self.proc.send_signal(signal.SIGTERM)  # the manager itself (exec'd by the sandbox script)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    # -- inside the namespace ----------------------------------------------------------------
    def path(self, inside: str) -> Path:
        """A path of the sandbox, seen from outside (through the manager's root)."""
        return Path(f"/proc/{self.proc.pid}/root{inside}")

    def exists(self, inside: str) -> bool:
        try:
            return self.path(inside).exists()
        except OSError:
            return False

    def sh(self, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(os.environ, XDG_RUNTIME_DIR="/run", SYSTEMD_PAGER="", SYSTEMD_COLORS="0")
        out = subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "bash", "-c", command], capture_output=True,
                             text=True, timeout=timeout, env=env)
        if check and out.returncode != 0:
            raise AssertionError(f"{command!r} exited {out.returncode}: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        return out

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.sh("systemctl --user " + " ".join(f"'{a}'" for a in args), check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *[f"-p{p}" for p in props]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        """What the unit's processes wrote: no journald runs here (systemd is not PID 1), so
        a sandbox drop-in sends every unit's stdout and stderr to /var/log/units/UNIT.log."""
        try:
            return self.path(f"/var/log/units/{unit}.log").read_text(errors="replace")
        except OSError:
            return ""

    def provisioner(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        quoted = " ".join(f"'{a}'" for a in args)
        return self.sh(f"TTS_LOG_FORMAT=json /opt/tts-fleet/venv/bin/tts-provisioner --config "
                       f"/etc/tts-fleet/provisioner.toml {quoted}", check=check, timeout=timeout)

    def model_status(self, name: str) -> dict:
        try:
            return json.loads(self.path(f"/run/tts-model/{name}/status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_active(self, unit: str, timeout: float = 180) -> dict[str, str]:
        def settled():
            state = self.show(unit, "ActiveState", "SubState", "StatusText", "Result")
            return state if state["ActiveState"] in ("active", "failed") else None
        state = wait_until(settled, timeout, interval=0.5, what=f"{unit} active or failed")
        assert state["ActiveState"] == "active", (state, self.journal(unit)[-4000:])
        return state


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3, detail=None):
    """wait_until, and on timeout what `detail()` says (a unit's log) in the failure."""
    try:
        return wait_until(predicate, timeout, interval=interval, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{detail()[-5000:] if detail else ''}") from None


def elapsed_since(t0: float) -> float:
    return time.monotonic() - t0
