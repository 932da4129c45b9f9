# What an update must pass before anything of it runs (README "Updates"): the manifest's
# signature by a trusted key, and the manifest itself (version against the running one and
# the security floor, the file list, the bytecode ABI, the formats a rollback must read).
# Pure checks: no I/O but the collect before a verify. Apart from firmware/ota.py, which
# downloads and switches, so that neither module is large to load.
import gc
import hashlib
import json
import sys
from binascii import hexlify, unhexlify

import otaboot
from firmware import forget
from firmware.version import BUNDLE_VERSION, CACHE_FORMAT, QUEUE_FORMAT

# Free heap, after a collect, for a P-256 verify to start: bench ota_verify_heap_min_bytes
# (9.4 KB on the 64-bit wheel; less fails) plus p256's bytecode (~4.5 KB, imported after
# this check) and a margin for a 32-bit heap; below 16 KB its cost also grows. A download
# that finds less waits and tries again rather than holding the loop for seconds.
VERIFY_HEAP_MIN = 16384
# .mpy architectures by the index in sys.implementation._mpy >> 10 (py/persistentcode.h).
_ARCHES = (None, "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp",
           "armv7emdp", "xtensa", "xtensawin", "rv32imc", "rv64imc")


class Refused(ValueError):
    """What no retry can cure (the signature, the manifest's own checks, the ABI, does not
    fit): reported, and not tried again. `release`: the signed release itself is at fault
    (noted by version), not only the request (noted by the manifest's sha256)."""

    def __init__(self, why, release=True):
        super().__init__(why)
        self.release = release


def hexstr(b):
    return hexlify(b).decode()


def abi():
    """(mpy version, sub-version, architecture or None) this MicroPython loads."""
    v = getattr(sys.implementation, "_mpy", 0)
    a = v >> 10
    return v & 0xFF, (v >> 8) & 3, _ARCHES[a] if a < len(_ARCHES) else "?"


def running_slot():
    """The slot the running application was imported from (None: the factory image), read
    from the modules themselves, not from the record."""
    import firmware

    f = getattr(firmware, "__file__", "") or ""
    for s in otaboot.SLOTS:
        if "/ota/%s/firmware/" % s in f:
            return s
    return None


def check_manifest(m, req, running=BUNDLE_VERSION, floor=1):
    """The manifest is one this version may switch to, or Refused saying why."""
    if not isinstance(m, dict) or m.get("format") != 1 or not isinstance(m.get("files"), list):
        raise Refused("not a bundle manifest of format 1")
    ver = m.get("version")
    if ver != req["version"]:
        # The request names another release than the one signed: the request is wrong.
        raise Refused("the manifest is version %r, the request %d" % (ver, req["version"]),
                      release=False)
    if ver == running or ver < running and not req.get("downgrade"):
        raise Refused("version %d is not newer than the running %d" % (ver, running))
    if ver < floor:
        raise Refused("version %d is below this device's security floor %d" % (ver, floor))
    f = m.get("floor", 1)
    if type(f) is not int or not 1 <= f <= ver:
        raise Refused("the manifest's floor %r is not a version from 1 to its own" % (f,))
    keys = m.get("keys")
    if keys is not None and (not isinstance(keys, list) or not 1 <= len(keys) <= 2
                             or [k for k in keys if not otaboot.key_ok(k)]):
        raise Refused("the manifest's keys are not one or two P-256 public keys")
    major, sub, arch = abi()
    if m.get("mpy") != [major, sub]:
        raise Refused("bytecode mpy %r, this MicroPython loads [%d, %d]" % (m.get("mpy"), major, sub))
    if m.get("arch") not in (None, arch):
        raise Refused("native code for %s, this board is %s" % (m.get("arch"), arch))
    needs = m.get("needs") or {}
    for what, have in (("queue", QUEUE_FORMAT), ("cache", CACHE_FORMAT)):
        if needs.get(what, 1) > have:
            raise Refused("needs %s format %d, this version keeps %d: it could not roll back"
                          % (what, needs[what], have))
    total = 0
    last = ""
    for e in m["files"]:
        why = otaboot.bad_entry(e)
        if why is None and e[0] <= last:
            why = "%s: the files are not sorted by path, or one repeats" % e[0]
        if why:
            raise Refused("a bad file entry in the manifest: " + why)
        last = e[0]
        total += e[1]
    if total != m.get("total"):
        raise Refused("the manifest's total is not the sum of its files")


def check_signature(digest, sigtext, keys):
    """The manifest whose SHA-256 is `digest` is signed by one of the trusted keys (hex
    points), or Refused."""
    try:
        sig = json.loads(sigtext)
        kid, raw = sig["key"], unhexlify(sig["sig"])
    except (ValueError, KeyError, TypeError):
        raise Refused("manifest.sig is not a signature document", release=False)
    # A verify allocates about 1 MB of short-lived objects and holds the loop for up to
    # 1.5 s on a board; in a fragmented or small heap it costs several times that.
    gc.collect()
    free = gc.mem_free()
    if free < VERIFY_HEAP_MIN:
        raise MemoryError("%d bytes of heap free, a verify needs %d: later" % (free, VERIFY_HEAP_MIN))
    from p256 import verify  # only a device that checks an update pays for it

    forget("p256")  # 3 KB of bytecode, needed again only for the next update

    for k in keys:
        pub = unhexlify(k)
        if hexstr(hashlib.sha256(pub).digest()[:8]) == kid:
            if verify(pub, digest, raw):
                return kid
            raise Refused("the signature by key %s does not verify" % kid, release=False)
    raise Refused("signed by key %s, which this device does not trust" % kid, release=False)
