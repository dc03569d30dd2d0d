#!/usr/bin/env bash
# Writes seed inputs into fuzz/corpus/<target>/ (real CSRs of every key type made with the
# openssl CLI, a PEM block, SPIFFE IDs, a JWT shape, log strings). The committed corpus already
# holds them, minimised with the campaign's finds; rerun this only to start a corpus afresh.
# Inputs of targets that read an `arbitrary` enum start with its 4-byte variant index (0).
set -euo pipefail
cd "$(dirname "$0")"
me=spiffe://cluster.local/ns/default/sa/web
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
seed() { # target name: content on stdin
    mkdir -p "corpus/$1"
    cat >"corpus/$1/seed-$2"
}
variant0() { printf '\0\0\0\0'; cat; }

csr() { # name, then openssl req key options and extra -addext pairs
    local name=$1
    shift
    openssl req -new -nodes -keyout /dev/null -subj / "$@" -outform DER -out "$tmp/$name.der" 2>/dev/null
    { printf '\1'; cat "$tmp/$name.der"; } | seed csr_policy "der-$name"
    { printf '\0'; openssl req -inform DER -in "$tmp/$name.der" -outform PEM; } | seed csr_policy "pem-$name"
}
csr p256 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -addext "subjectAltName=URI:$me"
csr p384 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -addext "subjectAltName=URI:$me"
csr ed25519 -newkey ed25519 -addext "subjectAltName=URI:$me"
csr rsa2048 -newkey rsa:2048 -addext "subjectAltName=URI:$me"
csr rsa-e3 -newkey rsa:2048 -pkeyopt rsa_keygen_pubexp:3 -addext "subjectAltName=URI:$me"
csr dns -newkey ed25519 -addext "subjectAltName=URI:$me,DNS:evil.example"
csr ca -newkey ed25519 -addext "subjectAltName=URI:$me" -addext "basicConstraints=critical,CA:TRUE"
csr not-ca -newkey ed25519 -addext "subjectAltName=URI:$me" -addext "basicConstraints=critical,CA:FALSE"
csr ku -newkey ed25519 -addext "subjectAltName=URI:$me" -addext "keyUsage=digitalSignature"

openssl req -inform DER -in "$tmp/p256.der" -outform PEM | variant0 | seed pem_split csr
printf '%s' "$me" | variant0 | seed spiffe_parse uri
b64() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
header=$(printf '{"alg":"RS256","kid":"k"}' | b64)
claims=$(printf '{"aud":["istio-ca"],"exp":1800003600,"iat":1799999990,"nbf":1799999990,"iss":"https://kubernetes.default.svc.cluster.local","kubernetes.io":{"namespace":"ns","pod":{"name":"p","uid":"u"}},"sub":"system:serviceaccount:ns:sa"}' | b64)
printf '%s.%s.c2lnbmF0dXJl' "$header" "$claims" | variant0 | seed token_precheck jwt
