"""Deterministic cost figures as instruction counts (issue 27), host side (CPython), run by
bench/run.py (part mcu) when `make mcu` has built MicroPython's qemu port with the firmware
frozen in (build/mcu/m0/firmware.elf: Cortex-M0, ARMv6-M as the RP2040; build/mcu/rv32:
rv32imac as the ESP32-C3; testbed/mcu/build.sh).

Each scenario (bench/mcu/*.py, compiled with the build's mpy-cross) runs in a fresh QEMU
boot under `-icount shift=0`, where the guest clock advances 1 ns per instruction:
time.ticks_us() spans in the guest are instructions / 1000, the same on any host however
loaded (repeatable to within 1%: when the host's UART input lands shifts the timers'
phase). The guest's files are a ROMFS image loaded into RAM that QEMU gives the machine
beyond what the firmware is linked for (outside the GC heap, imported in place as frozen
code runs); only a short bootstrap goes over the UART. The device's flash (littlefs on a
RAM block device, made as the board's port makes it) and the fake socket's buffers are
other areas of that RAM. asyncio runs on a virtual clock (bench/mcu/rig.py Warp): a sleep
costs what waking up costs, not the instructions of a polling wait. Each figure is per
operation after a warm-up and a collect, with the collector off while it is measured
(its garbage and one collect's cost are given apart; operations that allocate more than
the heap holds (a signature check, the drain) are measured with it on).

The rig's own instructions are in the figures and listed apart (mcu_B_rig_share, the peers'
socket_*): the fake socket is Python (a board's is C), so is the RAM flash driver (a board's
rp2.Flash or esp32.Partition is C). Each share is its calls replayed alone, less the same
calls on methods that do nothing.

Figures (per board B in m0, rv32), instructions:
  mcu_B_instr_per_telemetry   one telemetry message as the firmware sends it: the reading,
                              firmware/telemetry.py's JSON payload, the outbox put, the drain
                              task's PUBLISH written to the socket, the PUBACK read and
                              processed (the outbox ack); a whole Device on a fake board;
                              _with_gc: plus its garbage's share of a collect
  mcu_B_instr_per_verify      one OTA signature check as firmware/otacheck.py makes it
                              (check_signature: document, collect, import p256, key id, ECDSA
                              P-256 verify), heap nearly empty; _low_heap: with ballast
                              leaving VERIFY_HEAP_MIN + 1 KB free; _p256_only: p256.verify
                              (_low_heap: 8 KiB free)
  mcu_B_instr_drain_1000      after an outage with 1,000 readings queued (spilled to flash),
                              from the new TCP connection to the last PUBACK processed;
                              mcu_B_drain_flash_calls: the block device's calls meanwhile and
                              the files the outbox left open (closed by the rig: rig.SafeFs)
  mcu_B_instr_config_apply    Twin.offer of a ~1 KB desired layer (parse, validate, merge);
                              _full: the layer delivered by the broker (QoS 1) through the
                              device until its PUBACK is written and config/reported acked
                              (apply, cache on flash, report)
  mcu_B_instr_boot            from the start of main.py's work (the 12 KB reserve, the
                              imports, Device, run_devices) to the first telemetry PUBLISH
                              on the socket (_first_publish: any PUBLISH); the loader's slot
                              choice and the board choice are left out (see device.py)
  mcu_B_ms                    each of those as estimated ms on the target: M0 as an RP2040
                              at 133 MHz, RV32 as an ESP32-C3 at 160 MHz, at the CPI below
  mcu_B_parts                 where the instructions go: an asyncio yield, a PUBLISH header,
                              the telemetry JSON, the outbox per message (RAM, 8 and 1 KiB
                              ring; flash), the config layer's steps, a slice store
  mcu_B_alloc_bytes, mcu_B_collect   garbage per operation; one collect, the device running
  mcu_B_peers                 instructions per QoS 0 and per (awaited) QoS 1 publish of
                              ours, micropython-lib's umqtt.simple and peterhinch's mqtt_as on
                              the same fake socket, with the socket's own share, the garbage,
                              the writes per message and an idle connected client's work per
                              second (ours: also QoS 1 pipelined through the window)
  mcu_B_peers_ratio           ours / umqtt.simple per QoS 0 (target <= 1) and ours / mqtt_as
                              per QoS 1 (target <= 0.5); _net: without the fake socket's share

The peers are never part of this repository: their sources are read at run time from the
fetched mirrors (MIRROR_DIR, default /work/.mirror: micropython+micropython-lib and
peterhinch+micropython-mqtt, bare git repositories), compiled with the build's mpy-cross
and skipped, saying so, when a mirror is absent.

    .venv/bin/python bench/mcu_bench.py [--board m0] [--only device,pure,peers]

Progress on stderr; the last line on stdout is the JSON of figures ({"mcu_skipped": why}
when there is no build). QUICK=1: fewer repetitions.
"""
import argparse
import ast
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testbed.mcu import qemu  # noqa: E402
from testbed.mcu.qemu import BOARDS, BUILD, ROMFS_SIZE, build_info  # noqa: E402

HERE = os.path.join(ROOT, "bench", "mcu")
MARK = "@@MCU "
# The guest's modules, as paths under bench/ (the verify's test vector is shared with the
# Unix port's ota_verify.py).
GUEST_FILES = ("mcu/rig", "mcu/pure", "mcu/device", "mcu/peers", "p256_vector")
# Target clocks and the cycles per instruction assumed, from the instruction mix that
# bench/mcu_mix.py traces (the device scenario, shortened; 161M and 118M instructions):
#   m0:   57% ALU, 16% loads, 3% stores, 2% LDM/STM/PUSH/POP (3.7 registers each), 15%
#         conditional branches (56% taken), 5% other branches, 1% calls: 1.44 cycles an
#         instruction with the Cortex-M0+'s published cycle counts and no wait states; the
#         RP2040 runs from flash through a 16 KiB cache, whose misses come on top: 1.5.
#   rv32: 51% ALU, 17% loads, 7% stores, 21% conditional branches (51% taken), 3% jumps,
#         1% calls, 0.3% divides: 1.57 with an assumed in-order pipeline (load-use stall
#         always, taken branch 3 cycles, divide 34; Espressif publishes no cycle table): 1.6.
CLOCK = {"m0": {"mhz": 133, "cpi": 1.5, "chip": "RP2040 (Cortex-M0+)"},
         "rv32": {"mhz": 160, "cpi": 1.6, "chip": "ESP32-C3 (RV32IMC)"}}
# The chip's layout (testbed/mcu/qemu.py: RAM outside the GC heap, as a board's flash is):
# the guest's files (a ROMFS image: imported in place, as frozen code runs, so they take no
# heap), the device's flash (littlefs on a RAM block device), the fake socket's buffers (a
# board's are its network stack's).
RAM_DISK = 262144
SCRATCH = 16384
# littlefs as each board's port makes its root filesystem: rp2's _boot.py with progsize=256,
# esp32's with the defaults (both 4 KiB blocks).
LFS = {"m0": {"progsize": 256}, "rv32": {}}
MIRROR_DIR = os.environ.get("MIRROR_DIR", "/work/.mirror")
PEERS = {
    # name: (mirror, path in it, module name in the guest)
    "umqtt.simple": ("micropython+micropython-lib", "micropython/umqtt.simple/umqtt/simple.py",
                     "umqtt_simple"),
    "mqtt_as": ("peterhinch+micropython-mqtt", "mqtt_as/__init__.py", "mqtt_as"),
}

BOOTSTRAP = """\
import sys,uctypes,vfs
vfs.mount(vfs.VfsRom(uctypes.bytearray_at(%d,%d)),'/rom')
sys.path[:]=['/rom/b','.frozen']
import rig
rig.PARAMS.update(%s)
import %s
"""


def say(msg):
    print("mcu_bench: " + msg, file=sys.stderr, flush=True)


# ---- what is there ------------------------------------------------------------------------


def fingerprint():
    """The frozen sources' fingerprint as `make mcu` records it, or None if unknown."""
    try:
        from testbed.mcu import test as mcutest
        return mcutest.fingerprint()
    except Exception:
        return None


def builds(only=None):
    """{board: BUILD-INFO} of the boards built, and why the others are not measured."""
    out, why = {}, []
    for b in only or sorted(BOARDS):
        info = build_info(b)
        if info is None:
            why.append("no build/mcu/%s/firmware.elf (make mcu MPY_DIR=/path/to/micropython)"
                       % b)
        elif not shutil.which(BOARDS[b]["qemu"][0]):
            why.append("%s is not installed" % BOARDS[b]["qemu"][0])
        else:
            out[b] = info
    return out, why


def peer_sources():
    """{name: source text} of the peers whose mirror is here, and why the others are not."""
    got, why = {}, []
    for name, (mirror, path, _mod) in PEERS.items():
        git = os.path.join(MIRROR_DIR, mirror, "repo")
        if not os.path.isdir(git):
            why.append("%s: no mirror %s (fetch github:%s)" % (name, git,
                                                                 mirror.replace("+", "/")))
            continue
        r = subprocess.run(["git", "--git-dir", git, "show", "HEAD:" + path],
                           capture_output=True, text=True)
        if r.returncode:
            why.append("%s: %s not in %s: %s" % (name, path, git, r.stderr.strip()))
            continue
        rev = subprocess.run(["git", "--git-dir", git, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        got[name] = (r.stdout, rev)
    return got, why


# ---- the guest's files ----------------------------------------------------------------------


def warp_loop(mpy_dir):
    """Source of asyncio's run_until_complete from the build's checkout with its wait for
    I/O or a timer going to the rig's virtual clock when it is not a poll (bench/mcu/rig.py
    Warp); None (the rig then wraps the wait instead) when it cannot be made."""
    path = os.path.join(mpy_dir or "", "extmod", "asyncio", "core.py")
    try:
        with open(path) as f:
            src = f.read()
        fn = [n for n in ast.parse(src).body
              if isinstance(n, ast.FunctionDef) and n.name == "run_until_complete"][0]
    except (OSError, SyntaxError, IndexError):
        return None
    lines = src.splitlines()[fn.lineno - 1:fn.end_lineno]
    calls = [i for i, ln in enumerate(lines) if ln.strip() == "_io_queue.wait_io_event(dt)"]
    if len(calls) != 1:
        return None
    i = calls[0]
    pad = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
    lines[i:i + 1] = [pad + "if dt:", pad + "    _warp_wait(dt)", pad + "else:",
                      pad + "    _io_queue.wait_io_event(0)"]
    return "\n".join(lines) + "\n"


def stage(tmp, mpy_cross, peers, loop_src=None):
    """tmp/tree/b/*.mpy: the rig, the scenarios and the peers, compiled for the build, and
    the rig's asyncio loop (warploop: warp_loop())."""
    tree = os.path.join(tmp, "tree")
    b = os.path.join(tree, "b")
    os.makedirs(b)
    if loop_src:
        path = os.path.join(tmp, "warploop.py")
        with open(path, "w") as f:
            f.write("# run_until_complete of the build's asyncio, waits to the rig's clock\n"
                    "SRC = %r\n" % loop_src)
        subprocess.run([mpy_cross, "-o", os.path.join(b, "warploop.mpy"), "-s",
                        "warploop.py", path], check=True)
    for path in GUEST_FILES:
        src = "bench/%s.py" % path
        subprocess.run([mpy_cross, "-o", os.path.join(b, path.split("/")[-1] + ".mpy"), "-s",
                        src, src], cwd=ROOT, check=True)
    for name, (src, _rev) in peers.items():
        mod = PEERS[name][2]
        path = os.path.join(tmp, mod + ".py")
        with open(path, "w") as f:
            f.write(src)
        subprocess.run([mpy_cross, "-o", os.path.join(b, mod + ".mpy"), "-s", mod + ".py",
                        path], check=True)
    return tree


def make_image(tmp, tree):
    return qemu.make_image(tmp, tree, "mcu_bench")


# ---- one scenario in one QEMU boot ------------------------------------------------------------


def run_guest(board, image, scenario, params, timeout):
    """The scenario's "@@MCU" documents, merged; raises RuntimeError with the guest's
    output when it fails."""
    chip_addr = BOARDS[board]["chip"][0]
    disk = chip_addr + ROMFS_SIZE
    params = dict(params, ram_disk=[disk, RAM_DISK], scratch=[disk + RAM_DISK, SCRATCH],
                  peer_dir="/rom/b", lfs=LFS[board])
    code = BOOTSTRAP % (chip_addr, ROMFS_SIZE, repr(params), scenario)
    t0 = time.monotonic()
    deadline = t0 + timeout
    g = qemu.Guest(board, image)
    try:
        text = g.run(code, deadline)
    except TimeoutError as e:
        raise RuntimeError("%s %s: timed out after %d s:\n%s" % (board, scenario, timeout, e))
    except EOFError as e:
        raise RuntimeError("%s %s: QEMU exited:\n%s" % (board, scenario, e))
    finally:
        g.close()
    stdout, _, stderr = text.partition("\x04")
    stderr = stderr.rstrip("\x04>").strip()
    res = {}
    for line in stdout.splitlines():
        if line.startswith(MARK):
            res.update(json.loads(line[len(MARK):]))
    if stderr:
        raise RuntimeError("%s %s failed:\n%s%s" % (board, scenario, stdout[-2000:], stderr))
    say("%s %s: %.0f s" % (board, scenario, time.monotonic() - t0))
    return res


# ---- figures ------------------------------------------------------------------------------------


def instr(us):
    """Instructions from a guest span in ticks_us (1 ns per instruction)."""
    return None if us is None else int(round(us * 1000))


def est_ms(board, n):
    c = CLOCK[board]
    return None if n is None else round(n * c["cpi"] / (c["mhz"] * 1000.0), 3)


def board_figures(board, pure, device, peers, peer_revs):
    p = "mcu_%s_" % board
    f = {}
    rig = {}  # the fake socket's and the Python flash driver's own instructions in each
    if device:
        f[p + "instr_per_telemetry"] = instr(device["telemetry"])
        f[p + "instr_boot"] = instr(device["boot"])
        f[p + "instr_boot_first_publish"] = instr(device["boot_any"])
        f[p + "instr_drain_1000"] = instr(device["drain"])
        f[p + "instr_drain_1000_from_connect"] = instr(device["drain_only"])
        f[p + "drain_queued"] = device["drain_queued"]
        f[p + "drain_on_flash"] = device["drain_on_flash"]
        c = device["drain_flash_calls"]
        f[p + "drain_flash_calls"] = {"reads": c[0], "read_bytes": c[1], "writes": c[2],
                                      "write_bytes": c[3],
                                      "files_left_open": device["drain_files_left_open"]}
        f[p + "instr_config_apply_full"] = instr(device["config_full"])
        f[p + "telemetry_payload_bytes"] = device["payload_bytes"]
        # The collector: each figure above but the drain is without it; what it would add on
        # average is the garbage per op / the free heap * one collect (device running).
        col, free = device["collect"], device["heap_free_running"]
        f[p + "collect"] = {"instr": instr(col), "heap_free_bytes": free}
        # What the device holds on a bare-metal heap once running (after a collect), from
        # the start of main.py's work: firmware modules, buffers, objects, connection; not
        # the interpreter's own, asyncio's import or the rig's flash and socket.
        f[p + "heap_held_bytes"] = device["heap_alloc_running"] - device["heap_before"]
        f[p + "alloc_bytes"] = {"per_telemetry": round(device["telemetry_alloc"]),
                                "config_apply_full": round(device["config_alloc"])}
        f[p + "instr_per_telemetry_with_gc"] = instr(
            device["telemetry"] + device["telemetry_alloc"] / free * col)
        rig.update(per_telemetry_socket=instr(device["telemetry_sock"]),
                   boot_flash_driver=instr(device["boot_flash_share"]),
                   config_apply_full_flash_driver=instr(device["config_flash_share"]),
                   drain_1000_flash_driver=instr(device["drain_flash_share"]))
    if pure:
        f[p + "instr_config_apply"] = instr(pure["twin_offer"])
        f[p + "config_layer_bytes"] = pure["layer_bytes"]
        f[p + "instr_per_verify"] = instr(pure["check_empty"])
        f[p + "instr_per_verify_low_heap"] = instr(pure["check_full"])
        f[p + "instr_per_verify_p256_only"] = instr(pure["verify_empty"])
        f[p + "instr_per_verify_p256_only_low_heap"] = instr(pure["verify_low"])
        f[p + "verify_heap_free_bytes"] = {"empty": pure["heap_free_empty"],
                                           "low_heap": pure["heap_free_full"],
                                           "p256_only_low_heap": pure["heap_free_low"]}
        if pure["check_full"] and pure["check_empty"]:
            f[p + "verify_low_heap_vs_empty"] = round(pure["check_full"] / pure["check_empty"], 3)
        parts = {k: instr(v) for k, v in pure.items()
                 if k.startswith(("twin_", "outbox_", "slice_", "asyncio_", "publish_",
                                  "telemetry_")) and not k.endswith(("_reads", "_bytes"))}
        parts.pop("twin_offer", None)
        parts.pop("twin_offer_alloc", None)
        parts.pop("twin_offer_n", None)
        if device:
            f[p + "alloc_bytes"]["config_apply"] = round(pure["twin_offer_alloc"])
        parts["outbox_flash_drain_reads"] = pure.get("outbox_flash_drain_reads")
        f[p + "parts"] = parts
    f[p + "ms"] = {k[len(p) + 6:]: est_ms(board, f[k]) for k in sorted(f)
                   if k.startswith(p + "instr_")}
    f[p + "clock"] = "%s: %d MHz, CPI %.1f assumed" % (
        CLOCK[board]["chip"], CLOCK[board]["mhz"], CLOCK[board]["cpi"])
    if rig:
        f[p + "rig_share"] = rig
    if peers:
        table = {}
        for name, r in peers.items():
            table[name] = {
                "qos0": instr(r["qos0"]), "qos1": instr(r["qos1"]),
                "socket_qos0": instr(r["sock0"]), "socket_qos1": instr(r["sock1"]),
                "alloc_bytes_qos0": round(r["qos0_alloc"]),
                "alloc_bytes_qos1": round(r["qos1_alloc"]),
                "writes_per_qos1": r["writes_per_qos1"],
                "idle_per_s": instr(r["idle_per_s"]),
                "collect": instr(r["collect"]), "heap_free_bytes": r["heap_free"],
            }
            for q in ("qos0", "qos1"):
                table[name][q + "_with_gc"] = instr(
                    r[q] + r[q + "_alloc"] / r["heap_free"] * r["collect"])
            if "qos1_pipelined" in r:
                table[name]["qos1_pipelined"] = instr(r["qos1_pipelined"])
                table[name]["alloc_bytes_qos1_pipelined"] = round(r["qos1_pipelined_alloc"])
            if name in peer_revs:
                table[name]["source"] = peer_revs[name]
        f[p + "peers"] = table
        ours = table.get("ours")
        ratio = {}
        for peer in ("umqtt.simple", "mqtt_as"):
            if ours and peer in table:
                t = table[peer]
                for q in ("qos0", "qos1"):
                    ratio["%s_ours_vs_%s" % (q, peer)] = round(ours[q] / t[q], 2)
                    # Without the fake socket's own instructions (its share of each).
                    ratio["%s_ours_vs_%s_net" % (q, peer)] = round(
                        (ours[q] - ours["socket_" + q]) / (t[q] - t["socket_" + q]), 2)
        if ratio:
            f[p + "peers_ratio"] = ratio
    return f


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--board", action="append", choices=sorted(BOARDS))
    ap.add_argument("--only", default="pure,device,peers",
                    help="scenarios, comma-separated (pure, device, peers)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per QEMU boot")
    a = ap.parse_args(argv)
    quick = os.environ.get("QUICK") == "1"
    only = set(a.only.split(","))
    boards, why = builds(a.board)
    for w in why:
        say("skipped: " + w)
    if not boards:
        print(json.dumps({"mcu_skipped": "; ".join(why)}))
        return 0
    mpy_cross = os.path.join(BUILD, "mpy-cross")
    if not os.path.exists(mpy_cross):
        print(json.dumps({"mcu_skipped": "no build/mcu/mpy-cross (make mcu)"}))
        return 0
    fp = fingerprint()
    figures = {"mcu_build": {b: {"micropython": i.get("commit"), "heap": i.get("heap"),
                                 "firmware": i.get("fingerprint"),
                                 "stale": None if fp is None else i.get("fingerprint") != fp}
                             for b, i in boards.items()}}
    for b, i in boards.items():
        if fp is not None and i.get("fingerprint") != fp:
            say("warning: build/mcu/%s froze other firmware sources than the checkout's now "
                "(%s, now %s): the figures are the build's (make mcu again)" % (
                    b, i.get("fingerprint"), fp))
    peers, why = ({}, ["not asked for"]) if "peers" not in only else peer_sources()
    for w in why:
        say("peer skipped: " + w)
    peer_revs = {n: "%s@%s" % (PEERS[n][0].replace("+", "/"), rev)
                 for n, (_src, rev) in peers.items()}
    n = 10 if quick else 30
    jobs = []  # (board, key, scenario, params)
    for b in boards:
        if "pure" in only:
            jobs.append((b, "pure", "pure", {"twin_reps": 10 if quick else 30,
                                             "parts_reps": 10 if quick else 30,
                                             "verify_reps": 2 if quick else 3}))
        if "device" in only:
            jobs.append((b, "device", "device", {"n": n, "cfg_n": 3 if quick else 5,
                                                 "queue": 1000, "flash": RAM_DISK}))
        if "peers" in only:
            for c in ["ours"] + sorted(peers):
                jobs.append((b, "peer:" + c, "peers", {"client": c, "n": n}))
    results = {b: {} for b in boards}
    failed = []
    mpy_dirs = {i.get("mpy_dir") for i in boards.values()}
    loop_src = warp_loop(mpy_dirs.pop()) if len(mpy_dirs) == 1 else None
    if not loop_src:
        say("warning: no asyncio source of the build's checkout (BUILD-INFO mpy_dir): the "
            "rig wraps the loop's wait, which adds instructions to every asyncio figure")
    figures["mcu_asyncio_loop"] = "inline" if loop_src else "wrapper"
    with tempfile.TemporaryDirectory(prefix="mcu-bench-") as tmp:
        image = make_image(tmp, stage(tmp, mpy_cross, peers, loop_src))
        with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futs = {pool.submit(run_guest, b, image, sc, params, a.timeout): (b, key)
                    for b, key, sc, params in jobs}
            for fut in concurrent.futures.as_completed(futs):
                b, key = futs[fut]
                try:
                    results[b][key] = fut.result()
                except RuntimeError as e:
                    failed.append(str(e))
                    say(str(e))
    for b in boards:
        r = results[b]
        pr = {k[5:]: v for k, v in r.items() if k.startswith("peer:")}
        figures.update(board_figures(b, r.get("pure"), r.get("device"), pr, peer_revs))
    if why and "peers" in only:
        figures["mcu_peers_skipped"] = "; ".join(why)
    if failed:
        figures["mcu_failed"] = [e.splitlines()[0] for e in failed]
    print(json.dumps(figures, sort_keys=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
