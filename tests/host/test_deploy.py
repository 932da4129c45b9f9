"""tools/deploy.py without a board: mpremote cannot drive the Unix port's REPL, so the exact
mpremote operations are asserted from --dry-run, and the script that reads a board's state
runs in the Unix port against a real littlefs."""
import hashlib
import json
import os
import subprocess
import sys

from tools import deploy
from tools.devices import ROOT, micropython_path

PORT = "/dev/ttyUSB9"


def make_tree(tmp_path, device="pump-0001"):
    build = tmp_path / "build"
    (build / "firmware" / "boards").mkdir(parents=True)
    (build / "lib" / "mqtt").mkdir(parents=True)
    (build / "firmware" / "app.mpy").write_bytes(b"app v1")
    (build / "firmware" / "boards" / "esp32.mpy").write_bytes(b"board")
    (build / "lib" / "mqtt" / "client.mpy").write_bytes(b"client")
    (build / "boot.py").write_text("# boot\n")
    (build / "main.py").write_text("# main\n")
    secrets = tmp_path / "secrets"
    dev = secrets / device
    dev.mkdir(parents=True)
    (dev / "config.json").write_text(json.dumps({"device_id": device, "broker": {"host": "h"}}))
    (dev / "cert.der").write_bytes(b"cert")
    (dev / "files.json").write_text(json.dumps({"/certs/%s.der" % device: "cert.der"}))
    return build, secrets


def run(build, secrets, *args, device="pump-0001"):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "deploy.py"), "--port", PORT, "--device",
         device, "--build", str(build), "--secrets", str(secrets), "--dry-run", *args],
        capture_output=True, text=True, timeout=60)
    cmds = [l.strip().split() for l in r.stdout.splitlines() if l.startswith("    ")]
    return r, [c[1:] for c in cmds]  # without the mpremote path


def test_first_deploy_writes_everything_config_last_then_resets(tmp_path):
    build, secrets = make_tree(tmp_path)
    r, cmds = run(build, secrets)
    assert r.returncode == 0, r.stderr
    c = ["connect", PORT]
    assert cmds == [
        c + ["fs", "mkdir", ":/firmware"],
        c + ["fs", "mkdir", ":/firmware/boards"],
        c + ["fs", "mkdir", ":/lib"],
        c + ["fs", "mkdir", ":/lib/mqtt"],
        c + ["fs", "mkdir", ":/certs"],
        c + ["fs", "cp", "-f", str(build / "firmware" / "app.mpy"), ":/firmware/app.mpy"],
        c + ["fs", "cp", "-f", str(build / "firmware" / "boards" / "esp32.mpy"),
             ":/firmware/boards/esp32.mpy"],
        c + ["fs", "cp", "-f", str(build / "lib" / "mqtt" / "client.mpy"), ":/lib/mqtt/client.mpy"],
        c + ["fs", "cp", "-f", str(build / "boot.py"), ":/boot.py"],
        c + ["fs", "cp", "-f", str(build / "main.py"), ":/main.py"],
        c + ["fs", "cp", "-f", str(secrets / "pump-0001" / "cert.der"), ":/certs/pump-0001.der"],
        c + ["fs", "cp", "-f", str(secrets / "pump-0001" / "config.json"), ":/config.json"],
        c + ["reset"],
    ]
    assert "[1/13] mkdir /firmware" in r.stdout and "7 of 7 files changed" in r.stdout


def state_after(files, device):
    return {"device_id": device, "dirs": deploy.parents(r for _, r in files),
            "hashes": {r: deploy.sha256_file(l) for l, r in files}}


def test_second_deploy_copies_only_what_changed(tmp_path):
    build, secrets = make_tree(tmp_path)
    files = deploy.files_to_deploy(str(build), str(secrets), "pump-0001")
    state = tmp_path / "state.json"
    state.write_text(json.dumps(state_after(files, "pump-0001")))
    r, cmds = run(build, secrets, "--board-state", str(state))
    assert r.returncode == 0 and cmds == [["connect", PORT, "reset"]], r.stdout
    (build / "firmware" / "app.mpy").write_bytes(b"app v2")
    r, cmds = run(build, secrets, "--board-state", str(state))
    assert cmds == [
        ["connect", PORT, "fs", "cp", "-f", str(build / "firmware" / "app.mpy"), ":/firmware/app.mpy"],
        ["connect", PORT, "reset"],
    ]
    assert "1 of 7 files changed" in r.stdout


def test_another_devices_board_is_refused_unless_forced(tmp_path):
    build, secrets = make_tree(tmp_path)
    files = deploy.files_to_deploy(str(build), str(secrets), "pump-0001")
    state = tmp_path / "state.json"
    other = state_after(files, "pump-0002")
    other["hashes"]["/config.json"] = "0" * 64  # the other device's config
    state.write_text(json.dumps(other))
    r, cmds = run(build, secrets, "--board-state", str(state))
    assert r.returncode == 1 and cmds == [], r.stdout
    assert "pump-0002" in r.stderr and "--force" in r.stderr
    r, cmds = run(build, secrets, "--board-state", str(state), "--force")
    assert r.returncode == 0
    # Same firmware, other identity: only the config is written.
    assert cmds == [
        ["connect", PORT, "fs", "cp", "-f", str(secrets / "pump-0001" / "config.json"),
         ":/config.json"],
        ["connect", PORT, "reset"],
    ]


def test_missing_build_or_provisioning_is_a_clear_error(tmp_path):
    build, secrets = make_tree(tmp_path)
    r, _ = run(build, secrets, device="pump-0009")
    assert r.returncode == 2 and "provision" in r.stderr
    r, _ = run(tmp_path / "nothing", secrets)
    assert r.returncode == 2 and "make mpy" in r.stderr


def test_the_state_script_reads_a_littlefs_board(tmp_path):
    # The board side of the deploy, in the Unix port: a littlefs flash mounted as the root.
    files = {"/config.json": json.dumps({"device_id": "pump-0003"}).encode(),
             "/firmware/app.mpy": b"\x4d\x06" + bytes(range(256)) * 5}
    script = deploy.STATE_SCRIPT % (json.dumps(list(files) + ["/lib/none.mpy"]),
                                    json.dumps(["/firmware", "/lib"]))
    setup = (
        "import vfs\n"
        "class B:\n"
        "    def __init__(s): s.d = bytearray(64 * 512)\n"
        "    def readblocks(s, b, buf, o=0): buf[:] = s.d[b * 512 + o:b * 512 + o + len(buf)]\n"
        "    def writeblocks(s, b, buf, o=0): s.d[b * 512 + o:b * 512 + o + len(buf)] = buf\n"
        "    def ioctl(s, op, a): return {4: 64, 5: 512}.get(op, 0)\n"
        "bd = B()\nvfs.VfsLfs2.mkfs(bd)\nvfs.mount(vfs.VfsLfs2(bd), '/')\n"
        "import os\nos.mkdir('/firmware')\n"
        + "".join("with open(%r, 'wb') as f:\n    f.write(%r)\n" % (p, d)
                  for p, d in files.items())
    )
    path = tmp_path / "state.py"
    path.write_text(setup + script)
    r = subprocess.run([micropython_path(), str(path)], capture_output=True, text=True, timeout=30)
    line = [l for l in r.stdout.splitlines() if l.startswith("STATE")]
    assert line, r.stdout + r.stderr
    state = json.loads(line[0][5:])
    assert state["device_id"] == "pump-0003"
    assert state["dirs"] == ["/firmware"]
    for p, d in files.items():
        assert state["hashes"][p] == hashlib.sha256(d).hexdigest()
    assert state["hashes"]["/lib/none.mpy"] is None


def test_a_frozen_firmware_gets_no_bytecode_copied(tmp_path):
    build, secrets = make_tree(tmp_path)
    r, cmds = run(build, secrets, "--frozen")
    assert r.returncode == 0
    assert [c[-1] for c in cmds] == [":/certs", ":/boot.py", ":/main.py", ":/certs/pump-0001.der",
                                     ":/config.json", "reset"]
