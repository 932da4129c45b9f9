"""lib/p256 against an independent implementation: signatures made by the `cryptography`
package (OpenSSL) on random messages, good and tampered, checked by the verifier inside the
real MicroPython Unix port ($MICROPYTHON or the venv's) and under CPython."""
import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from testbed.devices import ROOT, micropython_path

sys.path.insert(0, os.path.join(ROOT, "lib"))
import p256  # noqa: E402  (the device library, under CPython)

N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
GOOD = 20

DEVICE_SCRIPT = """
import sys, json, hashlib
sys.path.insert(0, %r)
import p256
with open(sys.argv[1]) as f:
    cases = json.load(f)
out = []
for c in cases:
    out.append(p256.verify(bytes.fromhex(c["pub"]),
                           hashlib.sha256(bytes.fromhex(c["msg"])).digest(),
                           bytes.fromhex(c["sig"])))
print(json.dumps(out))
""" % os.path.join(ROOT, "lib")


def _pub(key):
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _be(x):
    return x.to_bytes(32, "big")


def _cases(seed=1):
    """GOOD signed messages and, for each, tampered variants: (pub, msg, sig, valid, what)."""
    rnd = random.Random(seed)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(GOOD)]
    cases = []
    for i, key in enumerate(keys):
        msg = rnd.randbytes(rnd.choice((0, 1, 31, 32, 33, 200, 1000)))
        r, s = decode_dss_signature(key.sign(msg, ec.ECDSA(hashes.SHA256())))
        pub, sig = _pub(key), _be(r) + _be(s)
        other = _pub(keys[(i + 1) % GOOD])
        bad_msg = bytearray(msg or b"\x00")
        bad_msg[rnd.randrange(len(bad_msg))] ^= 1 << rnd.randrange(8)
        cases += [
            (pub, msg, sig, True, "good"),
            (pub, msg, _be(r) + _be(N - s), True, "s -> n - s (malleable, still valid)"),
            (pub, bytes(bad_msg), sig, False, "message bit flipped"),
            (pub, msg + b"\x00", sig, False, "message extended"),
            (pub, msg, _be(s) + _be(r), False, "r and s swapped"),
            (other, msg, sig, False, "another key"),
            (pub, msg, _be((r + 1) % N or 1) + _be(s), False, "r + 1"),
            (pub, msg, _be(r) + _be((s + 1) % N or 1), False, "s + 1"),
            (pub, msg, _be(N - r) + _be(s), False, "r -> n - r"),
        ]
    return cases


@pytest.fixture(scope="module")
def cases():
    cs = _cases()
    # The reference agrees with every label (so a wrong label cannot hide a verifier bug).
    for pub, msg, sig, valid, what in cs:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pub)
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        try:
            key.verify(der, msg, ec.ECDSA(hashes.SHA256()))
            ok = True
        except Exception:
            ok = False
        assert ok is valid, what
    return cs


def test_micropython_verifies_openssl_signatures_and_refuses_tampered_ones(cases, tmp_path):
    data = tmp_path / "cases.json"
    data.write_text(json.dumps([{"pub": p.hex(), "msg": m.hex(), "sig": s.hex()}
                                for p, m, s, _, _ in cases]))
    script = tmp_path / "verify_all.py"
    script.write_text(DEVICE_SCRIPT)
    r = subprocess.run([micropython_path(), str(script), str(data)], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(got) == len(cases)
    wrong = [(i, c[4], c[3], g) for i, (c, g) in enumerate(zip(cases, got)) if g is not c[3]]
    assert not wrong, wrong
    assert sum(got) == 2 * GOOD  # good and its malleable twin, nothing else


def test_cpython_import_gives_the_same_answers(cases):
    wrong = []
    for i, (pub, msg, sig, valid, what) in enumerate(cases):
        if p256.verify(pub, hashlib.sha256(msg).digest(), sig) is not valid:
            wrong.append((i, what, valid))
    assert not wrong, wrong


def test_cpython_published_vectors():
    with open(os.path.join(ROOT, "tests", "data", "p256_vectors.json")) as f:
        doc = json.load(f)
    cases = doc["wycheproof"] + doc["cavp"]
    assert len(cases) >= 30
    for c in cases:
        got = p256.verify(bytes.fromhex(c["pub"]), hashlib.sha256(bytes.fromhex(c["msg"])).digest(),
                          bytes.fromhex(c["sig"]))
        assert got is c["valid"], c.get("comment") or c.get("result")


def test_check_key_agrees_with_openssl_on_generated_keys():
    for _ in range(5):
        pub = _pub(ec.generate_private_key(ec.SECP256R1()))
        p256.check_key(pub)
        bad = pub[:-1] + bytes([pub[-1] ^ 1])
        with pytest.raises(ValueError):
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bad)
        with pytest.raises(ValueError, match="not a point on the curve"):
            p256.check_key(bad)
