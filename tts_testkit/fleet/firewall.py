"""What a node's service manager cannot enforce in the fleet harness, enforced another way.

`IPAddressAllow=`/`IPAddressDeny=` need systemd's cgroup BPF programs, which the nodes'
systemd (PID 1 in a systemd-nspawn container) does not attach there (docs/testing.md, "A
fleet on one machine"): the nodes parse the settings but let every address through. So the
harness reads what the node's manager parsed - `systemctl show UNIT -p IPAddressAllow` after
every drop-in, exactly the list it would load into its filter - and turns it into iptables
rules in the node's network namespace (run from this host: the container shares that
namespace and has no iptables of its own):

- ingress: connections to the unit's listening ports (`ports`) from any address outside the
  list are refused (TCP reset), as the unit's ingress filter would drop them;
- egress (`uid`, a user name on the node): connections the unit's user opens to any address outside the list are
  refused, as its egress filter would (the harness runs nothing else as that user that
  needs the network).

IPv4 only: the harness's bridge has no IPv6 addresses. A filter that is not `IPAddressDeny=any`
is refused (the rules would not say what the unit says).
"""

from __future__ import annotations

import re

from tts_testkit.fleet.harness import Node, run

_V4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$")


def unit_allow(node: Node, unit: str) -> list[str]:
    """The IPv4 prefixes the unit admits, as the node's service manager parsed them."""
    deny = node.systemctl("show", unit, "-p", "IPAddressDeny", "--value").stdout.split()
    if sorted(deny) != ["0.0.0.0/0", "::/0"]:
        raise RuntimeError(f"{node.name}: {unit} does not deny every address (IPAddressDeny={deny})")
    shown = node.systemctl("show", unit, "-p", "IPAddressAllow", "--value").stdout.split()
    return sorted(p for p in shown if _V4.match(p))


def enforce(node: Node, unit: str, ports: list[int], uid: str | None = None) -> list[str]:
    """Install the unit's address filter as iptables rules in the node; returns the prefixes."""
    allowed = unit_allow(node, unit)
    chain = "TTS-" + re.sub(r"[^A-Za-z0-9]", "", unit.removesuffix(".service"))[:20].upper()
    rules = [f"iptables -N {chain}-IN", f"iptables -N {chain}-OUT"]
    for prefix in allowed:
        rules += [f"iptables -A {chain}-IN -s {prefix} -j RETURN", f"iptables -A {chain}-OUT -d {prefix} -j RETURN"]
    rules += [f"iptables -A {chain}-IN -p tcp -j REJECT --reject-with tcp-reset",
              f"iptables -A {chain}-IN -j REJECT", f"iptables -A {chain}-OUT -j REJECT"]
    rules += [f"iptables -A INPUT -p tcp --dport {port} -j {chain}-IN" for port in ports]
    if uid is not None:
        # The rules are installed from this host, which has no such user: the node's number
        # for it (the container has no user namespace, so the kernel sees the same number).
        number = node.sh(f"id -u {uid}").stdout.strip()
        rules.append(f"iptables -A OUTPUT -m owner --uid-owner {number} -j {chain}-OUT")
    run(["ip", "netns", "exec", node.netns, "sh", "-c", " && ".join(rules)], timeout=60)
    return allowed
