"""`make test-mcu`: the MicroPython unit tests (tests/mpy/test_*.py) on the bare-metal builds
of `make mcu` (build/mcu/m0: Cortex-M0, build/mcu/rv32: RV32) under QEMU, each module in a
fresh boot, driven through the emulated UART's raw REPL.

The firmware is the one frozen into the build, as a board runs it. The test modules,
tests/mpy/mpyutil.py, the Unix board modules the tests use as their fixture, the guest-side
helpers (testbed/mcu/guest/) and the files the tests read (app/, examples/, tests/data/)
are compiled here with the build's own mpy-cross into a ROMFS image that QEMU loads into
the guest's "flash chip": RAM above what the firmware was linked for, outside the GC heap,
as a board's flash is. The guest mounts it at /rom and runs the .mpy in place (as frozen
code), makes a littlefs2 root filesystem (/tmp) on the chip, and the tests' flash images
(mpyutil.fresh_image) are areas of the same chip (testbed/mcu/guest/unixflash.py). Only a
bootstrap of a few lines goes over the UART, which QEMU feeds at about 6 KB/s. The guest
sets gc.threshold as the boards' boot.py does (a collection every quarter of the heap).

QEMU runs with -icount shift=0: guest time is the instruction count (1 ns each), so a run
is the same on any host, however loaded; an idle wait sleeps until the next timer
interrupt, which QEMU skips to (sleep=off).

Tests that need what a bare-metal board here does not have are skipped, each named in
SKIP_TESTS with its reason, and printed.

Exit status: 0 when every test that ran passed, 1 when any failed (or a boot crashed or
timed out), 2 when the builds or tools are missing or the build is older than firmware/.
"""
import argparse
import ast
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # run as a script (make test-mcu), only testbed/mcu is on the path

from testbed.mcu import qemu  # noqa: E402
from testbed.mcu.qemu import BOARDS, BUILD, MIB, ROMFS_SIZE, build_info  # noqa: E402

HERE = os.path.join(ROOT, "testbed", "mcu")
TESTS = os.path.join(ROOT, "tests", "mpy")

# The chip's layout (testbed/mcu/qemu.py; the flash chip of testbed/mcu/guest/mcuflash.py):
# the tests' files (ROMFS, made here), the root filesystem (littlefs2, made by the guest at
# boot: /tmp and the flash images' files), then the flash images.
ROOTFS_SIZE = 1 * MIB

# Tests a bare-metal board here cannot run, each with the reason printed for it.
NO_SOCKETS = "needs UDP sockets (a local fake SNTP server); the qemu port has no network stack"
UNIX_FLOAT_TIME = ("asserts that the Unix board's clock reads a float; time.time() is an int on"
                   " rp2, esp32 and here (firmware/boards/mcu.py's unix_time knows it)")
SKIP_TESTS = {
    ("test_ntp", "test_query_returns_the_servers_time"): NO_SOCKETS,
    ("test_ntp", "test_query_ignores_a_spoofed_reply_and_takes_the_real_one"): NO_SOCKETS,
    ("test_ntp", "test_query_times_out_when_every_reply_has_a_wrong_originate"): NO_SOCKETS,
    ("test_ntp", "test_query_times_out_when_the_server_is_silent"): NO_SOCKETS,
    ("test_ntp", "test_query_fails_at_once_on_a_kiss_of_death"): NO_SOCKETS,
    ("test_ntp", "test_query_fails_fast_on_a_closed_port"): NO_SOCKETS,
    ("test_ntp", "test_cancelled_query_closes_its_socket"): NO_SOCKETS,
    ("test_ntp", "test_timesync_sets_the_clock_at_boot_and_resyncs_on_a_jittered_interval"):
        NO_SOCKETS,
    ("test_ntp", "test_first_server_failing_falls_through_to_the_next"): NO_SOCKETS,
    ("test_ntp", "test_failures_are_counted_and_retried_with_backoff"): NO_SOCKETS,
    ("test_ntp", "test_a_failing_set_time_is_counted_and_does_not_end_the_task"): NO_SOCKETS,
    ("test_ntp", "test_a_long_interval_is_slept_in_steps_with_a_beat_before_each"): NO_SOCKETS,
    ("test_examples", "test_relay_command_switches_the_pin_and_reports_state"): UNIX_FLOAT_TIME,
}
# Tests whose own data need more heap than the port's default 140 KB (MICROPY_HEAP_SIZE
# 143360) leaves them, skipped on a smaller heap: {(module, test): (heap bytes, reason)}.
# `make mcu HEAP=196608` builds boards on which they run.
NEEDS_HEAP = {
    ("test_backoff", "test_rng_instances_are_independent"): (
        196608, "its data alone, 5,000 boxed floats (80 KB) in a list grown to 8,192 slots"
                " (32 KB, the 16 KB one still held while it is copied), does not fit beside the"
                " firmware in a heap of %s bytes"),
}
# Modules whose tests each get a boot of their own, so that their long ones run side by
# side: test_outbox's two power-cut sweeps take 20 and 30 billion instructions (2-3 minutes
# each under QEMU on a 2-core host).
SPLIT = {"test_outbox"}

# The Unix board modules the tests use as their fixture, put under their names on the guest
# (testbed/mcu/guest/mcurun.py: a frozen package does not find submodules on a filesystem).
ALIASES = [("firmware.boards.unix", "_fb_unix", "firmware/boards/unix.py"),
           ("firmware.boards.unixhw", "_fb_unixhw", "firmware/boards/unixhw.py")]
MARK = "@@MPY "


# ---- the build ---------------------------------------------------------------------------


def frozen_sources():
    """The files testbed/mcu/manifest.py freezes from this checkout (manifest_common.py's
    lists) and the two manifests: what a build of `make mcu` holds of the firmware."""

    def package(name, files=None, base_path="."):
        base = os.path.join(ROOT, base_path, name)
        if files is None:
            for d, dirs, names in os.walk(base):
                dirs.sort()
                found.extend(os.path.join(d, n) for n in sorted(names) if n.endswith(".py"))
        else:
            found.extend(os.path.join(base, f) for f in files)

    def module(name, base_path="."):
        found.append(os.path.join(ROOT, base_path, name))

    found = [os.path.join(HERE, "manifest.py"), os.path.join(ROOT, "manifest_common.py")]
    with open(os.path.join(ROOT, "manifest_common.py")) as f:
        exec(f.read(), {"package": package, "module": module, "include": lambda *a: None})
    return found


def fingerprint():
    h = hashlib.sha256()
    for path in frozen_sources():
        h.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def check(boards, allow_stale):
    """None when these boards can run, else why not."""
    fp = fingerprint()
    for b in boards:
        info = build_info(b)
        if info is None:
            return "build/mcu/%s/firmware.elf is missing: run `make mcu MPY_DIR=...`" % b
        if info.get("fingerprint") != fp and not allow_stale:
            return ("build/mcu/%s froze other firmware sources than the checkout's now: run"
                    " `make mcu MPY_DIR=...` again (or pass --allow-stale)" % b)
        if not shutil.which(BOARDS[b]["qemu"][0]):
            return "%s is not installed (apt-get install -y %s)" % (
                BOARDS[b]["qemu"][0], BOARDS[b]["package"])
    if not os.path.exists(os.path.join(BUILD, "mpy-cross")):
        return "build/mcu/mpy-cross is missing: run `make mcu MPY_DIR=...`"
    return None


# ---- the guest's files: a ROMFS image -----------------------------------------------------


def stage(tmp):
    """The guest's /rom tree in tmp/tree: .mpy compiled by the build's mpy-cross (named by
    their source path, for tracebacks), and the data files the tests read."""
    tree = os.path.join(tmp, "tree")
    mpy_cross = os.path.join(BUILD, "mpy-cross")

    def compile_to(src_rel, dst_rel):
        src = os.path.join(ROOT, src_rel)  # (a --tests-dir outside the checkout: ../..)
        dst = os.path.join(tree, dst_rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        subprocess.run([mpy_cross, "-o", dst, "-s", src_rel, src], cwd=ROOT, check=True)

    def copy_to(src_rel, dst_rel):
        dst = os.path.join(tree, dst_rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(ROOT, src_rel), dst)

    def py_files(top):
        for d, dirs, names in os.walk(os.path.join(ROOT, top)):
            dirs.sort()
            for n in sorted(names):
                if n.endswith(".py"):
                    yield os.path.relpath(os.path.join(d, n), ROOT)

    for name in sorted(os.listdir(os.path.join(HERE, "guest"))):
        if name.endswith(".py"):
            compile_to("testbed/mcu/guest/" + name, "m/" + name[:-3] + ".mpy")
    # The loader's flash module, whose block device the guest's unixflash.py builds on; not
    # under its own name, which the guest's takes.
    compile_to("unixflash.py", "m/_unixflash.mpy")
    for _full, mod, src in ALIASES:
        compile_to(src, "m/%s.mpy" % mod)
    for name in sorted(os.listdir(TESTS)):
        if name.endswith(".py") and (name.startswith("test_") or name == "mpyutil.py"):
            compile_to(os.path.relpath(os.path.join(TESTS, name), ROOT),
                       "r/tests/mpy/" + name[:-3] + ".mpy")
    # test_examples imports the checkout's app/ and copies the examples' sources into a new
    # app/ under /tmp (the guest compiles those when it imports them); test_p256 reads its
    # vectors from tests/data/.
    for rel in py_files("app"):
        compile_to(rel, "r/" + rel[:-3] + ".mpy")
    for rel in py_files("examples"):
        copy_to(rel, "r/" + rel)
    for name in sorted(os.listdir(os.path.join(ROOT, "tests", "data"))):
        if os.path.isfile(os.path.join(ROOT, "tests", "data", name)):
            copy_to("tests/data/" + name, "r/tests/data/" + name)
    return tree


def make_image(tmp):
    return qemu.make_image(tmp, stage(tmp), "test-mcu")


# ---- a boot of one board -------------------------------------------------------------------

BOOTSTRAP = """\
import sys,uctypes,vfs
vfs.mount(vfs.VfsRom(uctypes.bytearray_at(%d,%d)),'/rom')
sys.path[:]=['/rom/m','.frozen','/rom/r','/rom/r/tests/mpy']
import mcurun
mcurun.setup(%d,%d,%d,%d)
"""


def bootstrap(board):
    """The guest's first lines, sent over the raw REPL: the tests' files at /rom, a new root
    filesystem at /, the rest of the chip for flash images."""
    addr, size = BOARDS[board]["chip"]
    root = addr + ROMFS_SIZE
    chip = root + ROOTFS_SIZE
    return BOOTSTRAP % (addr, ROMFS_SIZE, root, ROOTFS_SIZE, chip, addr + size - chip)


_LIVE = set()  # the QEMU processes running, for an interrupted run to end them
_LIVE_LOCK = threading.Lock()


class Guest(qemu.Guest):
    """qemu.Guest, in _LIVE while it runs."""

    def __init__(self, board, image):
        super().__init__(board, image)
        with _LIVE_LOCK:
            _LIVE.add(self.proc)

    def close(self):
        super().close()
        with _LIVE_LOCK:
            _LIVE.discard(self.proc)


def run_code(board, image, code, timeout):
    """Boot, run code in the raw REPL; {"out": its output, "err": its exception or why the
    boot ended early, or None, "seconds": wall time}."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    g = Guest(board, image)
    out, err = "", None
    try:
        text = g.run(code, deadline)
        out, _, err = text[:-2].partition("\x04")
        err = err.rstrip("\x04").strip() or None
    except TimeoutError as e:
        out, err = str(e), "timed out after %d s" % timeout
    except EOFError as e:
        out, err = str(e), "QEMU exited (exit status %s)" % g.proc.wait()
    finally:
        g.close()
    return {"out": out, "err": err, "seconds": time.monotonic() - t0}


# ---- the tests -------------------------------------------------------------------------------


def modules(pattern=""):
    names = sorted(n[:-3] for n in os.listdir(TESTS)
                   if n.startswith("test_") and n.endswith(".py"))
    return [n for n in names if pattern in n]


def source(module):
    with open(os.path.join(TESTS, module + ".py")) as f:
        return f.read()


def test_names(module):
    """The module's test functions, read from its source as tests/conftest.py does."""
    return [n.name for n in ast.parse(source(module)).body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name.startswith("test_")]


def aliases_for(module):
    src = source(module)
    return [(full, mod) for full, mod, _ in ALIASES if re.search(re.escape(full) + r"\b", src)]


def uses_getenv(module):
    """os.getenv is the Unix port's only: the guest gives such a module an os with a getenv
    that finds nothing set (testbed/mcu/guest/mcurun.py)."""
    return "os.getenv(" in source(module)


def skips_for(board, module, names):
    """{test: why} of the tests of `names` that this board does not run."""
    heap = (build_info(board) or {}).get("heap", 0)
    out = {}
    for n in names:
        if (module, n) in SKIP_TESTS:
            out[n] = SKIP_TESTS[(module, n)]
        elif (module, n) in NEEDS_HEAP and heap < NEEDS_HEAP[(module, n)][0]:
            need, why = NEEDS_HEAP[(module, n)]
            out[n] = (why % "{:,}".format(heap)) + "; it runs with a heap of %s (make mcu" \
                " HEAP=%d)" % ("{:,}".format(need), need)
    return out


def run_job(board, image, module, only, timeout):
    """One boot running `module` (only the tests named in `only`, if given)."""
    names = only or test_names(module)
    skips = skips_for(board, module, names)
    code = bootstrap(board) + "mcurun.main(%r,%r,%r,%r,%r)\n" % (
        module, aliases_for(module), skips, uses_getenv(module), only)
    r = run_code(board, image, code, timeout)
    r.update(board=board, module=module, names=names, results={}, free=None)
    for line in r["out"].splitlines():
        if line.startswith(MARK):
            doc = json.loads(line[len(MARK):])
            if doc["name"]:
                r["results"][doc["name"]] = doc
            else:
                r["free"] = doc["free"]
        elif line.startswith("@@MCU-IMPORT "):
            r["err"] = "import failed:\n" + json.loads(line[len("@@MCU-IMPORT "):])["tb"]
    return r


class Tally:
    """A board's counts, failures and times, merged from its boots."""

    def __init__(self):
        self.passed = self.failed = self.skipped = 0
        self.failures = []  # (module, test(s), text)
        self.start = self.end = None
        self.boot_seconds = 0.0


def report_module(board, module, jobs, tally, verbose):
    p = f = s = 0
    frees, loaded = [], []
    guest_ms = 0
    for r in jobs:
        tally.boot_seconds += r["seconds"]
        if r["free"] is not None:
            loaded.append(r["free"])
        missing = []
        for name in r["names"]:
            doc = r["results"].get(name)
            if doc is None:
                missing.append(name)
            elif "skip" in doc:
                s += 1
                print("%-5s %-18s skipped %s: %s" % (board, module, name, doc["skip"]))
            else:
                frees.append(doc["free"])
                guest_ms += doc["ms"]
                if doc["ok"]:
                    p += 1
                else:
                    f += 1
                    tally.failures.append((module, name, doc["tb"]))
        if missing:
            f += len(missing)
            tally.failures.append((module, ", ".join(missing), "no result: %s\nlast output:\n%s"
                                   % (r["err"] or "the boot ended early", r["out"][-2000:])))
        elif r["err"]:
            f += 1
            tally.failures.append((module, "(after the tests)", r["err"]))
        if verbose:
            print(r["out"])
    tally.passed += p
    tally.failed += f
    tally.skipped += s
    print("%-5s %-18s %3d passed %3d failed %3d skipped %6.1f s  guest %7.3f s  heap free:"
          " %s loaded, %s after a test (min)" % (
              board, module, p, f, s, sum(r["seconds"] for r in jobs), guest_ms / 1000,
              "{:,}".format(min(loaded)) if loaded else "?",
              "{:,}".format(min(frees)) if frees else "?"), flush=True)


def kill_all():
    with _LIVE_LOCK:
        for p in _LIVE:
            p.kill()


def run_suite(boards, image, mods, workers, timeout, verbose):
    """Every module on every board, `workers` boots at a time, the split modules' boots
    first (the longest); each module reported when all its boots are done."""
    jobs = []
    for m in mods:
        for b in boards:
            if m in SPLIT:
                jobs += [(b, m, [t]) for t in test_names(m)]
            else:
                jobs.append((b, m, None))
    jobs.sort(key=lambda j: j[1] not in SPLIT)
    pending = {}  # (board, module) -> boots still running
    done = {}
    for b, m, _ in jobs:
        pending[(b, m)] = pending.get((b, m), 0) + 1
    tallies = {b: Tally() for b in boards}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {}
        for b, m, only in jobs:
            futures[pool.submit(run_job, b, image, m, only, timeout)] = (b, m)
        try:
            for fut in concurrent.futures.as_completed(futures):
                b, m = futures[fut]
                r = fut.result()
                t = tallies[b]
                end = time.monotonic()
                t.start = min(t.start or end - r["seconds"], end - r["seconds"])
                t.end = end
                done.setdefault((b, m), []).append(r)
                pending[(b, m)] -= 1
                if not pending[(b, m)]:
                    report_module(b, m, done.pop((b, m)), t, verbose)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            kill_all()
            raise
    return tallies


def exec_code(boards, image, code, timeout):
    """--exec: CODE after the bootstrap on each board, its output printed."""
    if code.startswith("@"):
        with open(code[1:]) as f:
            code = f.read()
    status = 0
    for b in boards:
        r = run_code(b, image, bootstrap(b) + code, timeout)
        print("== %s (%.1f s)\n%s" % (b, r["seconds"], r["out"].rstrip()))
        if r["err"]:
            print(r["err"])
            status = 1
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--board", action="append", choices=sorted(BOARDS),
                    help="board to test (repeatable; default: every one built)")
    ap.add_argument("-k", dest="pattern", default="",
                    help="only the test modules whose name contains this")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="QEMU boots at a time (default: the CPU count)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per boot")
    ap.add_argument("--allow-stale", action="store_true",
                    help="run even if the frozen sources changed since `make mcu`")
    ap.add_argument("--fingerprint", action="store_true",
                    help="print the fingerprint of the frozen sources and exit (build.sh)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each boot's output")
    ap.add_argument("--tests-dir", metavar="DIR",
                    help="the test modules (and mpyutil.py) of DIR instead of tests/mpy's")
    ap.add_argument("--exec", dest="code", metavar="CODE",
                    help="instead of the tests, run CODE (or @FILE's) on each board after the"
                         " tests' bootstrap (/rom, /tmp, the flash chip) and print its output")
    a = ap.parse_args()
    if a.tests_dir:
        global TESTS
        TESTS = os.path.abspath(a.tests_dir)
    if a.fingerprint:
        print(fingerprint())
        return 0
    boards = a.board or [b for b in sorted(BOARDS) if build_info(b)]
    if not boards:
        print("test-mcu: nothing in build/mcu/: run `make mcu MPY_DIR=/path/to/micropython`"
              " first (testbed/mcu/build.sh)", file=sys.stderr)
        return 2
    why = check(boards, a.allow_stale or a.code is not None)
    if why:
        print("test-mcu: " + why, file=sys.stderr)
        return 2
    mods = modules(a.pattern)
    if not mods and a.code is None:
        print("test-mcu: no test module matches -k %s" % a.pattern, file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="test-mcu-") as tmp:
            image = make_image(tmp)
            if a.code is not None:
                return exec_code(boards, image, a.code, a.timeout)
            for b in boards:
                info = build_info(b)
                print("== %s: build/mcu/%s/firmware.elf, MicroPython %s, heap %s bytes" % (
                    b, b, info.get("commit", "?"), "{:,}".format(info.get("heap", 0))))
            tallies = run_suite(boards, image, mods, a.jobs, a.timeout, a.verbose)
    except KeyboardInterrupt:
        kill_all()
        raise
    status = 0
    for b in boards:
        for m, names, text in tallies[b].failures:
            print("\n---- %s %s: %s FAILED\n%s" % (b, m, names, text.rstrip()))
    print()
    for b in boards:
        t = tallies[b]
        print("test-mcu %-5s %d passed, %d failed, %d skipped; %.0f s of QEMU boots, %.0f s"
              " from its first boot to its last" % (b, t.passed, t.failed, t.skipped,
                                                   t.boot_seconds, (t.end or 0) - (t.start or 0)))
        if t.failed:
            status = 1
    print("test-mcu: %d boards in %.0f s (%d boots at a time)" % (
        len(boards), time.monotonic() - t0, a.jobs))
    return status


if __name__ == "__main__":
    sys.exit(main())
