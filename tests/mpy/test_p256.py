# ECDSA P-256 verifier (lib/p256) on the device: published vectors (Wycheproof, NIST CAVP;
# tests/data/p256_vectors.json), tampering, malformed input, key checks.
import hashlib
import json

import p256
from mpyutil import raises

_ROOT = __file__.rsplit("/", 3)[0] if __file__.count("/") >= 3 else "."


def _vectors():
    with open(_ROOT + "/tests/data/p256_vectors.json") as f:
        # One read: json.load reads a stream a byte at a time, each a round trip over
        # mpremote mount on a board (testbed/hil.py), minutes for these 20 KB.
        return json.loads(f.read())


def _h(s):
    return bytes.fromhex(s)


def _sha(msg):
    return hashlib.sha256(msg).digest()


def _check(cases, name):
    wrong = []
    for c in cases:
        got = p256.verify(_h(c["pub"]), _sha(_h(c["msg"])), _h(c["sig"]))
        if got is not c["valid"]:
            wrong.append((c.get(name), c.get("comment") or c.get("result"), c["valid"], got))
    assert not wrong, wrong


def _good():
    """A valid (pub, msg, sig) from the CAVP vectors."""
    c = [c for c in _vectors()["cavp"] if c["valid"]][0]
    return _h(c["pub"]), _h(c["msg"]), _h(c["sig"])


def test_wycheproof_vectors():
    cases = _vectors()["wycheproof"]
    assert len(cases) >= 30
    assert 10 <= sum(1 for c in cases if c["valid"]) <= len(cases) - 10  # both kinds
    _check(cases, "tcId")


def test_nist_cavp_sigver_vectors():
    cases = _vectors()["cavp"]
    assert len(cases) >= 3 and any(c["valid"] for c in cases)
    _check(cases, "result")


def test_tampered_digest_swapped_rs_and_wrong_key_fail():
    pub, msg, sig = _good()
    digest = _sha(msg)
    assert p256.verify(pub, digest, sig) is True
    for i in (0, 17, 31):  # one flipped bit anywhere in the digest
        d = bytearray(digest)
        d[i] ^= 0x01
        assert p256.verify(pub, bytes(d), sig) is False, i
    assert p256.verify(pub, _sha(msg + b"\x00"), sig) is False  # modified message
    assert p256.verify(pub, digest, sig[32:] + sig[:32]) is False  # r and s swapped
    s = bytearray(sig)
    s[63] ^= 0x80
    assert p256.verify(pub, digest, bytes(s)) is False
    others = [_h(c["pub"]) for c in _vectors()["cavp"] if _h(c["pub"]) != pub]
    assert others
    for other in others:  # valid keys, not the signer's
        p256.check_key(other)
        assert p256.verify(other, digest, sig) is False
    # (r, n - s) is also a valid signature (ECDSA malleability); (n - r, s) is not.
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    assert p256.verify(pub, digest, sig[:32] + (p256.N - s).to_bytes(32, "big")) is True
    assert p256.verify(pub, digest, (p256.N - r).to_bytes(32, "big") + sig[32:]) is False


def _be(x):
    return x.to_bytes(32, "big")


def test_malformed_input_is_false_never_an_exception():
    pub, msg, sig = _good()
    digest = _sha(msg)
    x, y = pub[1:33], pub[33:]
    yi = int.from_bytes(y, "big")
    bad_keys = [
        b"", b"\x00",  # empty, SEC1 point at infinity
        pub[:64], pub + b"\x00",  # lengths
        b"\x02" + x, b"\x03" + x,  # compressed: not accepted
        b"\x05" + x + y, b"\x06" + x + y,  # wrong prefix (0x06: hybrid)
        b"\x04" + bytes(64),  # (0, 0)
        b"\x04" + x + _be((yi + 1) % p256.P),  # not on the curve
        b"\x04" + _be(p256.P) + y, b"\x04" + x + _be(p256.P),  # coordinate >= p
        b"\x04" + b"\xff" * 64,
    ]
    for k in bad_keys:
        assert p256.verify(k, digest, sig) is False, k
    for d in (b"", digest[:31], digest + b"\x00", b"\x00" + digest):  # same int, 33 bytes
        assert p256.verify(pub, d, sig) is False, d
    for s in (b"", sig[:63], sig + b"\x00", sig[:32], bytes(64)):
        assert p256.verify(pub, digest, s) is False, s
    r, s = sig[:32], sig[32:]
    n, p = p256.N, p256.P
    for rr, ss in ((bytes(32), s), (r, bytes(32)), (_be(n), s), (r, _be(n)), (_be(n + 1), s),
                   (r, _be(n + 1)), (_be(p), s), (b"\xff" * 32, s), (r, b"\xff" * 32)):
        assert p256.verify(pub, digest, rr + ss) is False, (rr, ss)
    # A valid key whose y < 2^256 - p, written with y + p: the same point mod p, but not a
    # canonical encoding, so refused.
    c = [c for c in _vectors()["wycheproof"]
         if c["comment"].startswith("y-coordinate of the public key is small")][0]
    k, m, sg = _h(c["pub"]), _sha(_h(c["msg"])), _h(c["sig"])
    ys = int.from_bytes(k[33:], "big")
    assert c["valid"] and ys + p < 1 << 256
    assert p256.verify(k, m, sg) is True
    assert p256.verify(k[:33] + _be(ys + p), m, sg) is False
    assert "out of range" in str(raises(ValueError, p256.check_key, k[:33] + _be(ys + p)))
    assert p256.verify(pub, digest, sig) is True  # and the untouched inputs still verify


def test_check_key_accepts_valid_keys_and_says_why_not():
    pub, _, _ = _good()
    p256.check_key(pub)
    for c in _vectors()["wycheproof"]:
        p256.check_key(_h(c["pub"]))
    x, y = pub[1:33], pub[33:]
    yi = int.from_bytes(y, "big")
    for key, words in (
        (pub[:64], "65 bytes"),
        (b"\x02" + x, "65 bytes"),
        (b"\x03" + x + y, "uncompressed"),
        (b"\x04" + x + _be((yi + 1) % p256.P), "not a point on the curve"),
        (b"\x04" + bytes(64), "not a point on the curve"),
        (b"\x04" + x + b"\xff" * 32, "out of range"),
    ):
        e = raises(ValueError, p256.check_key, key)
        assert words in str(e), (key, str(e))


def _affine_add(a, b):
    p = p256.P
    if a is None:
        return b
    if a == b:
        lam = (3 * a[0] * a[0] - 3) * pow(2 * a[1], p - 2, p) % p
    else:
        lam = (b[1] - a[1]) * pow(b[0] - a[0], p - 2, p) % p
    x = (lam * lam - a[0] - b[0]) % p
    return x, (lam * (a[0] - x) - a[1]) % p


def test_generator_table_is_1_3_5_7_times_g():
    g = p256.G_ODD[0]
    assert g == (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
                 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)
    acc, want = None, []
    for k in range(1, 8):
        acc = _affine_add(acc, g)
        if k & 1:
            want.append(acc)
    assert list(p256.G_ODD) == want
    for x, y in p256.G_ODD:
        p256.check_key(b"\x04" + _be(x) + _be(y))


def test_scalar_edges_through_the_public_api():
    # Signatures made here with the textbook formula and private key d = 1 (so Q = G):
    # u1 and u2 take the values 1 and n - 1 and the Shamir sum hits doubling and infinity.
    n = p256.N
    gx, gy = p256.G_ODD[0]
    pub = b"\x04" + _be(gx) + _be(gy)
    k = 1  # R = G
    r = gx % n
    for e in (1, 2, n - 1, n - r, (1 << 256) - 1):
        s = pow(k, n - 2, n) * (e + r * 1) % n
        if s == 0:  # e = n - r: s would be 0, no signature; verify must refuse s = 0
            assert p256.verify(pub, _be(e % (1 << 256)), _be(r) + bytes(32)) is False
            continue
        assert p256.verify(pub, _be(e), _be(r) + _be(s)) is True, e
        assert p256.verify(pub, _be(e), _be(r) + _be(n - s)) is True, e
        assert p256.verify(pub, _be((e + 1) % (1 << 256)), _be(r) + _be(s)) is False, e
