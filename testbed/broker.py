"""A private mosquitto for simulations and tests: free port, own config, log captured.

Host-side (CPython). Started as root, mosquitto would drop to the `mosquitto` user and lose
access to our temp files, so the config names the current user.
"""
import base64
import glob
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time


def mosquitto_path():
    for p in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if p and os.path.exists(p):
            return p
    raise RuntimeError("mosquitto not found: run 'make setup' (apt-get install mosquitto)")


def dynsec_plugin_path():
    """mosquitto's dynamic-security plugin (in Debian's mosquitto package since 2.0)."""
    for p in (glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")
              + glob.glob("/usr/lib/mosquitto*/mosquitto_dynamic_security.so")
              + ["/usr/lib/mosquitto_dynamic_security.so",
                 "/usr/local/lib/mosquitto_dynamic_security.so"]):
        if os.path.exists(p):
            return p
    raise RuntimeError("mosquitto_dynamic_security.so not found (mosquitto 2.0 or newer)")


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


class _Broker:
    """What every broker process here does alike; a subclass has start(), stop(),
    log_path."""

    def restart(self):
        """stop() and start() on the same port (what survives depends on the broker)."""
        self.stop()
        return self.start()

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Mosquitto(_Broker):
    """mosquitto on 127.0.0.1:port with persistence in workdir (so restarts keep sessions)."""

    def __init__(self, workdir, port=None, extra_conf="", persistence=True, anonymous=None,
                 passwords=None, acl=None, dynsec=None):
        """Access control, all optional (with any of it anonymous defaults to False):
        passwords: {user: password}, hashed into a password file with mosquitto_passwd;
        acl: the text of an ACL file (mosquitto.conf(5) acl_file: `user`, `topic`, `pattern`
        lines). mosquitto 2.0 checks an ACL file on delivery only: a denied SUBSCRIBE is
        still granted (its messages never arrive) and a denied QoS 1 PUBLISH acknowledged
        and dropped.
        dynsec: the dynamic-security plugin's JSON document ({"clients": [...], "roles":
        [...], "defaultACLAccess": {...}}, see mosquitto.org/documentation/dynamic-security)
        with each client's "password" in clear (hashed here as the plugin does). It checks
        subscriptions too: a denied one gets SUBACK 0x80. Its ACL topics take no %c/%u in
        2.0, so give each device a role of its own."""
        if anonymous is None:
            anonymous = not (passwords or dynsec)
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
        if passwords:
            lines.append("password_file %s" % self._password_file(passwords))
        if acl is not None:
            acl_path = os.path.join(self.workdir, "acl")
            with open(acl_path, "w") as f:
                f.write(acl)
            lines.append("acl_file %s" % acl_path)
        if dynsec is not None:
            lines.append("plugin %s" % dynsec_plugin_path())
            lines.append("plugin_opt_config_file %s" % self._dynsec_file(dynsec))
        if persistence:
            lines += [
                "persistence true",
                "persistence_location %s/" % self.workdir,
                "autosave_interval 1",
            ]
        with open(self.conf_path, "w") as f:
            f.write("\n".join(lines) + "\n" + extra_conf)
        self.proc = None

    def _password_file(self, passwords):
        """user:password lines, hashed in place (`mosquitto_passwd -U`), so no password
        appears on a command line."""
        path = os.path.join(self.workdir, "passwd")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            for user, pw in passwords.items():
                f.write("%s:%s\n" % (user, pw))
        tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        subprocess.run([tool, "-U", path], check=True, capture_output=True)
        return path

    def _dynsec_file(self, doc):
        doc = dict(doc)
        clients = []
        for c in doc.get("clients", []):
            c = dict(c)
            if "password" in c and "salt" not in c:
                # The plugin's own scheme (mosquitto_ctrl dynsec): PBKDF2-HMAC-SHA512.
                salt = os.urandom(12)
                c["password"] = base64.b64encode(hashlib.pbkdf2_hmac(
                    "sha512", c["password"].encode(), salt, 101, 64)).decode()
                c["salt"] = base64.b64encode(salt).decode()
                c["iterations"] = 101
            clients.append(c)
        doc["clients"] = clients
        doc.setdefault("defaultACLAccess", {"publishClientSend": False,
                                            "publishClientReceive": False,
                                            "subscribe": False, "unsubscribe": True})
        path = os.path.join(self.workdir, "dynamic-security.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        return path

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

def amqtt_path():
    """The `amqtt` broker command that `make setup` installs into the venv (requirements-dev.txt)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for p in (os.path.join(root, ".venv", "bin", "amqtt"),
              os.path.join(os.path.dirname(sys.executable), "amqtt"),
              shutil.which("amqtt")):
        if p and os.path.exists(p):
            return p
    raise RuntimeError("amqtt not found: run 'make setup' (amqtt is in requirements-dev.txt)")


class Amqtt(_Broker):
    """amqtt (a pure-Python MQTT 3.1.1 broker from PyPI) on 127.0.0.1:port, the same shape
    as Mosquitto: start(), host/port, stop(), restart(), log_path, log().

    What differs, and matters to a device (README "Other MQTT brokers"):
    - In memory only: stop() or restart() loses every session, queued message and retained
      message. stop() is SIGKILL: amqtt ignores SIGINT when started in the background, and
      there is nothing on disk a graceful stop would save.
    - A client that logs in anonymously gets no offline queue and its session is dropped a
      second after it disconnects; with anonymous allowed, amqtt counts every client as
      anonymous, even one with a username. So by default (anonymous=False) a username is
      required and any password is accepted, which gives each device a kept session;
      passwords={user: password} checks them (argon2 hashes in a password file);
      anonymous=True is amqtt's own default.
    - On every CONNECT it sends the connecting client each retained message that matches
      any client's subscription, its own or not (QoS 0, retain flag set)."""

    def __init__(self, workdir, port=None, anonymous=False, passwords=None, debug=False):
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.conf_path = os.path.join(self.workdir, "amqtt.yaml")
        self.log_path = os.path.join(self.workdir, "amqtt.log")
        self.debug = debug  # -d: every packet in the log (large)
        if passwords:
            auth = {"amqtt.plugins.authentication.FileAuthPlugin":
                    {"password_file": self._password_file(passwords)}}
        else:
            auth = {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                    {"allow_anonymous": bool(anonymous)}}
        conf = {
            "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:%d" % self.port}},
            "plugins": auth,  # no $SYS plugin: nothing publishes unasked
        }
        with open(self.conf_path, "w") as f:
            json.dump(conf, f, indent=1)  # JSON is YAML
        self.proc = None
        self.starts = 0

    def _password_file(self, passwords):
        from pwdlib.hashers.argon2 import Argon2Hasher  # an amqtt dependency: in the venv
        path = os.path.join(self.workdir, "passwd")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            for user, pw in passwords.items():
                f.write("%s:%s\n" % (user, Argon2Hasher().hash(pw)))
        return path

    def start(self):
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(b"---- start %d\n" % self.starts)
        log.flush()
        self.proc = subprocess.Popen(
            [amqtt_path(), "-c", self.conf_path] + (["-d"] if self.debug else []),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            wait_port(self.host, self.port, timeout=30)  # a busy host imports it slowly
        except RuntimeError:
            self.stop()
            raise RuntimeError("amqtt did not start; see %s" % self.log_path)
        return self

    def stop(self):
        """SIGKILL (see the class): every connection drops, everything in memory is gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

