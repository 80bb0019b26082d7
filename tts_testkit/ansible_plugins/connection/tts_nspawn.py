"""Ansible connection `tts_nspawn`: run tasks inside a tts_testkit.nspawn.Machine.

The inventory gives the command prefix that enters the machine (`Machine.ansible_vars()`):
its namespaces, its root, its cgroups and a clean environment - nothing of the controller's
environment reaches the machine. Modules are piped to the machine's python3 (pipelining):
one process per task. Always root, as a login to a fresh host's root would be.
"""

from __future__ import annotations

DOCUMENTATION = """
    name: tts_nspawn
    short_description: run inside a tts_testkit.nspawn machine (tests only)
    description:
        - Runs every command through a prefix that enters the machine (nsenter).
    author: tts-fleet
    options:
        enter:
            description: argv prefix that runs the rest of the command line inside the machine
            type: list
            elements: str
            required: true
            vars:
                - name: ansible_tts_nspawn_enter
"""

import subprocess

from ansible.errors import AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase


class Connection(ConnectionBase):
    transport = "tts_nspawn"
    has_pipelining = True
    always_pipeline_modules = True

    def _connect(self):
        self._play_context.remote_user = "root"
        self._connected = True
        return self

    def _inside(self, argv, in_data=None):
        prefix = [to_text(a) for a in self.get_option("enter")]
        proc = subprocess.run(prefix + argv, input=in_data, capture_output=True, timeout=3600)
        return proc.returncode, proc.stdout, proc.stderr

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        return self._inside(["/bin/sh", "-c", to_text(cmd)], in_data)

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        with open(to_bytes(in_path), "rb") as f:
            rc, _, err = self._inside(["/bin/sh", "-c", 'cat > "$0"', to_text(out_path)], f.read())
        if rc != 0:
            raise AnsibleError(f"copying {in_path} to {out_path} failed: {to_text(err)}")

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        rc, data, err = self._inside(["cat", to_text(in_path)])
        if rc != 0:
            raise AnsibleError(f"fetching {in_path} failed: {to_text(err)}")
        with open(to_bytes(out_path), "wb") as f:
            f.write(data)

    def close(self):
        self._connected = False
