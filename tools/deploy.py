"""Deploy the compiled firmware and one device's identity onto a board with mpremote.

    python tools/deploy.py --port /dev/ttyUSB0 --device pump-0042 [--force] [--dry-run]
                           [--frozen | --romfs] [--build build] [--secrets secrets]
                           [--board-state FILE] [--app]

What goes onto the board's flash: build/firmware/**.mpy to /firmware, build/lib/**.mpy to
/lib (on the board's import path), the loader (boot.py, main.py, otaboot.mpy) to /, and from provisioning
(tools/provision.py, secrets/<device>/) config.json to /config.json plus the files its
files.json names (TLS key and certificates). With --app, also build/app/**.mpy (the
application package, `make mpy APP=PATH`) to /app, on the filesystem whatever the firmware's
mode; without it a board's /app stays as it is. Then a reset.

Where the bytecode lives instead of the filesystem:
- --frozen: the board runs a MicroPython built with manifest.py frozen in; no .mpy copied.
- --romfs: the .mpy tree goes into a ROMFS image (MicroPython 1.25+ built with ROMFS, see
  README): build/romfs/{firmware,lib} becomes build/romfs.img, written with
  `mpremote romfs deploy` to partition 0, mounted at /rom, so `import firmware` resolves from
  /rom and `import mqtt` from /rom/lib (both on sys.path by default). The bytecode runs from
  flash as if frozen. A board without ROMFS is refused; an image identical to the board's
  is not written again.
In both, a stale /firmware or /lib/<package> of an earlier .mpy deploy is removed
(`mpremote fs rm -r`): the board's sys.path is ['', '.frozen', '/rom', '/rom/lib', '/lib']
with '' the filesystem's root, so /firmware would shadow the frozen or /rom firmware; /lib
comes last and shadows nothing, but its copies are this deploy's own, outdated, and take
flash. Only the top-level names this build has are removed, nothing else in /lib.

Safe by default:
- A deploy that changes anything holds the board first (otaboot.py, "a deploy over USB"):
  it writes /deploy.hold and resets the board, which stops a running watchdog; boot.py
  arms none while the hold is there and the firmware is not started. Files are copied to
  /deploy.new/ and moved into place by one commit (otaboot.finish_deploy, which the loader
  also completes at boot after a power loss), so a deploy cut short leaves the old code and
  identity.
- The board is asked first (one mpremote `exec`) for the device id of its /config.json and
  the SHA-256 of every file the deploy would write. A board that already is another device
  is refused unless --force: replacing an identity takes the other device's place on the
  broker (same client id) and its data.
- Only files whose hash differs are copied, so a second deploy copies what changed; the
  copies are chained into one mpremote command (one soft reset, not one per file).
- A refused board is reset, so the firmware that reading its state stopped runs again.
- The same exec reports the free heap (gc.mem_free() after gc.collect()): below what the
  firmware needs (needed_heap_kb) a warning is printed, the deploy goes on.
- Progress: one line per operation, "[k/n] ...".

--dry-run prints the mpremote commands instead of running them (no board needed); with
--board-state FILE (JSON, what the board's exec reports: {"device_id": ..., "hashes":
{remote path: hex}, "dirs": [...], "present": [stale paths], "mem_free": bytes,
"rom_ioctl": bool, "romfs": partition bytes (0: none), "romfs_hash": hex of the partition's
first len(image) bytes}; keys left out are unknown and not checked) it plans against that
state instead of asking a board. tools/ptyboard.py is a board to deploy to for real.
Exit codes: 0 done, 1 refused (identity, no ROMFS) or a failed mpremote step, 2 bad
arguments or missing build/provisioning files.
"""
import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from otaboot import HOLD, STAGE  # noqa: E402
from tools.venv import venv_tool  # noqa: E402

# The first step of a deploy that changes anything: the hold (otaboot.py, "a deploy over
# USB"), then a hard reset, the one thing that stops a running watchdog. The sleep lets the
# exec's answer reach the host first.
# The file is closed before the reset: littlefs keeps nothing of a file left open.
HOLD_SCRIPT = ("with open(%r, 'w') as f:\n    f.write('new')\nimport time, machine\n"
               "time.sleep_ms(100)\nmachine.reset()" % HOLD)

# Runs on the board (mpremote exec: raw REPL after a soft reset, so boot.py has run and
# main.py has not): the free heap first, then the current identity, the hashes of the files
# to be written, which stale paths exist, and the ROMFS partition (size, and the hash of as
# many of its first bytes as the image to be written has). Formatted by state_script().
STATE_SCRIPT = """
import gc
gc.collect()
_free = gc.mem_free()
import json, os, hashlib
try:
    import vfs
except ImportError:
    vfs = None
def _hex(h):
    return ''.join('%%02x' %% x for x in h.digest())
def _h(p):
    try:
        f = open(p, 'rb')
    except OSError:
        return None
    h = hashlib.sha256()
    while True:
        b = f.read(512)
        if not b:
            break
        h.update(b)
    f.close()
    return _hex(h)
def _isdir(p):
    try:
        return os.stat(p)[0] & 0x4000 != 0
    except OSError:
        return False
def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False
def _rom(n):
    if not hasattr(vfs, 'rom_ioctl'):
        return False, 0, None
    try:
        if vfs.rom_ioctl(1) < 1:
            return True, 0, None
        d = vfs.rom_ioctl(2, 0)
        if isinstance(d, int):
            return True, 0, None
        size = d.ioctl(4, 0) * d.ioctl(5, 0) if hasattr(d, 'ioctl') else len(d)
    except Exception:
        return True, 0, None
    if not 0 < n <= size:
        return True, size, None
    try:
        h = hashlib.sha256()
        h.update(memoryview(d)[:n])
        return True, size, _hex(h)
    except Exception:
        return True, size, None
try:
    _id = json.load(open('/config.json')).get('device_id')
except Exception:
    _id = None
_ri, _rs, _rh = _rom(%(rom_len)d)
print('STATE' + json.dumps({'device_id': _id, 'hashes': {p: _h(p) for p in %(files)s},
                           'dirs': [d for d in %(dirs)s if _isdir(d)],
                           'present': [p for p in %(stale)s if _exists(p)],
                           'mem_free': _free, 'rom_ioctl': _ri, 'romfs': _rs,
                           'romfs_hash': _rh}))
"""


def state_script(remote, dirs, stale=(), rom_len=0):
    """The board-side script for these remote files, their directories, the stale paths to
    look for and the length of the ROMFS image (0: none)."""
    return STATE_SCRIPT % {"files": json.dumps(list(remote)), "dirs": json.dumps(list(dirs)),
                           "stale": json.dumps(list(stale)), "rom_len": rom_len}


# Heap (KiB) the firmware needs on a 32-bit board to boot and run, measured with the board
# model (`make board-model`: the Unix port built 32-bit, bench/device_bench.py), which
# writes them to bench/results.json; these constants are the fallback when it has not run.
# Frozen or ROMFS, the bytecode stays in flash: ~60 KiB of heap to boot, ~48 KB held once
# running. As .mpy files on the filesystem the bytecode is loaded into the heap: ~124 KiB.
IN_FLASH_MIN_HEAP_KB = 64  # bench/results.json board_model_min_heap_kb
MPY_MIN_HEAP_KB = 128  # bench/results.json board_model_mpy_min_heap_kb
RESULTS = os.path.join(ROOT, "bench", "results.json")


def needed_heap_kb(in_flash, results=RESULTS):
    """(KiB, where the figure comes from) the firmware needs: in_flash for frozen/ROMFS."""
    key = "board_model_min_heap_kb" if in_flash else "board_model_mpy_min_heap_kb"
    try:
        with open(results) as f:
            value = json.load(f).get(key)
        if isinstance(value, (int, float)) and value > 0:
            return value, "%s %s" % (os.path.relpath(results, ROOT), key)
    except (OSError, ValueError, AttributeError):
        pass
    return (IN_FLASH_MIN_HEAP_KB if in_flash else MPY_MIN_HEAP_KB), "tools/deploy.py default"


def heap_warning(state, mode):
    """The warning line for a board whose free heap after boot is below the firmware's
    need, or None (enough, or not known). mode: "mpy", "frozen" or "romfs"."""
    free = state.get("mem_free")
    if not isinstance(free, int):
        return None
    need, source = needed_heap_kb(mode != "mpy")
    if free >= need * 1024:
        return None
    if mode == "mpy":
        in_flash, _ = needed_heap_kb(True)
        advice = ("freeze the firmware (manifest.py build, FROZEN=1) or deploy it as ROMFS "
                  "(ROMFS=1): with its bytecode in flash it needs about %d KiB" % in_flash)
    else:
        advice = "this is with the bytecode in flash already: the board needs more free RAM"
    return ("deploy: warning: the board has %d KiB of free heap after boot, the firmware (%s) "
            "needs about %d KiB (%s): it may fail with MemoryError; %s. (Measured over the raw "
            "REPL right after a soft reset, boot.py run and main.py not: roughly what the app "
            "gets.)" % (free // 1024, {"mpy": ".mpy files", "frozen": "frozen",
                                        "romfs": "as ROMFS"}[mode], need, source, advice))


class Refused(Exception):
    pass


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def files_to_deploy(build, secrets, device, frozen=False, app=False):
    """[(local path, remote path)] in copy order; raises FileNotFoundError naming what is
    missing (run `make mpy` / tools/provision.py first). frozen: the bytecode is not copied
    to the filesystem (a build with manifest.py frozen in, or a ROMFS image). app: the
    compiled application package too."""
    out = []
    tops = () if frozen else ("firmware", "lib")
    for top in tops + (("app",) if app else ()):
        base = os.path.join(build, top)
        if not os.path.isdir(base):
            raise FileNotFoundError("%s: nothing compiled (run make mpy%s)"
                                    % (base, " APP=PATH" if top == "app" else ""))
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(".mpy"):
                    local = os.path.join(dirpath, name)
                    out.append((local, "/" + os.path.relpath(local, build).replace(os.sep, "/")))
    for name in ("otaboot.mpy", "boot.py", "main.py"):  # the loader: otaboot before main
        local = os.path.join(build, name)
        if not os.path.isfile(local):
            raise FileNotFoundError("%s missing (run make mpy)" % local)
        out.append((local, "/" + name))
    dev_dir = os.path.join(secrets, device)
    config = os.path.join(dev_dir, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError("%s missing (run tools/provision.py %s ...)" % (config, device))
    with open(config) as f:
        cfg_id = json.load(f).get("device_id")
    if cfg_id != device:
        raise FileNotFoundError("%s is for device %r, not %r" % (config, cfg_id, device))
    extra = os.path.join(dev_dir, "files.json")
    if os.path.isfile(extra):
        with open(extra) as f:
            for remote, local in sorted(json.load(f).items()):
                local = local if os.path.isabs(local) else os.path.join(dev_dir, local)
                if not os.path.isfile(local):
                    raise FileNotFoundError("%s (named in %s) missing" % (local, extra))
                out.append((local, remote))
    # The config last: a board interrupted halfway keeps its old identity and code paths
    # until the new firmware is complete.
    out.append((config, "/config.json"))
    return out


def parents(remote_paths):
    """Every directory the remote paths need, parents first."""
    dirs = []
    for p in remote_paths:
        parts = p.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if d not in dirs:
                dirs.append(d)
    return dirs


def stale_paths(build):
    """What an earlier .mpy deploy of this build left on the filesystem: /firmware and
    /lib/<name> for each top-level entry of build/lib. Removed by a frozen or ROMFS deploy."""
    out = ["/firmware"]
    lib = os.path.join(build, "lib")
    if os.path.isdir(lib):
        out += ["/lib/" + n for n in sorted(os.listdir(lib))
                if n.endswith(".mpy") or os.path.isdir(os.path.join(lib, n))]
    return out


def romfs_image(build):
    """Stage build/firmware and build/lib's .mpy files in build/romfs/ (firmware/ -> /rom/firmware,
    lib/ -> /rom/lib) and build build/romfs.img from it with `mpremote romfs build` (no
    board needed; --no-mpy: the .mpy are make mpy's, with its ARCH). Returns the image path."""
    stage = os.path.join(build, "romfs")
    if os.path.isdir(stage):
        shutil.rmtree(stage)
    for top in ("firmware", "lib"):
        base = os.path.join(build, top)
        if not os.path.isdir(base):
            raise FileNotFoundError("%s: no compiled firmware (run make mpy)" % base)
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if name.endswith(".mpy"):
                    src = os.path.join(dirpath, name)
                    dst = os.path.join(stage, os.path.relpath(src, build))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copyfile(src, dst)
    image = os.path.join(build, "romfs.img")
    if os.path.exists(image):
        os.remove(image)
    # The options go before the sub-command (mpremote's romfs parser).
    r = subprocess.run([mpremote_path(), "romfs", "--no-mpy", "--output", image, "build", stage],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or not os.path.isfile(image):
        raise RuntimeError("could not build the ROMFS image: %s"
                           % (r.stderr or r.stdout).strip()[-300:])
    return image


def romfs_refusal(state, image_size):
    """Why the board in `state` cannot take the ROMFS image, or None (it can, or the state
    does not say: a dry run without --board-state)."""
    if "romfs" not in state:
        return None
    size = state["romfs"]
    if size is True:  # a hand-written state: ROMFS present, size not given
        return None
    if not size:
        if state.get("rom_ioctl") is False or size is False:
            return ("the board's MicroPython has no ROMFS (no vfs.rom_ioctl): stock ESP32 and "
                    "Pico W downloads are built without it. Flash a build with ROMFS (README, "
                    "Flashing a board), or deploy without ROMFS=1 (FROZEN=1 for a frozen build)")
        return ("the board's MicroPython supports ROMFS but has no ROMFS partition (ESP32: a "
                "partition table with a 'romfs' data partition, e.g. partitions-4MiB-romfs.csv; "
                "RP2: MICROPY_HW_ROMFS_BYTES); deploy without ROMFS=1")
    if image_size > size:
        return ("the ROMFS image is %d bytes, the board's ROMFS partition %d: it does not fit"
                % (image_size, size))
    return None


def plan(files, state, device, force=False, stale=(), romfs=None):
    """The operations that bring a board in `state` to `files`: [("hold",), ("romfs",
    image), ("rm", remote), ("mkdir", remote), ("cp", local, remote), ..., ("commit",),
    ("reset",)]. stale: the paths to remove where the state reports them present (a frozen
    or ROMFS deploy); romfs: the image to write unless the board's partition already starts
    with it. Files are copied into the staging directory (otaboot.STAGE) and moved into
    place by the commit; a board with anything to change is held first (otaboot.HOLD).
    Raises Refused for another device's board, or for a ROMFS deploy to a board without
    room for it."""
    have = state.get("device_id")
    if have and have != device and not force:
        raise Refused("the board is device %r; deploying %r would replace its identity "
                      "(use --force / FORCE=1 if that is what you want)" % (have, device))
    ops = []
    if romfs:
        why = romfs_refusal(state, os.path.getsize(romfs))
        if why:
            raise Refused(why)
        # First: a deploy interrupted after it still runs, on the old /firmware until removed.
        if state.get("romfs_hash") != sha256_file(romfs):
            ops.append(("romfs", romfs))
    present = state.get("present", ())
    ops += [("rm", p) for p in stale if p in present]
    if STAGE in present:
        ops.append(("rm", STAGE))  # what a deploy cut short had staged
    hashes = state.get("hashes", {})
    changed = [(local, remote) for local, remote in files
               if hashes.get(remote) != sha256_file(local)]
    if changed:
        ops += [("mkdir", STAGE + d) for d in [""] + parents(r for _, r in changed)]
        ops += [("cp", local, STAGE + remote) for local, remote in changed]
    if ops:
        # The commit ends every held deploy: it also lets go of the hold.
        ops = [("hold",)] + ops + [("commit",)]
    ops.append(("reset",))
    return ops


def commit_script():
    """The board-side commit: mark the staging complete, move it into place with the
    loader's own finish_deploy (its source, sent along: the board's loader may be older),
    and let go of the hold."""
    with open(os.path.join(ROOT, "otaboot.py")) as f:
        source = f.read()
    fn = [n for n in ast.parse(source).body
          if isinstance(n, ast.FunctionDef) and n.name == "finish_deploy"][0]
    return ("import os\nSTAGE = %r\ntry:\n    os.mkdir(STAGE)\nexcept OSError:\n    pass\n"
            "open(%r, 'w').close()\n%s\nprint('MOVED', finish_deploy(%r))\n"
            "try:\n    os.remove(%r)\nexcept OSError:\n    pass\n"
            % (STAGE, STAGE + "/.commit", ast.get_source_segment(source, fn), STAGE, HOLD))


def mpremote_path():
    try:
        return venv_tool("mpremote")
    except RuntimeError:
        return "mpremote"  # one on PATH, as an operator without the venv has it


def op_args(op):
    """The mpremote arguments of one operation."""
    if op[0] == "romfs":
        return ["romfs", "deploy", op[1]]
    if op[0] == "rm":
        return ["fs", "rm", "-r", ":" + op[1]]
    if op[0] == "mkdir":
        return ["fs", "mkdir", ":" + op[1]]
    if op[0] == "cp":
        # -f: the hash was compared already; the copy must happen.
        return ["fs", "cp", "-f", op[1], ":" + op[2]]
    if op[0] == "reset":
        return ["reset"]
    if op[0] == "hold":
        return ["exec", "--no-follow", HOLD_SCRIPT]
    if op[0] == "commit":
        return ["exec", commit_script()]
    raise ValueError(op)


# Copies and directories chained into one mpremote command (`+`): each command costs a
# connection and a soft reset (boot.py), ~0.4 s on the board on a pty, more on a board.
BATCH = 40


def steps(ops):
    """The operations grouped into mpremote commands: consecutive mkdir and cp together."""
    out = []
    for op in ops:
        if (op[0] in ("mkdir", "cp") and out and out[-1][-1][0] in ("mkdir", "cp")
                and len(out[-1]) < BATCH):
            out[-1].append(op)
        else:
            out.append([op])
    return out


def command(port, step):
    """The mpremote argv of one step (a list of operations)."""
    argv = [mpremote_path(), "connect", port]
    for i, op in enumerate(step):
        argv += (["+"] if i else []) + op_args(op)
    return argv


def board_state(port, files, stale=(), romfs=None):
    remote = [r for _, r in files]
    script = state_script(remote, parents(remote), list(stale) + [STAGE],
                          os.path.getsize(romfs) if romfs else 0)
    r = subprocess.run([mpremote_path(), "connect", port, "exec", script],
                       capture_output=True, text=True, timeout=120)
    for line in r.stdout.splitlines():
        if line.startswith("STATE"):
            return json.loads(line[5:])
    raise RuntimeError("could not read the board's state on %s: %s"
                       % (port, (r.stderr or r.stdout).strip()[-300:]))


def describe(op, label):
    """One operation's progress line; label: what the firmware is ("frozen", ...)."""
    if op[0] == "romfs":
        return "romfs %s -> /rom" % os.path.relpath(op[1], ROOT)
    if op[0] == "rm":
        if op[1] == "/firmware":
            return "rm -r %s (would shadow the %s firmware)" % (op[1], label)
        if op[1] == STAGE:
            return "rm -r %s (staged by a deploy cut short)" % op[1]
        return "rm -r %s (stale .mpy)" % op[1]
    if op[0] == "cp":
        return "%s -> :%s" % (os.path.relpath(op[1], ROOT), op[2])
    if op[0] == "mkdir":
        return "mkdir " + op[1]
    return {"hold": "hold: reset into the REPL, no watchdog, firmware stopped",
            "commit": "commit: staged files moved into place, hold let go",
            "reset": "reset"}[op[0]]


def run_step(argv, port, after_reset=False):
    """One mpremote command. Right after the hold's reset the board is still booting (and
    a board on native USB is still coming back as a port): a failure to reach its raw REPL
    is tried again for a while."""
    tries = 20 if after_reset else 1
    r = subprocess.CompletedProcess(argv, 1, "", "the port %s did not come back" % port)
    for _ in range(tries):
        if after_reset:
            time.sleep(0.5)
            if not os.path.exists(port):
                continue
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        out = r.stdout + r.stderr
        if r.returncode == 0 or not ("raw repl" in out or "failed to access" in out):
            return r
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="exit codes: 0 done, 1 refused or an mpremote step "
                                       "failed, 2 bad arguments or missing files")
    p.add_argument("--port", required=True, help="serial port of the board, e.g. /dev/ttyUSB0")
    p.add_argument("--device", required=True, help="device id, as provisioned in --secrets")
    p.add_argument("--force", action="store_true",
                   help="replace another device's identity on this board")
    p.add_argument("--dry-run", action="store_true", help="print the mpremote commands only")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--frozen", action="store_true",
                       help="the board runs a firmware with manifest.py frozen in: copy no .mpy")
    where.add_argument("--romfs", action="store_true",
                       help="write the .mpy as a ROMFS image (/rom) instead of files; the "
                            "board's MicroPython must have ROMFS")
    p.add_argument("--board-state", help="with --dry-run: plan against this JSON state")
    p.add_argument("--app", action="store_true",
                   help="copy the application package build/app (make mpy APP=PATH) to /app")
    p.add_argument("--build", default=os.path.join(ROOT, "build"), help="compiled tree")
    p.add_argument("--secrets", default=os.path.join(ROOT, "secrets"),
                   help="provisioning output (default secrets/)")
    a = p.parse_args(argv)
    if a.board_state and not a.dry_run:
        p.error("--board-state needs --dry-run")
    mode = "frozen" if a.frozen else "romfs" if a.romfs else "mpy"
    try:
        files = files_to_deploy(a.build, a.secrets, a.device, mode != "mpy", a.app)
        stale = stale_paths(a.build) if mode != "mpy" else []
        image = romfs_image(a.build) if a.romfs else None
    except (FileNotFoundError, ValueError, RuntimeError, OSError,
            subprocess.TimeoutExpired) as e:
        print("deploy: %s" % e, file=sys.stderr)
        return 2
    try:
        if a.board_state:
            with open(a.board_state) as f:
                state = json.load(f)
        elif a.dry_run:
            state = {}
        else:
            state = board_state(a.port, files, stale, image)
        ops = plan(files, state, a.device, a.force, stale, image)
    except Refused as e:
        print("deploy: refused: %s" % e, file=sys.stderr)
        if not a.dry_run:
            # Reading its state stopped the board's firmware (mpremote's Ctrl-C and soft
            # reset): it is reset so that it goes back to work, as it was.
            run_step(command(a.port, [("reset",)]), a.port)
        return 1
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
        print("deploy: %s" % e, file=sys.stderr)
        return 1
    label = {"mpy": ".mpy", "frozen": "frozen", "romfs": "ROMFS"}[mode]
    warning = heap_warning(state, mode)
    if warning:
        print(warning, file=sys.stderr)
    copies = sum(1 for op in ops if op[0] == "cp")
    line = "deploy: %s to %s: %d of %d files changed" % (a.device, a.port, copies, len(files))
    if image:
        line += ", ROMFS image %s (%d bytes)" % (
            "changed" if ("romfs", image) in ops else "unchanged", os.path.getsize(image))
    print(line)
    k = 0
    all_steps = steps(ops)
    for i, step in enumerate(all_steps):
        argv_ = command(a.port, step)
        for op in step:
            k += 1
            print("[%d/%d] %s" % (k, len(ops), describe(op, label)), flush=True)
        if a.dry_run:
            print("    " + " ".join(argv_) if step[0][0] not in ("hold", "commit")
                  else "    %s %s (script)" % (" ".join(argv_[:4]), step[0][0]))
            continue
        r = run_step(argv_, a.port, after_reset=i > 0 and all_steps[i - 1][0][0] == "hold")
        if r.returncode != 0:
            print("deploy: step failed: %s\n%s" % (" ".join(argv_)[:300],
                                                  (r.stderr or r.stdout)[-500:]),
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
