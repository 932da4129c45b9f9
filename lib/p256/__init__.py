# ECDSA P-256 (secp256r1) signature verification, used to check signed OTA update manifests.
# P-256 because SHA-256 is in every MicroPython port's hashlib (often hardware-accelerated);
# Ed25519 would need SHA-512, which no port exposes. Verify only: no secrets on the device,
# so no constant-time concerns. Runs under CPython too (host cross-checks).
P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B  # y^2 = x^3 - 3x + b
# 1, 3, 5 and 7 times the generator G, affine (x, y).
G_ODD = (
    (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
     0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5),
    (0x5ECBE4D1A6330A44C8F7EF951D4BF165E6C6B721EFADA985FB41661BC6E7FD6C,
     0x8734640C4998FF7E374B06CE1A64A2ECD82AB036384FB83D9A79B127A27D5032),
    (0x51590B7A515140D2D784C85608668FDFEF8C82FD1F5BE52421554A0DC3D033ED,
     0xE0C17DA8904A727D8AE1BF36BF8A79260D012F00D4D80888D1D0BB44FDA16DA4),
    (0x8E533B6FA0BF7B4625BB30667C01FB607EF9F8B8A80FEF5B300628703187B2A3,
     0x73EB1DBDE03318366D069F83A6F5900053C73633CB041B21C55E1A86C1F400B4),
)


def _key_error(pub):
    """Why pub is not an uncompressed P-256 point, or None when it is one."""
    if len(pub) != 65:
        return "P-256 public key must be 65 bytes (0x04 || X || Y), got %d" % len(pub)
    if pub[0] != 4:
        return "P-256 public key must be uncompressed (first byte 0x04), got 0x%02x" % pub[0]
    x = int.from_bytes(pub[1:33], "big")
    y = int.from_bytes(pub[33:], "big")
    if x >= P or y >= P:
        return "P-256 public key coordinate out of range (>= p)"
    if (y * y - x * x * x + 3 * x - B) % P:
        return "P-256 public key is not a point on the curve"
    return None


def check_key(pub):
    """Raise ValueError unless pub is a valid uncompressed P-256 public key (65 bytes)."""
    err = _key_error(pub)
    if err:
        raise ValueError(err)


def _dbl(X, Y, Z):
    # Jacobian doubling for a = -3 (dbl-2001-b); infinity (Z = 0) stays infinity.
    p = P
    d = Z * Z % p
    g = Y * Y % p
    b = X * g % p
    a = 3 * (X - d) * (X + d) % p
    X3 = (a * a - 8 * b) % p
    return X3, (a * (4 * b - X3) - 8 * g * g) % p, 2 * Y * Z % p


def _add(X1, Y1, Z1, X2, Y2, Z2):
    # Jacobian + Jacobian; Z2 = 1 is the affine case (Z2 == 1 skips its multiplications).
    p = P
    if not Z1:
        return X2, Y2, Z2
    zz = Z1 * Z1 % p
    U2 = X2 * zz % p
    S2 = Y2 * Z1 * zz % p
    if Z2 == 1:
        U1, S1, Z3 = X1, Y1, Z1
    else:
        zz2 = Z2 * Z2 % p
        U1 = X1 * zz2 % p
        S1 = Y1 * Z2 * zz2 % p
        Z3 = Z1 * Z2  # reduced below, with H
    H = U2 - U1
    R = S2 - S1
    if not H:
        if R:
            return 1, 1, 0  # P + (-P)
        return _dbl(X1, Y1, Z1)
    HH = H * H % p
    HHH = H * HH % p
    V = U1 * HH % p
    X3 = (R * R - HHH - 2 * V) % p
    return X3, (R * (V - X3) - S1 * HHH) % p, Z3 * H % p


def _wnaf(k):
    """Width-4 NAF of 0 <= k < 2^256: 257 digits, least significant first, each stored as
    digit & 15 (0; 1, 3, 5, 7; 15, 13, 11, 9 for -1, -3, -5, -7)."""
    ds = bytearray(257)
    i = 0
    while k:
        if k & 1:
            d = k & 15
            k -= d if d < 8 else d - 16
            ds[i] = d
        k >>= 1
        i += 1
    return ds


def _x_matches(u1, u2, qx, qy, r):
    """Whether u1*G + u2*Q is a finite point whose x is r mod n (Straus-Shamir, wNAF)."""
    p = P
    q2 = _dbl(qx, qy, 1)
    tq = [(qx, qy, 1)]
    for _ in range(3):
        tq.append(_add(*(tq[-1] + q2)))
    a = _wnaf(u1)
    b = _wnaf(u2)
    X, Y, Z = 1, 1, 0  # the point at infinity
    for i in range(256, -1, -1):
        if Z:
            X, Y, Z = _dbl(X, Y, Z)
        d = a[i]
        if d:
            if d < 8:
                x, y = G_ODD[d >> 1]
            else:
                x, y = G_ODD[(16 - d) >> 1]
                y = p - y
            X, Y, Z = _add(X, Y, Z, x, y, 1)
        d = b[i]
        if d:
            if d < 8:
                x, y, z = tq[d >> 1]
            else:
                x, y, z = tq[(16 - d) >> 1]
                y = p - y
            X, Y, Z = _add(X, Y, Z, x, y, z)
    if not Z:
        return False
    # x = X / Z^2 (mod p) and x mod n == r, so x is r or r + n: compare without inverting Z.
    zz = Z * Z % p
    if (r * zz - X) % p == 0:
        return True
    return r + N < p and ((r + N) * zz - X) % p == 0


def verify(pub, digest, sig):
    """True when sig (64 bytes r || s, big-endian) is a valid ECDSA P-256 signature of the
    32-byte SHA-256 digest under pub (65 bytes, 0x04 || X || Y); False for anything else."""
    if len(digest) != 32 or len(sig) != 64 or _key_error(pub):
        return False
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    if not (0 < r < N and 0 < s < N):
        return False
    w = pow(s, N - 2, N)
    e = int.from_bytes(digest, "big")
    return _x_matches(e * w % N, r * w % N,
                      int.from_bytes(pub[1:33], "big"), int.from_bytes(pub[33:], "big"), r)
