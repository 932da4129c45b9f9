"""The instruction mix behind the CPI that bench/mcu_bench.py assumes (issue 27): one guest
scenario of bench/mcu/ (default: the device scenario, shortened) runs under QEMU with every
instruction traced (-singlestep -d exec,nochain: one trace line per instruction executed,
its address), and each address is classed by the build's disassembly (objdump). Prints the
dynamic mix (loads, stores, multiple loads/stores with their registers, branches taken and
not, calls, multiplies and divides, the rest) and the CPI of a timing model:

  m0    Cortex-M0+ (the RP2040's core, ARM's published cycle counts): 1 cycle, loads and
        stores 2, LDM/STM/PUSH/POP 1+N (POP with PC 3+N), B<cond> 2 taken / 1 not, B and
        BX/BLX 2, BL 3, MUL 1 (the RP2040 has the single-cycle multiplier), barriers and
        MRS/MSR 3 (4 for DSB/DMB/ISB); zero wait states (the RP2040 executes from flash
        through a 16 KiB cache: its misses come on top).
  rv32  an in-order RV32IMC pipeline as the ESP32-C3's is usually described (Espressif
        publishes no cycle table): 1 cycle, loads 2 (the load-use stall, taken as always),
        stores 1, taken branches and jumps 3, branches not taken 1, MUL 1, DIV/REM 34
        (assumed), CSR 2.

    .venv/bin/python bench/mcu_mix.py [--board m0|rv32] [--scenario device] [--params '{...}']

Needs `make mcu` and QEMU; the trace goes through a FIFO (a few hundred MB of text per
100 million instructions), counted as it comes. Not part of `make bench`: the figures it
justifies (CLOCK in bench/mcu_bench.py) change only with the interpreter or the compiler.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench.mcu_bench as mb  # noqa: E402
from testbed.mcu import qemu  # noqa: E402

OBJDUMP = {"m0": "arm-none-eabi-objdump", "rv32": "riscv64-unknown-elf-objdump"}
TRACE = re.compile(rb"\[[0-9a-f]{8}/([0-9a-f]{8})/")


def disassembly(board):
    """{address: (mnemonic, operands, size in bytes)} of the build's code."""
    elf = os.path.join(mb.BUILD, board, "firmware.elf")
    out = subprocess.run([OBJDUMP[board], "-d", elf], capture_output=True, text=True,
                         check=True).stdout
    table = {}
    line_re = re.compile(r"^\s*([0-9a-f]+):\s+((?:[0-9a-f]{2,8} ?)+)\s+(\S+)\s*(.*)$")
    for line in out.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        raw = m.group(2).split()
        size = sum(len(x) // 2 for x in raw)
        table[addr] = (m.group(3), m.group(4).split(";")[0].split("<")[0].strip(), size)
    return table


def trace(board, image, bootstrap, timeout):
    """(Counter of addresses executed, Counter of addresses left out of sequence)."""
    counts = Counter()
    jumps = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "trace")
        os.mkfifo(fifo)

        def reader():
            prev = None
            with open(fifo, "rb") as f:
                rest = b""
                while True:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    chunk = rest + chunk
                    cut = chunk.rfind(b"\n") + 1
                    rest = chunk[cut:]
                    pcs = [int(x, 16) for x in TRACE.findall(chunk, 0, cut)]
                    counts.update(pcs)
                    if prev is not None:
                        pcs.insert(0, prev)
                    # An address whose successor is not the next one: a branch taken (or
                    # an interrupt; rare). Sizes are checked against the disassembly later.
                    jumps.update(a for a, b in zip(pcs, pcs[1:]) if b - a not in (2, 4))
                    prev = pcs[-1] if pcs else prev

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        g = qemu.Guest(board, image, ["-singlestep", "-d", "exec,nochain", "-D", fifo])
        deadline = time.monotonic() + timeout
        try:
            text = g.run(bootstrap, deadline)
        finally:
            g.close()
        t.join(60)
    out, _, err = text.partition("\x04")
    if err.strip("\x04> \r\n"):
        raise SystemExit("the scenario failed:\n" + out[-2000:] + err)
    return counts, jumps


def classify_m0(mn, ops):
    """(class, cycles if not taken, cycles if taken) of a Thumb-1 instruction."""
    m = mn.lower().rstrip(".nw")
    if m in ("push", "pop", "ldmia", "stmia", "ldm", "stm"):
        n = _regcount(ops)
        if m == "pop" and "pc" in ops:
            return "pop_pc", 3 + n, 3 + n
        return ("ldm" if m in ("pop", "ldmia", "ldm") else "stm"), 1 + n, 1 + n
    if m.startswith("ldr"):
        return "load", 2, 2
    if m.startswith("str"):
        return "store", 2, 2
    if m == "bl":
        return "call", 3, 3
    if m in ("bx", "blx"):
        return ("call" if m == "blx" else "branch"), 2, 2
    if m == "b":
        return "branch", 2, 2
    if re.fullmatch(r"b(eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le)", m):
        return "cond_branch", 1, 2
    if m in ("muls", "mul"):
        return "mul", 1, 1
    if m in ("dsb", "dmb", "isb"):
        return "other", 4, 4
    if m in ("mrs", "msr"):
        return "other", 3, 3
    if m in ("add", "mov") and ops.startswith("pc"):
        return "branch", 2, 2
    return "alu", 1, 1


def classify_rv32(mn, ops):
    m = mn.lower()
    if m.startswith("c."):
        m = m[2:]
    if m in ("lw", "lh", "lhu", "lb", "lbu", "lwsp", "flw"):
        return "load", 2, 2
    if m in ("sw", "sh", "sb", "swsp", "fsw"):
        return "store", 1, 1
    if m in ("jal", "jalr"):
        return "call", 3, 3
    if m in ("j", "jr", "ret"):
        return "branch", 3, 3
    if m in ("beq", "bne", "blt", "bge", "bltu", "bgeu", "beqz", "bnez", "blez", "bgez",
             "bltz", "bgtz", "bgt", "ble", "bgtu", "bleu"):
        return "cond_branch", 1, 3
    if m in ("mul", "mulh", "mulhu", "mulhsu"):
        return "mul", 1, 1
    if m in ("div", "divu", "rem", "remu"):
        return "div", 34, 34
    if m.startswith("csr"):
        return "other", 2, 2
    return "alu", 1, 1


def _regcount(ops):
    inner = ops[ops.find("{") + 1:ops.find("}")]
    n = 0
    for part in inner.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            n += int(b.strip()[1:]) - int(a.strip()[1:]) + 1
        elif part:
            n += 1
    return n


def mix(board, counts, jumps, dis):
    classify = classify_m0 if board == "m0" else classify_rv32
    cls = Counter()
    cycles = 0
    unknown = 0
    taken = not_taken = 0
    regs = 0
    for pc, n in counts.items():
        d = dis.get(pc)
        if d is None:
            unknown += n
            cycles += n
            continue
        c, c_seq, c_taken = classify(d[0], d[1])
        cls[c] += n
        if c == "cond_branch":
            t = min(jumps.get(pc, 0), n)
            taken += t
            not_taken += n - t
            cycles += t * c_taken + (n - t) * c_seq
        else:
            cycles += n * c_seq
        if c in ("ldm", "stm", "pop_pc"):
            regs += n * _regcount(d[1])
    total = sum(counts.values())
    frac = {k: round(v / total, 4) for k, v in sorted(cls.items())}
    return {"board": board, "instructions": total, "unknown_addresses": unknown,
            "mix": frac, "cond_branch_taken": round(taken / max(1, taken + not_taken), 3),
            "regs_per_ldm_stm": round(regs / max(1, cls["ldm"] + cls["stm"] +
                                                 cls["pop_pc"]), 2),
            "cpi": round(cycles / total, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--board", default="m0", choices=sorted(mb.BOARDS))
    ap.add_argument("--scenario", default="device")
    ap.add_argument("--params", default='{"n": 5, "cfg_n": 1, "queue": 30, "flash": 262144}')
    ap.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args()
    info = mb.build_info(a.board)
    if info is None:
        raise SystemExit("mcu_mix: no build/mcu/%s (make mcu MPY_DIR=...)" % a.board)
    params = json.loads(a.params)
    chip = mb.BOARDS[a.board]["chip"][0]
    disk = chip + mb.ROMFS_SIZE
    params.update(ram_disk=[disk, mb.RAM_DISK], scratch=[disk + mb.RAM_DISK, mb.SCRATCH],
                  peer_dir="/rom/b", lfs=mb.LFS[a.board])
    with tempfile.TemporaryDirectory() as tmp:
        loop = mb.warp_loop(info.get("mpy_dir"))
        image = mb.make_image(tmp, mb.stage(tmp, os.path.join(mb.BUILD, "mpy-cross"), {},
                                            loop))
        boot = mb.BOOTSTRAP % (chip, mb.ROMFS_SIZE, repr(params), a.scenario)
        t0 = time.monotonic()
        counts, jumps = trace(a.board, image, boot, a.timeout)
    res = mix(a.board, counts, jumps, disassembly(a.board))
    res["scenario"] = a.scenario
    res["seconds"] = round(time.monotonic() - t0)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
