"""Start firmware instances on the MicroPython Unix port (host-side, CPython).

One DeviceProcess is one `micropython main.py` process driving one or more boards, each
with its own littlefs flash image and bootstrap config, as a fleet simulator needs.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micropython_path():
    venv = os.path.join(ROOT, ".venv", "bin", "micropython")
    if os.path.exists(venv):
        return venv
    here = os.path.join(os.path.dirname(sys.executable), "micropython")
    if os.path.exists(here):
        return here
    raise RuntimeError("micropython not found: run 'make setup'")


def device_config(device_id, broker_host, broker_port, **over):
    """A bootstrap config (README "Bootstrap config") for a simulated device."""
    cfg = {
        "device_id": device_id,
        "broker": {"host": broker_host, "port": broker_port, "keepalive": 30},
        "telemetry_interval": 1,
    }
    broker = over.pop("broker", None)
    if broker:
        cfg["broker"].update(broker)
    cfg.update(over)
    return cfg


class Spec:
    """One simulated board: flash image path and, optionally, files to put on it first."""

    def __init__(self, image, config=None, raw_config=None, files=None):
        self.image = image
        self.config = config
        self.raw_config = raw_config
        self.files = files or {}


class DeviceProcess:
    def __init__(self, specs, workdir, heapsize=None, flash_size=None, echo=None, env=None,
                 main=None):
        self.specs = specs
        self.workdir = workdir
        self.heapsize = heapsize
        self.flash_size = flash_size
        self.echo = echo  # callable(line) for live output, or None
        self.env = env
        self.main = main or os.path.join(ROOT, "main.py")  # or a build/ main.py
        self.lines = []
        self.cond = threading.Condition()
        self.proc = None

    def argv(self):
        args = [micropython_path()]
        if self.heapsize:
            args += ["-X", "heapsize=%s" % self.heapsize]
        args.append(self.main)
        if self.flash_size:
            args += ["--flash-size", str(self.flash_size)]
        for i, s in enumerate(self.specs):
            args += ["--flash", s.image]
            files = dict(s.files)
            if s.config is not None or s.raw_config is not None:
                text = s.raw_config if s.raw_config is not None else json.dumps(s.config)
                path = s.image + ".config.json"
                with open(path, "w") as f:
                    f.write(text)
                files["/config.json"] = path
            for dest, src in files.items():
                args += ["--put", "%s=%s" % (dest, src)]
        return args

    def start(self):
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            # Own process group: a terminal's Ctrl-C reaches the simulator alone, which then
            # stops each device once (a second SIGINT would cut its graceful stop short).
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
            if self.echo:
                self.echo(line)

    def output(self):
        with self.cond:
            return "\n".join(self.lines)

    def wait_line(self, pattern, timeout=10.0, count=1):
        """Block until `count` output lines match the regex; return the matches."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                hits = [l for l in self.lines if rx.search(l)]
                if len(hits) >= count:
                    return hits
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        "no %d line(s) matching %r in %.0f s; output:\n%s"
                        % (count, pattern, timeout, "\n".join(self.lines[-40:]))
                    )
                self.cond.wait(left)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout=5.0):
        """Graceful stop (SIGINT is the Unix port's Ctrl-C), then SIGKILL if it lingers."""
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        if self.alive():
            self.proc.kill()
        if self.proc:
            self.proc.wait()
