"""Provision one device: its bootstrap /config.json and, with --tls, a client key and a
certificate signed by the fleet CA, written to a directory git ignores (README "Provisioning").

    python tools/provision.py DEVICE_ID --broker HOST[:PORT] [--user U]
        [--password-env VAR | --password-file F | --generate-password]
        [--wifi SSID[:PASSWORD_ENV]]... [--group G]... [--prefix P]
        [--tls --ca-cert CA.pem --ca-key CA.key [--ca-pass-env VAR] [--server-hostname H]
         [--days N]] [--ota-key HEX_OR_PUBFILE]... [--out DIR] [--force]

Writes DIR/DEVICE_ID/ (DIR defaults to secrets/ in this repo, as tools/deploy.py's
--secrets does): config.json (for /config.json), files.json (device path -> local file for the
other files, for the deploy step) and, with --tls, ca.der, cert.der, key.der. The
directory is 0700 and every file in it 0600. Secrets are never printed.
Exit status: 0 done, 2 bad arguments or values (nothing written), 1 anything else
(existing directory, directory not ignored by git, unreadable files, openssl missing/failed).
"""
import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The device's own validator, so a config this tool accepts is one the device boots from.
from firmware.bootconfig import MAX_BYTES, ConfigError, validate  # noqa: E402

CERT_DIR = "/certs"
CA_PATH = CERT_DIR + "/ca.der"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# What the tool writes, so an existing directory can be recognised as one of ours.
OURS = ("config.json", "files.json", "ca.der", "cert.der", "key.der")


class Usage(Exception):
    """Bad arguments or values: exit 2, nothing written."""


class Fail(Exception):
    """Cannot go on (filesystem, git, openssl): exit 1, nothing written."""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="provision.py",
        description="Create one device's bootstrap config and TLS files in a git-ignored dir.")
    p.add_argument("device_id")
    p.add_argument("--broker", required=True, metavar="HOST[:PORT]",
                   help="port defaults to 8883 with --tls, else 1883; IPv6 as [addr]:port")
    p.add_argument("--user")
    pw = p.add_mutually_exclusive_group()
    pw.add_argument("--password-env", metavar="VAR", help="broker password from this variable")
    pw.add_argument("--password-file", metavar="F", help="broker password from this file")
    pw.add_argument("--generate-password", action="store_true",
                    help="random broker password (read it from config.json for the broker)")
    p.add_argument("--wifi", action="append", default=[], metavar="SSID[:PASSWORD_ENV]",
                   help="repeatable; the password is read from the variable; 'SSID:' is open")
    p.add_argument("--group", action="append", default=[], metavar="G")
    p.add_argument("--prefix")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--ca-cert", metavar="CA.pem")
    p.add_argument("--ca-key", metavar="CA.key")
    p.add_argument("--ca-pass-env", metavar="VAR",
                   help="passphrase of an encrypted CA key (else openssl asks on the terminal)")
    p.add_argument("--server-hostname", metavar="H", help="name checked in the broker's "
                   "certificate; defaults to the broker host")
    p.add_argument("--days", type=int, default=3650,
                   help="client certificate validity (default 3650: devices may not be "
                   "re-provisioned often)")
    p.add_argument("--ota-key", action="append", default=[], metavar="HEX_OR_PUBFILE",
                   help="public key (tools/bundle.py keygen's .pub, or its hex) whose signed "
                        "update bundles the device trusts; up to two (key rotation)")
    p.add_argument("--out", metavar="DIR", default=os.path.join(ROOT, "secrets"),
                   help="writes DIR/DEVICE_ID/ (default: secrets/ in this repo)")
    p.add_argument("--force", action="store_true", help="replace an existing device directory")
    return p.parse_args(argv)


def _env(var, what):
    if not ENV_NAME.match(var):
        raise Usage("%s: %r is not an environment variable name" % (what, var))
    v = os.environ.get(var)
    if v is None:
        raise Usage("%s: environment variable %s is not set" % (what, var))
    if not v:
        raise Usage("%s: environment variable %s is empty" % (what, var))
    return v


def _broker(spec, tls):
    port = 8883 if tls else 1883
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise Usage("--broker %r: write IPv6 as [addr]:port" % spec)
        rest = rest[1:]
    else:
        host, sep, rest = spec.rpartition(":")
        if not sep:
            host, rest = spec, ""
        elif ":" in host:
            raise Usage("--broker %r: write IPv6 as [addr]:port" % spec)
    if rest:
        try:
            port = int(rest)
        except ValueError:
            raise Usage("--broker %r: port must be a number" % spec)
    if not host:
        raise Usage("--broker %r: host missing" % spec)
    return host, port


def build(args):
    """The config document, the secret fields' sources (for the summary) and the manifest."""
    notes = {}
    # Names first, so a bad id is the error reported (not, say, an unset variable).
    try:
        validate({"device_id": args.device_id, "broker": {"host": "-"}, "groups": args.group})
    except ConfigError as e:
        raise Usage("invalid config: %s" % e)
    host, port = _broker(args.broker, args.tls)
    broker = {"host": host, "port": port}
    if args.user is not None:
        broker["user"] = args.user
    password = None
    if args.password_env:
        password = _env(args.password_env, "--password-env")
        notes["broker.password"] = "from $" + args.password_env
    elif args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                password = f.read()
        except (OSError, UnicodeError) as e:
            raise Fail("cannot read --password-file %s: %s" % (args.password_file, _why(e)))
        # Only the line end an editor or `echo` adds; anything else is part of the password.
        password = password[:-1] if password.endswith("\n") else password
        password = password[:-1] if password.endswith("\r") else password
        if not password:
            raise Usage("--password-file %s is empty" % args.password_file)
        notes["broker.password"] = "from " + args.password_file
    elif args.generate_password:
        password = secrets.token_urlsafe(24)
        notes["broker.password"] = "generated; register it on the broker from config.json"
    if password is not None:
        # The MQTT client sends a password only after a user name (lib/mqtt/codec.py), so
        # without --user it would silently never reach the broker.
        if args.user is None:
            raise Usage("a broker password needs --user (MQTT sends no password without one)")
        broker["password"] = password
    files = {}
    if args.tls:
        if not (args.ca_cert and args.ca_key):
            raise Usage("--tls needs --ca-cert and --ca-key")
        if args.device_id == "ca":
            # /certs/ca.der would be both the CA and this device's certificate.
            raise Usage("device id 'ca' collides with %s on the device" % CA_PATH)
        if args.days < 1:
            raise Usage("--days must be at least 1")
        if args.ca_pass_env:
            _env(args.ca_pass_env, "--ca-pass-env")
        cert = "%s/%s.der" % (CERT_DIR, args.device_id)
        key = "%s/%s.key.der" % (CERT_DIR, args.device_id)
        broker["tls"] = {"ca": CA_PATH, "cert": cert, "key": key,
                         "server_hostname": args.server_hostname or host}
        files.update({CA_PATH: "ca.der", cert: "cert.der", key: "key.der"})
    elif args.ca_cert or args.ca_key or args.server_hostname or args.ca_pass_env:
        raise Usage("--ca-cert, --ca-key, --ca-pass-env and --server-hostname need --tls")
    doc = {"device_id": args.device_id}
    if args.prefix is not None:
        doc["prefix"] = args.prefix
    doc["broker"] = broker
    if args.wifi:
        nets = []
        for i, w in enumerate(args.wifi):
            ssid, sep, var = w.rpartition(":")
            if not sep:
                ssid, var = w, ""
            if not 0 < len(ssid.encode()) <= 32:
                raise Usage("--wifi %r: an SSID is 1..32 bytes" % ssid)
            net = {"ssid": ssid}
            if var:
                net["password"] = _env(var, "--wifi " + ssid)
                notes["wifi[%d].password" % i] = "from $" + var
            nets.append(net)
        doc["wifi"] = nets
    if args.group:
        doc["groups"] = list(args.group)
    if args.ota_key:
        doc["ota"] = {"keys": _ota_keys(args.ota_key)}
    return doc, notes, files


def _ota_keys(specs):
    """The update keys as the device reads them (130 hex digits), each checked to be a point
    of the curve, which the device's own validator does not do."""
    if len(specs) > 2:
        raise Usage("--ota-key: at most two (the current key and the next one)")
    from tools.bundle import load_pub  # cryptography: only when there are keys to check

    try:
        return [load_pub(k)[0] for k in specs]
    except ValueError as e:
        raise Usage("--ota-key: %s" % e)


def check(doc):
    """The firmware's own checks, plus the ones this tool needs for the file system."""
    try:
        validate(doc)
    except ConfigError as e:
        raise Usage("invalid config: %s" % e)
    # The firmware refuses "." in ids (RabbitMQ delivers it as "/"); kept as a second guard,
    # since as a directory name these would leave secrets/.
    if doc["device_id"] in (".", ".."):
        raise Usage("device id %r cannot name a directory" % doc["device_id"])
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    if len(text.encode()) > MAX_BYTES:
        raise Usage("config.json would be %d bytes; the device reads at most %d"
                    % (len(text.encode()), MAX_BYTES))
    return text


def _why(e):
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _inside(path, top):
    return os.path.commonpath([path, top]) == top


def git_guard(out):
    """Refuse a directory inside a git work tree unless git ignores everything written there."""
    anc = out
    while not os.path.isdir(anc):
        anc = os.path.dirname(anc)
    git = shutil.which("git")
    if git is None:
        if _inside(out, ROOT):
            raise Fail("git not found, so cannot check that %s is ignored; use --out outside "
                       "the repo" % out)
        return
    r = subprocess.run([git, "-C", anc, "rev-parse", "--show-toplevel"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return  # not in a work tree: nothing can commit it by accident
    top = os.path.realpath(r.stdout.strip())
    # Every file, not only the directory: a negated pattern could re-include one of them.
    for path in [out] + [os.path.join(out, n) for n in OURS]:
        r = subprocess.run([git, "-C", top, "check-ignore", "-q", path],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise Fail("%s is inside the git work tree %s and not ignored by git (%s); "
                       "use the default secrets/ or add it to .gitignore"
                       % (out, top, os.path.relpath(path, top)))


def check_out(out, force):
    if os.path.lexists(out):
        if not force:
            raise Fail("%s already exists; use --force to replace it" % out)
        if not os.path.isdir(out) or os.path.islink(out):
            raise Fail("%s exists and is not a directory; not replacing it" % out)
        names = os.listdir(out)
        # --force deletes the directory: only one this tool wrote, never e.g. --out ~.
        if names and not set(names) <= set(OURS):
            raise Fail("%s holds files provision.py did not write (%s); not replacing it"
                       % (out, ", ".join(sorted(set(names) - set(OURS))[:5])))


class OpenSSL:
    def __init__(self, cwd):
        exe = shutil.which("openssl")
        if exe is None:
            raise Fail("openssl not found on PATH; install it (apt-get install openssl) for --tls")
        self.exe, self.cwd = exe, cwd

    def __call__(self, *args, what):
        try:
            r = subprocess.run([self.exe, *args], cwd=self.cwd, capture_output=True)
        except OSError as e:
            raise Fail("cannot run openssl: %s" % _why(e))
        if r.returncode != 0:
            err = r.stderr.decode(errors="replace").strip().splitlines()
            # OpenSSL's first line says what was wrong; later ones are its stack dump.
            raise Fail("openssl failed to %s: %s" % (what, err[0] if err else
                                                     "exit %d" % r.returncode))
        return r.stdout


def _readable(path, what):
    try:
        with open(path, "rb") as f:
            if not f.read(1):
                raise Fail("%s %s is empty" % (what, path))
    except OSError as e:
        raise Fail("cannot read %s %s: %s" % (what, path, _why(e)))
    return os.path.abspath(path)


def make_tls(args, work):
    """ca.der, cert.der, key.der as bytes; intermediate PEMs stay in `work`, deleted later."""
    ca_cert, ca_key = args.ca_cert, args.ca_key
    # The passphrase goes by name, so it is on no command line.
    pass_args = ["-passin", "env:" + args.ca_pass_env] if args.ca_pass_env else []
    ssl = OpenSSL(work)
    ca_der = ssl("x509", "-in", ca_cert, "-outform", "DER", what="read the CA certificate "
                 "%s (PEM expected)" % args.ca_cert)
    ssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "key.pem",
        what="make the EC P-256 key")
    ssl("req", "-new", "-key", "key.pem", "-subj", "/CN=" + args.device_id, "-out", "dev.csr",
        what="make the certificate request")
    with open(os.path.join(work, "ext"), "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=clientAuth\n")
    # A random serial rather than -CAcreateserial, which writes a .srl file beside the CA.
    serial = "0x%032x" % (secrets.randbits(127) | 1 << 126)
    ssl("x509", "-req", "-in", "dev.csr", "-CA", ca_cert, "-CAkey", ca_key, *pass_args,
        "-set_serial", serial, "-days", str(args.days), "-sha256", "-extfile", "ext",
        "-out", "cert.pem", what="sign the certificate with %s" % args.ca_key)
    ssl("verify", "-CAfile", ca_cert, "cert.pem", what="verify the new certificate")
    info = ssl("x509", "-in", "cert.pem", "-noout", "-subject", "-enddate",
               what="read the certificate").decode().strip().replace("\n", ", ")
    cert_der = ssl("x509", "-in", "cert.pem", "-outform", "DER", what="convert the certificate")
    # SEC1 DER ("openssl ec"), the key form the device's TLS is tested with.
    key_der = ssl("ec", "-in", "key.pem", "-outform", "DER", what="convert the key")
    return {"ca.der": ca_der, "cert.der": cert_der, "key.der": key_der}, info


def _write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # exactly 0600 whatever the umask
        f.write(data)


def _makedirs(path, made):
    if not os.path.isdir(path):
        _makedirs(os.path.dirname(path), made)
        os.mkdir(path, 0o700)
        made.append(path)


def write(out, force, contents, args):
    """Build the directory beside `out` and swap it in whole, so a failure leaves nothing
    (or the old directory) behind."""
    parent = os.path.dirname(out)
    made = []
    hold = None
    try:
        try:
            _makedirs(parent, made)
            hold = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".provision-",
                                    dir=parent)
            new = os.path.join(hold, "new")
            os.mkdir(new, 0o700)
            info = None
            if args.tls:
                work = os.path.join(hold, "work")
                os.mkdir(work, 0o700)
                tls, info = make_tls(args, work)
                contents.update(tls)
            for name, data in contents.items():
                _write(os.path.join(new, name), data)
            os.chmod(new, 0o700)
            old = os.path.join(hold, "old")
            if os.path.lexists(out):
                check_out(out, force)  # again: it may have appeared since the first check
                os.rename(out, old)
            try:
                os.rename(new, out)
            except OSError:
                if os.path.lexists(old):
                    os.rename(old, out)
                raise
            return info
        except OSError as e:
            raise Fail("cannot write %s: %s" % (out, _why(e)))
    except BaseException:
        if hold:
            shutil.rmtree(hold, ignore_errors=True)
            hold = None
        for d in reversed(made):  # parents this run created, e.g. secrets/
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise
    finally:
        if hold:
            shutil.rmtree(hold, ignore_errors=True)


def _flat(d, prefix=""):
    for k, v in d.items():
        name = prefix + k
        if isinstance(v, dict):
            yield from _flat(v, name + ".")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, x in enumerate(v):
                yield from _flat(x, "%s[%d]." % (name, i))
        else:
            yield name, v


def _show(path):
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def summary(out, doc, notes, files, info):
    lines = ["provisioned %s in %s/" % (doc["device_id"], _show(out)), "fields set:"]
    for name, v in _flat(doc):
        shown = "***" if name.rsplit(".", 1)[-1] == "password" else (
            ", ".join(v) if isinstance(v, list) else v)
        note = notes.get(name)
        lines.append("  %-26s %s%s" % (name, shown, " (%s)" % note if note else ""))
    if info:
        lines.append("client certificate: %s" % info)
    lines.append("files written (device path <- local file; mode 0600):")
    for dev, local in [("/config.json", "config.json")] + list(files.items()):
        lines.append("  %-26s %s" % (dev, _show(os.path.join(out, local))))
    lines.append("  %-26s %s" % ("(manifest)", _show(os.path.join(out, "files.json"))))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    old_umask = os.umask(0o077)  # whatever openssl writes in the work dir is private too
    try:
        doc, notes, files = build(args)
        text = check(doc)
        out = os.path.join(os.path.realpath(args.out), args.device_id)
        check_out(out, args.force)
        git_guard(out)
        if args.tls:
            # Missing openssl or CA files are reported before anything is created.
            OpenSSL(None)
            args.ca_cert = _readable(args.ca_cert, "--ca-cert")
            args.ca_key = _readable(args.ca_key, "--ca-key")
        # config.json is not in the manifest: deploy copies it by name, and last.
        contents = {"config.json": text.encode(),
                    "files.json": (json.dumps(files, indent=1) + "\n").encode()}
        info = write(out, args.force, contents, args)
    except Usage as e:
        print("provision.py: error: %s" % e, file=sys.stderr)
        return 2
    except Fail as e:
        print("provision.py: %s" % e, file=sys.stderr)
        return 1
    finally:
        os.umask(old_umask)
    print(summary(out, doc, notes, files, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
