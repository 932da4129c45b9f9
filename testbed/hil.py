"""`make hil`: hardware in the loop. Deploys the build to a board, runs the MicroPython unit
tests (tests/mpy) on it through mpremote, then lets it run for a soak against a broker with
one outage through the fault proxy on this host, and prints one JSON line.

    python testbed/hil.py [--port /dev/ttyACM0] [--broker HOST:PORT] [--soak S]
                          [--wifi SSID] [--host-ip IP] [--outage S] [--console FILE]

Without --port it starts the board on a pty (tools/ptyboard.py), without --broker a local
mosquitto: that is how `make test` runs it, so it works the first time a board is plugged
in. The board reaches the broker through the fault proxy here, at --host-ip (default: this
host's address on the route to the broker; 127.0.0.1 for the board on a pty). Wi-Fi:
--wifi SSID with the password in $HIL_WIFI_PASSWORD (tools/provision.py --wifi). The
device is provisioned as hil-XXXXXX in a temporary directory and deployed with --force:
a board given to hil is a test board.

The JSON line: tests_passed, tests_failed, failed (their names), heap_free_boot
(gc.mem_free() over the raw REPL after a soft reset: boot.py run, main.py not),
heap_held (median heap_alloc of its health reports), boot_to_first_publish_ms (from the
reset that starts the firmware to its first message at the broker, measured here),
reconnected_after_outage, gaps and duplicates (of its telemetry, per (boot, seq)),
telemetry, reset_causes (of every boot seen), outage_s, soak_s. Exit status 0 when every
test passed, the device came back after the outage and no telemetry was lost.
"""
import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testbed.broker import Mosquitto  # noqa: E402
from testbed.ledger import Ledger  # noqa: E402
from testbed.observer import Observer  # noqa: E402
from testbed.proxy import FaultProxy  # noqa: E402
from tools.deploy import HOLD, HOLD_SCRIPT, run_step  # noqa: E402
from tools.venv import venv_tool  # noqa: E402

TESTS = os.path.join(ROOT, "tests", "mpy")
# Runs one test module on the board: the host's checkout is mounted at /remote (mpremote
# mount, the working directory) for the test modules and the files they read; the board's
# root comes first on sys.path, so the tests use the firmware and libraries deployed there,
# and the mount's root is not on it: every import of a module a file may override (json,
# os, time...) looks in each entry, and each remote one costs round trips over the link.
# Their flash images go to /tmp on the board.
BOOTSTRAP = """import sys, os
try:
    os.mkdir('/tmp')
except OSError:
    pass
sys.path[:] = ['/', '/remote/tests/mpy', '.frozen', '/lib']
import mpyutil
mpyutil.run_module(__import__(%r), %r)
"""
# What a board cannot do that these tests do, by (module, test): not run, and reported as
# skipped with the reason.
ON_A_HOST = "counts the process's open files in /proc/self/fd, which a board has not"
SKIP = {
    ("test_ntp", "test_cancelled_query_closes_its_socket"): ON_A_HOST,
    ("test_ntp", "test_query_returns_the_servers_time"): ON_A_HOST,
    ("test_ntp", "test_query_times_out_when_every_reply_has_a_wrong_originate"): ON_A_HOST,
    ("test_ntp", "test_query_ignores_a_spoofed_reply_and_takes_the_real_one"): ON_A_HOST,
    ("test_ntp", "test_module_stays_off_the_hardware"):
        "a board's boot.py has imported machine (the loader arms the watchdog with it)",
}
# And on the board on a pty only, where /tmp is a host directory (ptyboard --tmp).
PTY_SKIP = {
    ("test_otaboot", "test_a_deploy_commit_cut_short_is_completed_at_the_next_boot"):
        "renames files in /tmp, a host directory mounted with a root on the board on a pty, "
        "where this Unix port's VfsPosix rename fails with ENOENT",
}


def mpremote(port, *args, timeout=120):
    return subprocess.run([venv_tool("mpremote"), "connect", port, *args],
                          capture_output=True, text=True, timeout=timeout)


def run_tests(port, log, only=None, skips=SKIP):
    """(passed, [failed names], {skipped name: why}) of the tests/mpy modules run on the
    board (`only`: these modules), but the `skips`."""
    passed, failed = 0, []
    skipped = {"%s::%s" % k: why for k, why in skips.items() if only is None or k[0] in only}
    for name in sorted(os.listdir(TESTS)):
        mod = name[:-3]
        if not (name.startswith("test_") and name.endswith(".py")) or (
                only is not None and mod not in only):
            continue
        skip = tuple(t for m, t in skips if m == mod)
        try:
            r = mpremote(port, "mount", ROOT, "exec", BOOTSTRAP % (mod, skip), timeout=600)
            out = r.stdout
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            out = out.decode() if isinstance(out, bytes) else out
        results = [json.loads(l[6:]) for l in out.splitlines() if l.startswith("@@MPY ")]
        if not results:
            failed.append(mod)
            log("%s: no results: %s" % (mod, (r.stderr or r.stdout)[-400:]))
            continue
        for res in results:
            if res["ok"]:
                passed += 1
            else:
                failed.append("%s::%s" % (mod, res["name"]))
                log("FAILED %s::%s\n%s" % (mod, res["name"], res["tb"]))
        log("%s: %d passed, %d failed" % (mod, sum(1 for x in results if x["ok"]),
                                          sum(1 for x in results if not x["ok"])))
    return passed, failed, skipped


def host_ip_towards(host):
    """This host's address on the route to `host` (no packet is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((host, 9))
        return s.getsockname()[0]
    finally:
        s.close()


class PtyBoard:
    def __init__(self, workdir, console=None):
        flash = os.path.join(workdir, "board.img")
        self.port = flash + ".tty"
        # The unit tests' own flash images (1 MiB each) go to /tmp, a host directory here:
        # inside the board's littlefs, test_otaboot alone took 8 minutes.
        tmp = os.path.join(workdir, "tmp")
        os.makedirs(tmp)
        argv = [sys.executable, os.path.join(ROOT, "tools", "ptyboard.py"), flash, "--tmp", tmp]
        if console:
            argv += ["--console", console]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline()
        if self.port not in first:
            raise RuntimeError("ptyboard did not start: %r" % first)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", help="the board's serial port (default: a board on a pty)")
    p.add_argument("--broker", help="HOST:PORT of the broker (default: a local mosquitto)")
    p.add_argument("--soak", type=float, default=float(os.environ.get("HIL_S") or 600),
                   help="seconds of soak (default $HIL_S or 600)")
    p.add_argument("--outage", type=float, help="seconds of the outage (default soak/10, "
                                                "at least 2, at most 60)")
    p.add_argument("--wifi", help="SSID (password in $HIL_WIFI_PASSWORD)")
    p.add_argument("--host-ip", help="this host's address as the board reaches it")
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--console", help="with the board on a pty: its console to this file")
    p.add_argument("--quiet", action="store_true", help="only the JSON line on stdout")
    p.add_argument("--only", help="these tests/mpy modules only (comma-separated names)")
    a = p.parse_args(argv)
    log = (lambda s: None) if a.quiet else (lambda s: print("hil: " + s, file=sys.stderr,
                                                            flush=True))
    outage = a.outage if a.outage is not None else min(60.0, max(2.0, a.soak / 10))
    work = tempfile.mkdtemp(prefix="hil-")
    board = broker = proxy = observer = None
    try:
        if a.port:
            port = a.port
        else:
            board = PtyBoard(work, a.console)
            port = board.port
        if a.broker:
            bhost, _, bport = a.broker.rpartition(":")
            bport = int(bport)
        else:
            broker = Mosquitto(os.path.join(work, "broker")).start()
            bhost, bport = broker.host, broker.port
        host_ip = a.host_ip or ("127.0.0.1" if board else host_ip_towards(bhost))
        proxy = FaultProxy(bhost, bport, host="127.0.0.1" if board else "0.0.0.0",
                           record=False).start()
        device = "hil-%06x" % random.getrandbits(24)
        secrets = os.path.join(work, "secrets")
        argv_ = [sys.executable, os.path.join(ROOT, "tools", "provision.py"), device,
                 "--broker", "%s:%d" % (host_ip, proxy.port), "--out", secrets]
        if a.wifi:
            argv_ += ["--wifi", a.wifi + ":HIL_WIFI_PASSWORD"]
        r = subprocess.run(argv_, capture_output=True, text=True, timeout=60)
        if r.returncode:
            raise RuntimeError("provision: " + r.stderr.strip())
        cfg_path = os.path.join(secrets, device, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg.update(telemetry_interval=1, health_interval=5)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)

        log("deploying %s to %s" % (device, port))
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "deploy.py"), "--port",
                            port, "--device", device, "--build", a.build, "--secrets", secrets,
                            "--force"], capture_output=True, text=True, timeout=600)
        if r.returncode:
            raise RuntimeError("deploy: " + (r.stderr or r.stdout).strip()[-600:])
        r = mpremote(port, "exec", "import gc; gc.collect(); print(gc.mem_free())")
        heap_free_boot = int(r.stdout.split()[-1]) if r.stdout.split() else None

        # The firmware now runs, its watchdog armed: the tests would be reset halfway through,
        # as a deploy would. Held as a deploy holds it, the board runs none of it.
        r = mpremote(port, "exec", "--no-follow", HOLD_SCRIPT)
        if r.returncode:
            raise RuntimeError("hold: " + (r.stderr or r.stdout).strip()[-300:])
        run_step([venv_tool("mpremote"), "connect", port, "exec", "pass"], port, after_reset=True)
        log("running tests/mpy on the board")
        passed, failed, skipped = run_tests(port, log, a.only and a.only.split(","),
                                            {**SKIP, **PTY_SKIP} if board else SKIP)
        r = mpremote(port, "exec", "import os; os.remove(%r)" % HOLD)

        ledger = Ledger()
        causes = {}
        health = []
        first = []
        topic = "devices/%s/" % device

        def seen(t, top, payload, retain):
            if retain or not top.startswith(topic):
                return
            if not first:
                first.append(t)  # when the firmware's first message arrived
            kind = top[len(topic):]
            try:
                doc = json.loads(payload)
            except ValueError:
                return
            if kind == "telemetry":
                ledger.telemetry(device, doc)
            elif kind == "status":
                ledger.status[device] = doc
                if "cause" in doc:  # the last will has none
                    causes[doc.get("boot")] = doc["cause"]
            elif kind == "health":
                health.append(doc)

        observer = Observer(bhost, bport, topics=(topic + "#",), on_message=seen, record=False)
        log("soak: %.0f s, an outage of %.0f s" % (a.soak, outage))
        t0 = time.monotonic()
        mpremote(port, "reset")
        while not first and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        boot_ms = round((first[0] - t0) * 1000) if first else None
        time.sleep(max(0.0, a.soak / 3 - (time.monotonic() - t0)))
        proxy.refuse()
        proxy.cut()
        time.sleep(outage)
        proxy.refuse(False)
        back = time.monotonic()
        before = ledger.received
        while time.monotonic() - back < 120 and ledger.received == before:
            time.sleep(0.1)
        reconnected = ledger.received > before
        time.sleep(max(0.0, a.soak - (time.monotonic() - t0)))
        # What was queued during the outage arrives in order: wait until nothing is missing.
        end = time.monotonic() + 60
        while ledger.gaps() and time.monotonic() < end:
            time.sleep(0.2)
        out = {
            "port": port, "device": device,
            "tests_passed": passed, "tests_failed": len(failed), "failed": failed,
            "tests_skipped": len(skipped), "skipped": skipped,
            "heap_free_boot": heap_free_boot,
            "heap_held": statistics.median([h["heap_alloc"] for h in health]) if health
            else None,
            "boot_to_first_publish_ms": boot_ms,
            "reconnected_after_outage": reconnected,
            "gaps": ledger.gaps(), "duplicates": ledger.duplicates,
            "telemetry": ledger.received,
            "reset_causes": [causes[b] for b in sorted(causes, key=lambda b: b or 0)],
            "outage_s": outage, "soak_s": a.soak,
        }
        print(json.dumps(out), flush=True)
        ok = not failed and reconnected and out["gaps"] == 0 and ledger.received > 0
        return 0 if ok else 1
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print("hil: %s" % e, file=sys.stderr)
        return 2
    finally:
        for x in (observer, proxy, broker, board):
            if x is not None:
                try:
                    x.close() if x is observer else x.stop()
                except Exception:  # noqa: BLE001
                    pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
