# OTA manifest signature check, run inside the Unix port by bench/run.py, on a NIST CAVP
# SigVer [P-256,SHA-256] vector (lib/p256). Prints one JSON line of figures on stdout.
#
#   micropython bench/ota_verify.py [REPS]
#       {"ota_verify_ms": X}: median time of one ECDSA P-256 verify over REPS runs (default
#       101), with plenty of heap.
#
#   micropython [-X heapsize=H] bench/ota_verify.py heap [REPS [TRIES]]
#       {"ota_verify_heap_min_bytes": N, "ota_verify_ms_low_heap": X}
#       N: the smallest free heap in which a verify succeeds, as gc.mem_free() reads it after
#       a gc.collect() just before the verify. In this one process a ballast (a list of
#       bytearrays) leaves F bytes free, then a verify runs (a MemoryError or a False is a
#       failure). F is bisected in STEP bytes, a heap working when a verify succeeds in each
#       of TRIES (default 128) layouts of the ballast (ballast()), then every F up to EDGE
#       above the answer must work too. The edge is ragged: with the same free heap, which
#       fragments the verify gets decides whether its numbers fit, and one small object more
#       anywhere in the heap (even a longer argv) moves them. Around the edge a few layouts
#       in a hundred fail, so the more TRIES, the higher and steadier the answer.
#       X: median time of REPS verifies (default 7) left with N free. The same with the whole
#       heap free, and at a few heaps between, go to stderr: below ~16 KB free the collector
#       runs ever more often, and each collection scans the whole live heap, ballast
#       included, so the cost grows with the heap's size (H) too.
#       p256 is imported (its bytecode live) before any of it: a device that checks a floor
#       before the import needs the import's heap on top.
import sys

_root = sys.path[0].rsplit("/", 1)[0]
sys.path.append(_root + "/lib")

import gc
import hashlib
import json
import time

import p256
from p256_vector import MSG, PUB, SIG

DIGEST = hashlib.sha256(MSG).digest()

STEP = 256  # bisection granularity of the free heap
EDGE = 8192  # every free heap up to this much above the answer must work too
START = 65536  # first guess that works (doubled while it does not)
SLOTS = 2048  # ballast pieces at most
PIECE = 65536  # the largest ballast piece
MARGIN = 64  # two GC blocks on 64 bits (four on 32): a piece's object and its byte


def timing(reps):
    if not p256.verify(PUB, DIGEST, SIG):
        raise SystemExit("the vector did not verify")
    ts = []
    for _ in range(reps):
        t0 = time.ticks_us()
        p256.verify(PUB, DIGEST, SIG)
        ts.append(time.ticks_diff(time.ticks_us(), t0))
    ts.sort()
    print(json.dumps({"ota_verify_ms": round(ts[len(ts) // 2] / 1000, 3)}))


def _rng(x):
    """The next of a small linear congruential sequence (ZX81's): products stay small ints
    on a 32-bit build, so it allocates nothing."""
    return (x * 75 + 74) % 65537


def _runs(bal, free, i, piece):
    """Fills free runs first-fit with pieces of up to `piece` bytes from bal[i] on, leaving
    gc.mem_free() less than 2 * MARGIN above `free`; returns the next free index of `bal`.
    A failed allocation leaves garbage (its object, the exception's traceback, held by this
    frame until it returns)."""
    n = piece
    gc.disable()
    try:
        while i < len(bal):
            n = min(n, gc.mem_free() - free - MARGIN)
            if n < MARGIN:
                break
            try:
                bal[i] = bytearray(n)
                i += 1
            except MemoryError:
                n //= 2  # no run that long is left
    finally:
        gc.enable()
    return i


def ballast(free, layout):
    """Live bytearrays that leave gc.mem_free() (after a collection) at `free` or less than
    MARGIN above it, never below. Layout 0: the free runs filled first-fit with pieces of up
    to PIECE bytes (_runs), so the big runs go first and what stays free is mostly the
    fragments between live objects. Any other layout is a different shape of the same free
    heap: first up to 8 pieces of random sizes up to 1 KiB (first-fit: into the fragments),
    then pieces of at most 1 KiB to 64 KiB (small ones fill the fragments too, and leave
    the free heap in one run). Last, after a collection of what failed allocations left,
    pieces of two GC blocks (the object and one for its byte), which fit anywhere. The
    collector is off while pieces are made."""
    bal = [None] * SLOTS
    gc.collect()
    i = 0
    piece = PIECE
    if layout:
        x = _rng(layout)
        piece = 1024 << (x % 7)
        for _ in range(1 + x % 8):
            x = _rng(x)
            n = 16 + x % 1008
            if gc.mem_free() - free - MARGIN < n + MARGIN:
                break
            bal[i] = bytearray(n)
            i += 1
    i = _runs(bal, free, i, piece)
    for _ in range(4):
        gc.collect()
        if i >= SLOTS or gc.mem_free() - free < MARGIN:
            break
        gc.disable()
        while i < SLOTS and gc.mem_free() - free >= MARGIN:
            bal[i] = bytearray(1)
            i += 1
        gc.enable()
    return bal


def attempt(free, layout=0):
    """One verify left with `free` bytes (None: the whole heap) in the ballast's `layout`:
    (succeeded, gc.mem_free() just before it, microseconds)."""
    gc.collect()
    bal = ballast(free, layout) if free is not None else None
    gc.collect()
    have = gc.mem_free()
    ok = False
    t0 = time.ticks_us()
    try:
        ok = p256.verify(PUB, DIGEST, SIG)
    except MemoryError:
        pass
    us = time.ticks_diff(time.ticks_us(), t0)
    bal = None
    gc.collect()
    return ok, have, us


def works(free, tries):
    """Whether a verify left with `free` bytes succeeds in each of `tries` layouts of the
    ballast. Which fragments the verify gets decides as much as how many bytes: with the
    same free heap one layout works where another does not."""
    for layout in range(tries):
        if not attempt(free, layout)[0]:
            return False
    return True


def median_ms(free, reps):
    """(median ms of `reps` verifies left with `free` bytes that succeeded, in layouts 0, 1,
    ...; gc.mem_free() before the first; the failures on the way)."""
    ts, have, failed = [], None, 0
    layout = 0
    while len(ts) < reps:
        ok, got, us = attempt(free, layout)
        layout += 1
        have = got if have is None else have
        if ok:
            ts.append(us)
        else:
            failed += 1
            if failed > reps:
                raise SystemExit("more than %d of the verifies failed with %s bytes free"
                                 % (reps, free))
    ts.sort()
    return round(ts[len(ts) // 2] / 1000, 3), have, failed


def say(msg):
    print("ota_verify: " + msg, file=sys.stderr)


def heap(reps, tries):
    ok, whole, _ = attempt(None)
    if not ok:
        raise SystemExit("the vector did not verify (%d bytes free)" % whole)
    hi = START
    while not works(hi, tries):
        if hi >= whole:
            raise SystemExit("no verify even with the whole heap (%d bytes free)" % whole)
        hi *= 2
    lo = 0  # fails: nothing free
    while hi - lo > STEP:
        mid = (lo + hi) // 2 // STEP * STEP
        if works(mid, tries):
            hi = mid
        else:
            lo = mid
    f = hi
    while f <= hi + EDGE:
        if not works(f, tries):
            say("a verify fails with %d bytes free, above the bisection's %d: from %d on"
                % (f, hi, f + STEP))
            hi = f + STEP
        f += STEP
    low_ms, have, failed = median_ms(hi, reps)
    whole_ms, whole, _ = median_ms(None, reps)
    say("one verify needs %d bytes free (ballast target %d, %d B steps, %d verifies at each, "
        "every heap up to %d B above it too); %.1f ms there (%d of %d failed on the way), "
        "%.1f ms with the whole heap, %d B, free: %.2f times"
        % (have, hi, STEP, tries, EDGE, low_ms, failed, reps + failed, whole_ms, whole,
           low_ms / whole_ms))
    for kb in (12, 16, 24, 32, 48, 64):
        if hi < kb * 1024 < whole:
            ms, got, _ = median_ms(kb * 1024, reps)
            say("  %6d B free: %7.1f ms (%.2f times)" % (got, ms, ms / whole_ms))
    print(json.dumps({"ota_verify_heap_min_bytes": have, "ota_verify_ms_low_heap": low_ms}))


if len(sys.argv) > 1 and sys.argv[1] == "heap":
    heap(int(sys.argv[2]) if len(sys.argv) > 2 else 7,
         int(sys.argv[3]) if len(sys.argv) > 3 else 128)
else:
    timing(int(sys.argv[1]) if len(sys.argv) > 1 else 101)
