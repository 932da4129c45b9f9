"""A private mosquitto for simulations and tests: free port, own config, log captured.

Host-side (CPython). Started as root, mosquitto would drop to the `mosquitto` user and lose
access to our temp files, so the config names the current user.
"""
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time


def mosquitto_path():
    for p in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if p and os.path.exists(p):
            return p
    raise RuntimeError("mosquitto not found: run 'make setup' (apt-get install mosquitto)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host, port, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listening on %s:%d after %.0f s" % (host, port, timeout))


class Mosquitto:
    """mosquitto on 127.0.0.1:port with persistence in workdir (so restarts keep sessions)."""

    def __init__(self, workdir, port=None, extra_conf="", persistence=True, anonymous=True):
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.conf_path = os.path.join(self.workdir, "mosquitto.conf")
        self.log_path = os.path.join(self.workdir, "mosquitto.log")
        lines = [
            "user %s" % pwd.getpwuid(os.getuid()).pw_name,
            "listener %d 127.0.0.1" % self.port,
            "allow_anonymous %s" % ("true" if anonymous else "false"),
            "max_queued_messages 100000",
            "log_dest file %s" % self.log_path,
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if persistence:
            lines += [
                "persistence true",
                "persistence_location %s/" % self.workdir,
                "autosave_interval 1",
            ]
        with open(self.conf_path, "w") as f:
            f.write("\n".join(lines) + "\n" + extra_conf)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [mosquitto_path(), "-c", self.conf_path],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path + ".stderr", "wb"),
            start_new_session=True,  # a terminal's Ctrl-C must not stop the broker first
        )
        try:
            wait_port(self.host, self.port)
        except RuntimeError:
            self.stop()
            raise RuntimeError("mosquitto did not start; see %s" % self.log_path)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def reload(self):
        """SIGHUP: mosquitto re-reads its password file, ACLs and TLS files."""
        self.proc.send_signal(signal.SIGHUP)

    def log(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
