#!/usr/bin/env bash
# Generate TEST credentials for a Flower 1.42 deployment of fl-dplora.
#
#   scripts/generate_test_certs.sh [OUT_DIR] [NUM_SUPERNODES]
#
#   OUT_DIR          where to write everything (default: ./certs)
#   NUM_SUPERNODES   how many SuperNode authentication key pairs (default: 3)
#
# Environment:
#   SUPERLINK_EXTRA_SANS  extra subjectAltName entries for the SuperLink
#                         certificate, comma separated, e.g.
#                         "DNS:superlink.example.org,IP:10.0.0.5"
#   CERT_DAYS             validity in days (default: 365)
#   PYTHON                interpreter used only when ssh-keygen is missing
#                         (default: python3; needs the `cryptography` package,
#                         which flwr already depends on)
#
# Output (OUT_DIR):
#   ca.crt, ca.key                  test certificate authority
#   server.crt, server.key          SuperLink TLS certificate + key, signed by
#                                   the CA; SAN: localhost, 127.0.0.1, ::1,
#                                   superlink (the compose service name)
#   supernode-<i>, supernode-<i>.pub  SuperNode auth key pair, i = 0..N-1:
#                                   ECDSA P-384, OpenSSH format. This is what
#                                   Flower 1.42 expects:
#                                   `flower-supernode --auth-supernode-private-key
#                                   supernode-<i>` and
#                                   `flwr supernode register supernode-<i>.pub`.
#
# These are for trials and tests only. Never commit them (docker/.gitignore and
# the repository's .gitignore should list certs/). Production deployments
# should use certificates from the organisation's own CA.
set -euo pipefail

OUT_DIR="${1:-./certs}"
NUM_SUPERNODES="${2:-3}"
CERT_DAYS="${CERT_DAYS:-365}"
PYTHON="${PYTHON:-python3}"

if ! [[ "$NUM_SUPERNODES" =~ ^[0-9]+$ ]]; then
    echo "NUM_SUPERNODES must be a non-negative integer, got '$NUM_SUPERNODES'" >&2
    exit 2
fi
command -v openssl >/dev/null 2>&1 || {
    echo "openssl not found (Debian: apt-get install openssl)" >&2
    exit 1
}

mkdir -p "$OUT_DIR"
cd "$OUT_DIR"

SANS="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:superlink"
if [[ -n "${SUPERLINK_EXTRA_SANS:-}" ]]; then
    SANS="$SANS,$SUPERLINK_EXTRA_SANS"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------- CA
# keyUsage + subject/authority key identifiers keep strict verifiers happy
# (Python >= 3.13 sets VERIFY_X509_STRICT in ssl.create_default_context()).
cat >"$tmp/ca.ext" <<EOF
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
openssl genrsa -out ca.key 2048 2>/dev/null
openssl req -new -key ca.key -subj "/CN=fl-dplora test CA" -out "$tmp/ca.csr"
openssl x509 -req -in "$tmp/ca.csr" -signkey ca.key -days "$CERT_DAYS" -sha256 \
    -extfile "$tmp/ca.ext" -out ca.crt 2>/dev/null

# ---------------------------------------------------------------- SuperLink
cat >"$tmp/server.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = $SANS
EOF
openssl genrsa -out server.key 2048 2>/dev/null
openssl req -new -key server.key -subj "/CN=superlink" -out "$tmp/server.csr"
openssl x509 -req -in "$tmp/server.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -CAserial "$tmp/ca.srl" -days "$CERT_DAYS" -sha256 -extfile "$tmp/server.ext" \
    -out server.crt 2>/dev/null
openssl verify -CAfile ca.crt server.crt >/dev/null

# ---------------------------------------------------------------- SuperNodes
gen_node_key() {
    local name="$1"
    rm -f "$name" "$name.pub"
    if command -v ssh-keygen >/dev/null 2>&1; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fl-dplora-$name" -f "$name"
    else
        # openssl alone cannot write the OpenSSH key format Flower loads
        # (cryptography's load_ssh_private_key / load_ssh_public_key).
        "$PYTHON" - "$name" <<'PY'
import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

name = sys.argv[1]
key = ec.generate_private_key(ec.SECP384R1())
priv = key.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.OpenSSH,
    serialization.NoEncryption(),
)
pub = key.public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
)
with open(name, "wb") as f:
    f.write(priv)
with open(name + ".pub", "wb") as f:
    f.write(pub + b" fl-dplora-" + name.encode() + b"\n")
os.chmod(name, 0o600)
PY
    fi
}

for ((i = 0; i < NUM_SUPERNODES; i++)); do
    gen_node_key "supernode-$i"
done

chmod 600 ca.key server.key
chmod 644 ca.crt server.crt

echo "Wrote test credentials to $(pwd):"
echo "  CA:        ca.crt (ca.key)"
echo "  SuperLink: server.crt server.key  [SAN: $SANS]"
if ((NUM_SUPERNODES > 0)); then
    echo "  SuperNode auth keys: supernode-{0..$((NUM_SUPERNODES - 1))}{,.pub} (ECDSA P-384, OpenSSH)"
fi
