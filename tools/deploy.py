"""Deploy the compiled firmware and one device's identity onto a board with mpremote.

    python tools/deploy.py --port /dev/ttyUSB0 --device pump-0042 [--force] [--dry-run]
                           [--build build] [--secrets secrets] [--board-state FILE]

What goes onto the board's flash: build/firmware/**.mpy to /firmware, build/lib/**.mpy to
/lib (on the board's import path), boot.py and main.py to /, and from provisioning
(tools/provision.py, secrets/<device>/) config.json to /config.json plus the files its
files.json names (TLS key and certificates). Then a reset.

Safe by default:
- The board is asked first (one mpremote `exec`) for the device id of its /config.json and
  the SHA-256 of every file the deploy would write. A board that already is another device
  is refused unless --force: replacing an identity takes the other device's place on the
  broker (same client id) and its data.
- Only files whose hash differs are copied, so a second deploy copies what changed.
- Progress: one line per operation, "[k/n] ...".

--dry-run prints the mpremote commands instead of running them (no board needed); with
--board-state FILE (JSON {"device_id": ..., "hashes": {remote path: hex}, "dirs": [...]})
it plans against that state instead of asking a board. mpremote cannot drive the Unix
port's REPL (it has no raw REPL), so tests check the exact plan this way.
Exit codes: 0 done, 1 refused (identity) or a failed mpremote step, 2 bad arguments or
missing build/provisioning files.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.devices import venv_tool  # noqa: E402

# Runs on the board: the current identity and the hashes of the files to be written.
STATE_SCRIPT = """
import json, os, hashlib
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
    return ''.join('%%02x' %% x for x in h.digest())
def _isdir(p):
    try:
        return os.stat(p)[0] & 0x4000 != 0
    except OSError:
        return False
try:
    _id = json.load(open('/config.json')).get('device_id')
except Exception:
    _id = None
print('STATE' + json.dumps({'device_id': _id, 'hashes': {p: _h(p) for p in %s},
                           'dirs': [d for d in %s if _isdir(d)]}))
"""


class Refused(Exception):
    pass


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def files_to_deploy(build, secrets, device, frozen=False):
    """[(local path, remote path)] in copy order; raises FileNotFoundError naming what is
    missing (run `make mpy` / tools/provision.py first). frozen: the board runs a build with
    manifest.py frozen in, so no .mpy is copied (files in / would come before `.frozen` on
    sys.path and shadow the frozen modules)."""
    out = []
    for top in () if frozen else ("firmware", "lib"):
        base = os.path.join(build, top)
        if not os.path.isdir(base):
            raise FileNotFoundError("%s: no compiled firmware (run make mpy)" % base)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(".mpy"):
                    local = os.path.join(dirpath, name)
                    out.append((local, "/" + os.path.relpath(local, build).replace(os.sep, "/")))
    for name in ("boot.py", "main.py"):
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


def plan(files, state, device, force=False):
    """The operations that bring a board in `state` to `files`: [("mkdir", remote),
    ("cp", local, remote), ..., ("reset",)]. Raises Refused for another device's board."""
    have = state.get("device_id")
    if have and have != device and not force:
        raise Refused("the board is device %r; deploying %r would replace its identity "
                      "(use --force / FORCE=1 if that is what you want)" % (have, device))
    ops = [("mkdir", d) for d in parents(r for _, r in files) if d not in state.get("dirs", ())]
    hashes = state.get("hashes", {})
    for local, remote in files:
        if hashes.get(remote) != sha256_file(local):
            ops.append(("cp", local, remote))
    ops.append(("reset",))
    return ops


def mpremote_path():
    try:
        return venv_tool("mpremote")
    except RuntimeError:
        return "mpremote"  # one on PATH, as an operator without the venv has it


def command(port, op):
    """The mpremote argv of one operation."""
    base = [mpremote_path(), "connect", port]
    if op[0] == "mkdir":
        return base + ["fs", "mkdir", ":" + op[1]]
    if op[0] == "cp":
        # -f: the hash was compared already; the copy must happen.
        return base + ["fs", "cp", "-f", op[1], ":" + op[2]]
    if op[0] == "reset":
        return base + ["reset"]
    raise ValueError(op)


def board_state(port, files):
    remote = [r for _, r in files]
    script = STATE_SCRIPT % (json.dumps(remote), json.dumps(parents(remote)))
    r = subprocess.run([mpremote_path(), "connect", port, "exec", script],
                       capture_output=True, text=True, timeout=120)
    for line in r.stdout.splitlines():
        if line.startswith("STATE"):
            return json.loads(line[5:])
    raise RuntimeError("could not read the board's state on %s: %s"
                       % (port, (r.stderr or r.stdout).strip()[-300:]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="exit codes: 0 done, 1 refused or an mpremote step "
                                       "failed, 2 bad arguments or missing files")
    p.add_argument("--port", required=True, help="serial port of the board, e.g. /dev/ttyUSB0")
    p.add_argument("--device", required=True, help="device id, as provisioned in --secrets")
    p.add_argument("--force", action="store_true",
                   help="replace another device's identity on this board")
    p.add_argument("--dry-run", action="store_true", help="print the mpremote commands only")
    p.add_argument("--frozen", action="store_true",
                   help="the board runs a firmware with manifest.py frozen in: copy no .mpy")
    p.add_argument("--board-state", help="with --dry-run: plan against this JSON state")
    p.add_argument("--build", default=os.path.join(ROOT, "build"), help="compiled tree")
    p.add_argument("--secrets", default=os.path.join(ROOT, "secrets"),
                   help="provisioning output (default secrets/)")
    a = p.parse_args(argv)
    if a.board_state and not a.dry_run:
        p.error("--board-state needs --dry-run")
    try:
        files = files_to_deploy(a.build, a.secrets, a.device, a.frozen)
    except (FileNotFoundError, ValueError) as e:
        print("deploy: %s" % e, file=sys.stderr)
        return 2
    try:
        if a.board_state:
            with open(a.board_state) as f:
                state = json.load(f)
        elif a.dry_run:
            state = {}
        else:
            state = board_state(a.port, files)
        ops = plan(files, state, a.device, a.force)
    except Refused as e:
        print("deploy: refused: %s" % e, file=sys.stderr)
        return 1
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
        print("deploy: %s" % e, file=sys.stderr)
        return 1
    copies = sum(1 for op in ops if op[0] == "cp")
    print("deploy: %s to %s: %d of %d files changed" % (a.device, a.port, copies, len(files)))
    for k, op in enumerate(ops, 1):
        argv_ = command(a.port, op)
        what = {"mkdir": lambda: "mkdir " + op[1],
                "cp": lambda: "%s -> :%s" % (os.path.relpath(op[1], ROOT), op[2]),
                "reset": lambda: "reset"}[op[0]]()
        print("[%d/%d] %s" % (k, len(ops), what), flush=True)
        if a.dry_run:
            print("    " + " ".join(argv_))
            continue
        r = subprocess.run(argv_, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            print("deploy: step failed: %s\n%s" % (" ".join(argv_), (r.stderr or r.stdout)[-500:]),
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
