"""The runtime reached from the network: HTTP over TCP with bearer tokens (and TLS), the Unix
socket unchanged, Wyoming's address allow list, listeners handed in by systemd by name.

Real servers on 127.0.0.1 and Unix sockets in temp dirs; the OpenAI SDK as the client; a
self-signed certificate made here with `cryptography`.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import shutil
import ssl
import subprocess
import time

import httpx
import openai
import pytest
from wyoming.client import AsyncClient
from wyoming.info import Describe

from tts_testkit.paths import VENV_BIN
from tts_testkit.runtime_server import start_server, write_config
from tts_testkit.s3servers import free_port

pytestmark = pytest.mark.integration

TOKEN_A = "tok-a-" + "0123456789abcdef" * 2
TOKEN_B = "tok-b-" + "fedcba9876543210" * 2
WRONG = "tok-x-" + "5555555555555555" * 2


def tokens_file(path, mode=0o600):
    path.write_text(f"# clients of this runtime\nhome-assistant {TOKEN_A}\n\n{TOKEN_B}  # the IVR\n")
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def net(voice_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("net")
    port, wy_port = free_port(), free_port()
    srv = start_server(tmp, voice_cache, max_chars=600, tcp_listen=f"127.0.0.1:{port}",
                       tcp_tokens_file=str(tokens_file(tmp / "tokens")),
                       wyoming_listen=[f"tcp://127.0.0.1:{wy_port}"], wyoming_allow=["192.0.2.0/24"])
    try:
        srv.wait_ready()
        srv.base = f"http://127.0.0.1:{port}"
        srv.wy_port = wy_port
        yield srv
    finally:
        srv.stop()


def post(srv, token: str | None, headers: dict | None = None):
    headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    with httpx.Client(base_url=srv.base, timeout=60) as c:
        return c.post("/v1/synthesize", json={"text": "Over TCP."}, headers=headers)


def test_tcp_needs_a_valid_bearer_token(net):
    missing = post(net, None)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="tts-runtime"'
    body = missing.json()
    assert body["error"]["type"] == "invalid_api_key" and body["error"]["code"] == 401
    assert "Authorization: Bearer" in body["error"]["message"]
    wrong = post(net, WRONG)
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
    assert post(net, "").status_code == 401
    with httpx.Client(base_url=net.base, timeout=60) as c:
        assert c.post("/v1/synthesize", json={"text": "x"}, headers={"Authorization": f"Basic {TOKEN_A}"}).status_code == 401
        assert c.get("/v1/status").status_code == 401 and c.get("/metrics").status_code == 401
        # probes stay open for load balancers
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    for token in (TOKEN_A, TOKEN_B):  # several tokens per runtime
        ok = post(net, token)
        assert ok.status_code == 200 and ok.content[:4] == b"RIFF"


def test_the_unix_socket_needs_no_token(net):
    with net.client() as c:
        assert c.post("/v1/synthesize", json={"text": "Local."}).status_code == 200


def test_openai_sdk_with_a_key(net, tmp_path):
    client = openai.OpenAI(base_url=f"{net.base}/v1", api_key=TOKEN_A, max_retries=0)
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello from the SDK.", response_format="wav")
    assert speech.content[:4] == b"RIFF"
    bad = openai.OpenAI(base_url=f"{net.base}/v1", api_key=WRONG, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.audio.speech.create(model="tts-1", voice="alloy", input="Nope.")
    assert err.value.status_code == 401


def test_tokens_never_reach_the_log_and_the_client_label_does(net):
    post(net, TOKEN_A, headers={"x-request-id": "labelled-1"})
    post(net, WRONG, headers={"x-request-id": "refused-1"})
    deadline = time.monotonic() + 30
    lines = {}
    while time.monotonic() < deadline and len(lines) < 2:
        for raw in net.log().splitlines():
            if raw.startswith("{") and ('"labelled-1"' in raw or '"refused-1"' in raw):
                fields = json.loads(raw)
                lines[fields["id"]] = fields
        time.sleep(0.1)
    assert lines["labelled-1"]["client"] == "home-assistant" and lines["labelled-1"]["status"] == 200
    assert lines["refused-1"]["status"] == 401 and "client" not in lines["refused-1"]
    log = net.log()
    for secret in (TOKEN_A, TOKEN_B, WRONG, "0123456789abcdef", "5555555555555555"):
        assert secret not in log
    assert '"count": 2' in log  # "bearer tokens loaded": how many, never which


def test_wyoming_refuses_an_address_outside_its_allow_list(net):
    async def describe():
        # The refusal comes at connect, before any event: the client only reads. (Writing first
        # raced the server's close: a write that landed after it was answered with a reset.)
        async with AsyncClient.from_uri(f"tcp://127.0.0.1:{net.wy_port}") as client:
            first = await client.read_event()
            return first, await client.read_event()

    first, after = asyncio.run(asyncio.wait_for(describe(), 60))
    assert first.type == "error" and first.data["code"] == "forbidden" and after is None
    assert "wyoming client refused" in net.log()


# -- TLS --------------------------------------------------------------------------------------

def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tts-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_https_with_a_certificate_and_the_unix_socket_stays_plain(voice_cache, tmp_path):
    cert, key = self_signed(tmp_path)
    port = free_port()
    srv = start_server(tmp_path / "srv", voice_cache, tcp_listen=f"127.0.0.1:{port}",
                       tcp_tokens_file=str(tokens_file(tmp_path / "tokens")),
                       tls_cert_file=str(cert), tls_key_file=str(key))
    try:
        srv.wait_ready()
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ssl.create_default_context(cafile=str(cert)), timeout=60) as c:
            r = c.post("/v1/synthesize", json={"text": "Encrypted."}, headers={"Authorization": f"Bearer {TOKEN_B}"})
            assert r.status_code == 200 and r.content[:4] == b"RIFF"
            assert c.get("/v1/voices").status_code == 401
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port gets no answer
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        with srv.client() as c:
            assert c.get("/v1/voices").status_code == 200
    finally:
        assert srv.stop() == 0


# -- refusals at start ------------------------------------------------------------------------

@pytest.mark.parametrize("extra,mode,needle,code", [
    ({"tcp_listen": "127.0.0.1:1"}, None, "tcp_listen needs bearer tokens", 2),
    ({"tls_cert_file": "/x.pem"}, None, "tls_cert_file and tls_key_file go together", 2),
    ({"wyoming_listen": ["http://0.0.0.0:1"]}, None, "wyoming_listen", 2),
    ({"wyoming_allow": ["everyone"]}, None, "wyoming_allow", 2),
    ({"tcp_listen": "127.0.0.1:{port}", "tcp_tokens_file": "{tokens}"}, 0o644, "open to other users", 1),
    ({"tcp_listen": "127.0.0.1:{port}", "tcp_tokens_file": "{missing}"}, None, "cannot read bearer tokens", 1),
])
def test_bad_network_settings_refuse_to_start_naming_what_is_wrong(tmp_path, extra, mode, needle, code):
    tokens = tokens_file(tmp_path / "tokens", mode or 0o600)
    values = {k: (v.format(port=free_port(), tokens=tokens, missing=tmp_path / "nope") if isinstance(v, str) else v)
              for k, v in extra.items()}
    cfg = write_config(tmp_path / "rt.toml", socket_path=str(tmp_path / "rt.sock"), cache_dir=str(tmp_path / "c"),
                       provisioner_runtime_dir=str(tmp_path / "p"), device="cpu", **values)
    r = subprocess.run([str(VENV_BIN / "tts-runtime"), "serve", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == code and needle in r.stderr, r.stderr[-2000:]
    assert TOKEN_A not in r.stderr + r.stdout
    assert not (tmp_path / "rt.sock").exists()  # nothing left listening


def test_short_tokens_are_refused_naming_the_line(tmp_path):
    from runtime.api.auth import TokenFileError, load_tokens

    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN_A}\nlabel short\n")
    path.chmod(0o600)
    with pytest.raises(TokenFileError, match="line 2: a token must have at least 16"):
        load_tokens(path)
    path.write_text("# nothing\n")
    with pytest.raises(TokenFileError, match="holds no token"):
        load_tokens(path)


# -- socket activation: three kinds of listener told apart by name ------------------------------

def test_socket_activation_with_named_sockets(voice_cache, tmp_path):
    activator = shutil.which("systemd-socket-activate")
    if activator is None:
        pytest.skip("systemd-socket-activate is not installed")
    http_port, wy_port = free_port(), free_port()
    unix = tmp_path / "activated.sock"
    cfg = write_config(tmp_path / "rt.toml", socket_path=str(tmp_path / "unused.sock"), cache_dir=str(voice_cache),
                       provisioner_runtime_dir=str(tmp_path / "prov"), device="cpu",
                       tcp_tokens_file=str(tokens_file(tmp_path / "tokens")))
    log = open(tmp_path / "log", "wb")
    proc = subprocess.Popen([activator, "-l", str(unix), "-l", f"127.0.0.1:{http_port}", "-l", f"127.0.0.1:{wy_port}",
                             "--fdname=tts-runtime.socket:http-tcp:wyoming", "-E", "TTS_LOG_FORMAT=json",
                             str(VENV_BIN / "tts-runtime"), "serve", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            if unix.exists():
                break
            time.sleep(0.05)
        # The first connection starts the runtime; each socket is served as its name says.
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(unix)), base_url="http://t", timeout=60) as c:
            assert c.get("/healthz").status_code == 200
            for _ in range(600):
                if c.get("/readyz").status_code == 200:
                    break
                time.sleep(0.1)
            assert c.post("/v1/synthesize", json={"text": "Activated."}).status_code == 200
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as c:
            assert c.get("/v1/voices").status_code == 401
            assert c.get("/v1/voices", headers={"Authorization": f"Bearer {TOKEN_A}"}).status_code == 200

        async def wyoming():
            async with AsyncClient.from_uri(f"tcp://127.0.0.1:{wy_port}") as client:
                await client.write_event(Describe().event())
                return await client.read_event()

        assert asyncio.run(asyncio.wait_for(wyoming(), 60)).type == "info"
        assert not (tmp_path / "unused.sock").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_listen_uri_parsing():
    from runtime.network_config import parse_listen_uri

    assert parse_listen_uri("tcp://0.0.0.0:10200") == ("tcp", "0.0.0.0", 10200)
    assert parse_listen_uri("tcp://[::]:10200") == ("tcp", "::", 10200)
    assert parse_listen_uri("unix:///run/tts/wyoming.sock")[0] == "unix"
    for bad in ("tcp://host", "tcp://:10200", "unix://relative", "http://x:1", "tcp://h:99999"):
        with pytest.raises(ValueError):
            parse_listen_uri(bad)


def test_bearer_header_parsing():
    from runtime.api.auth import BearerTokens, Token, _digest, bearer, over_unix_socket

    assert bearer([(b"authorization", b"Bearer abc")]) == b"abc"
    assert bearer([(b"authorization", b"bearer   abc ")]) == b"abc"
    assert bearer([(b"authorization", b"Basic abc")]) is None and bearer([]) is None
    tokens = BearerTokens([Token("a", _digest("x" * 20)), Token("b", _digest("y" * 20))])
    assert tokens.match(b"y" * 20) == "b" and tokens.match(b"z" * 20) is None
    assert over_unix_socket({"server": ("/run/tts/runtime.sock", None)})
    assert not over_unix_socket({"server": ("127.0.0.1", 8088)}) and not over_unix_socket({})
