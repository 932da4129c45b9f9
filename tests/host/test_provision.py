"""tools/provision.py run as an operator would (a subprocess): the config it writes boots the
firmware's validator, secrets stay off the terminal and private on disk, bad ids write
nothing, and --tls makes a client key and certificate the CA verifies."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from firmware.bootconfig import validate
from tools import provision
from testbed.devices import ROOT

TOOL = os.path.join(ROOT, "tools", "provision.py")
PASSWORD = "pw-Zq8r!never-printed"
WIFI_PASSWORD = "wifi-Xk3m-never-printed"


def run(*args, env=None):
    e = dict(os.environ, MQTT_PW=PASSWORD, WIFI_PW=WIFI_PASSWORD)
    e.update(env or {})
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          env=e, timeout=30)


def _ssl(*args, cwd):
    return subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True).stdout


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA made as tests/host/test_tls.py makes one, and a second, unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    for name in ("ca", "other"):
        _ssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", name + ".key",
             cwd=d)
        _ssl("req", "-x509", "-new", "-key", name + ".key", "-subj", "/CN=" + name, "-days",
             "2", "-out", name + ".pem", cwd=d)
        _ssl("x509", "-in", name + ".pem", "-outform", "DER", "-out", name + ".der", cwd=d)
    return d


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_config_is_written_private_and_accepted_by_the_firmware_validator(tmp_path):
    out = tmp_path / "secrets"
    r = run("pump-0042", "--broker", "mqtt.example.net:1884", "--user", "pump-0042",
            "--password-env", "MQTT_PW", "--wifi", "site-a:WIFI_PW", "--wifi", "open-net:",
            "--group", "model-x", "--group", "model-x-v3-1", "--prefix", "acme",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    d = out / "pump-0042"
    doc = json.loads((d / "config.json").read_text())
    cfg = validate(doc)
    assert cfg["device_id"] == "pump-0042" and cfg["prefix"] == "acme/"
    assert cfg["broker"]["host"] == "mqtt.example.net" and cfg["broker"]["port"] == 1884
    assert (cfg["broker"]["user"], cfg["broker"]["password"]) == ("pump-0042", PASSWORD)
    assert "tls" not in cfg["broker"]
    assert cfg["wifi"] == [("site-a", WIFI_PASSWORD), ("open-net", "")]
    assert cfg["groups"] == ["model-x", "model-x-v3-1"]
    assert json.loads((d / "files.json").read_text()) == {}
    assert sorted(os.listdir(d)) == ["config.json", "files.json"]
    assert mode(d) == 0o700 and mode(d / "config.json") == 0o600
    assert mode(d / "files.json") == 0o600
    # The summary names the fields and files.
    for s in ("broker.host", "mqtt.example.net", "wifi[0].ssid", "site-a", "model-x-v3-1",
              str(d / "config.json")):
        assert s in r.stdout


def test_port_defaults_by_tls_and_a_password_needs_a_user(tmp_path, pki):
    assert run("p1", "--broker", "h", "--out", str(tmp_path)).returncode == 0
    assert json.loads((tmp_path / "p1" / "config.json").read_text())["broker"]["port"] == 1883
    r = run("p2", "--broker", "h", "--password-env", "MQTT_PW", "--out", str(tmp_path))
    assert r.returncode == 2 and "--user" in r.stderr
    assert not (tmp_path / "p2").exists()


def test_secrets_never_reach_stdout_or_stderr(tmp_path, pki):
    out = str(tmp_path / "s")
    pw_file = tmp_path / "pw.txt"
    pw_file.write_text("file-pw-never-printed\n")
    runs = [
        run("d1", "--broker", "h:1883", "--user", "u", "--password-env", "MQTT_PW",
            "--wifi", "site:WIFI_PW", "--out", out),
        # A failing run (the directory exists) after the secrets were read.
        run("d1", "--broker", "h:1883", "--user", "u", "--password-env", "MQTT_PW",
            "--wifi", "site:WIFI_PW", "--out", out),
        run("d2", "--broker", "h:1883", "--user", "u", "--password-file", str(pw_file),
            "--out", out),
        run("d3", "--broker", "h:1883", "--user", "u", "--generate-password", "--tls",
            "--ca-cert", str(pki / "ca.pem"), "--ca-key", str(pki / "ca.key"), "--out", out),
    ]
    assert [r.returncode for r in runs] == [0, 1, 0, 0], [r.stderr for r in runs]
    generated = json.loads((tmp_path / "s" / "d3" / "config.json").read_text())
    generated = generated["broker"]["password"]
    assert len(generated) >= 24
    key_der = (tmp_path / "s" / "d3" / "key.der").read_bytes()
    key_pem = _ssl("ec", "-inform", "DER", "-in", "key.der", cwd=tmp_path / "s" / "d3")
    for r in runs:
        text = r.stdout + r.stderr
        for secret in (PASSWORD, WIFI_PASSWORD, "file-pw-never-printed", generated,
                       key_pem.decode().splitlines()[1]):
            assert secret not in text
        assert key_der.hex() not in text.replace(":", "").lower()
    assert runs[0].stdout.count("***") == 2 and "***" in runs[3].stdout


def test_refuses_to_overwrite_without_force_and_replaces_with_it(tmp_path, pki):
    out = str(tmp_path)
    tls = ["--tls", "--ca-cert", str(pki / "ca.pem"), "--ca-key", str(pki / "ca.key")]
    assert run("dev-1", "--broker", "old.example:8883", *tls, "--out", out).returncode == 0
    d = tmp_path / "dev-1"
    r = run("dev-1", "--broker", "new.example:1883", "--out", out)
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert json.loads((d / "config.json").read_text())["broker"]["host"] == "old.example"
    r = run("dev-1", "--broker", "new.example:1883", "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((d / "config.json").read_text())["broker"]["host"] == "new.example"
    # Replaced whole: no stale key or certificate from the TLS run, no work files left.
    assert sorted(os.listdir(d)) == ["config.json", "files.json"]
    assert os.listdir(tmp_path) == ["dev-1"]


def test_force_does_not_delete_a_directory_it_did_not_write(tmp_path):
    d = tmp_path / "dev-1"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    r = run("dev-1", "--broker", "h", "--out", str(tmp_path), "--force")
    assert r.returncode == 1 and "notes.txt" in r.stderr
    assert os.listdir(d) == ["notes.txt"]


BAD = ["a+b", "a/b", "#", "a" * 65, "", "a b", "x\u00e9"]


@pytest.mark.parametrize("bad", BAD + [".."])
def test_refuses_bad_device_ids_and_writes_nothing(tmp_path, bad):
    r = run(bad, "--broker", "h", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "error" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", BAD)
def test_refuses_bad_group_names_and_writes_nothing(tmp_path, bad):
    r = run("dev-1", "--broker", "h", "--group", "ok", "--group", bad,
            "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "group" in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_dot_in_an_id_or_group_is_refused_with_the_reason(tmp_path):
    # RabbitMQ delivers "." as "/": pump.7 would never see devices/pump.7/cmd/...
    for args in (["pump.7"], ["pump-7", "--group", "model-x.v3.1"]):
        r = run(*args, "--broker", "h", "--out", str(tmp_path / "out"))
        assert r.returncode == 2, r.stderr
        assert "RabbitMQ" in r.stderr and "not portable across brokers" in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()


def test_longest_id_and_group_are_accepted(tmp_path):
    r = run("a" * 64, "--broker", "h", "--group", "g" * 64, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    validate(json.loads((tmp_path / ("a" * 64) / "config.json").read_text()))


def test_refuses_nul_in_id_or_group(tmp_path, capsys):
    # No command line can carry a NUL, so this one calls main() in-process.
    out = str(tmp_path / "out")
    assert provision.main(["a\x00b", "--broker", "h", "--out", out]) == 2
    assert provision.main(["ok", "--broker", "h", "--group", "g\x00", "--out", out]) == 2
    assert not os.path.exists(out)
    assert capsys.readouterr().err.count("error") == 2


def test_tls_key_and_certificate_verify_against_the_ca(tmp_path, pki):
    r = run("pump-7", "--broker", "mqtt.example.net", "--tls", "--ca-cert", str(pki / "ca.pem"),
            "--ca-key", str(pki / "ca.key"), "--server-hostname", "broker.internal",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    d = tmp_path / "pump-7"
    assert sorted(os.listdir(d)) == ["ca.der", "cert.der", "config.json", "files.json",
                                     "key.der"]
    assert mode(d) == 0o700
    for name in os.listdir(d):
        assert mode(d / name) == 0o600, name
    cfg = validate(json.loads((d / "config.json").read_text()))
    assert cfg["broker"]["port"] == 8883
    assert cfg["broker"]["tls"] == {"ca": "/certs/ca.der", "cert": "/certs/pump-7.der",
                                    "key": "/certs/pump-7.key.der",
                                    "server_hostname": "broker.internal"}
    assert json.loads((d / "files.json").read_text()) == {
        "/certs/ca.der": "ca.der", "/certs/pump-7.der": "cert.der",
        "/certs/pump-7.key.der": "key.der"}
    assert (d / "ca.der").read_bytes() == (pki / "ca.der").read_bytes()
    # DER in, PEM out: openssl verify reads PEM.
    _ssl("x509", "-inform", "DER", "-in", str(d / "cert.der"), "-out", "dev.pem", cwd=tmp_path)
    ok = subprocess.run(["openssl", "verify", "-CAfile", str(pki / "ca.pem"), "dev.pem"],
                        cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["openssl", "verify", "-CAfile", str(pki / "other.pem"), "dev.pem"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0
    subject = _ssl("x509", "-in", "dev.pem", "-noout", "-subject", cwd=tmp_path).decode()
    assert "CN = pump-7" in subject or "CN=pump-7" in subject
    # The key is an EC P-256 key (SEC1 DER) and belongs to the certificate.
    text = _ssl("ec", "-inform", "DER", "-in", str(d / "key.der"), "-noout", "-text",
                cwd=tmp_path).decode()
    assert "prime256v1" in text
    pub_key = _ssl("ec", "-inform", "DER", "-in", str(d / "key.der"), "-pubout", cwd=tmp_path)
    pub_cert = _ssl("x509", "-in", "dev.pem", "-noout", "-pubkey", cwd=tmp_path)
    assert pub_key == pub_cert
    # Nothing written beside the CA (no .srl serial file).
    assert sorted(os.listdir(pki)) == ["ca.der", "ca.key", "ca.pem", "other.der",
                                       "other.key", "other.pem"]


def test_tls_errors_are_clear_and_write_nothing(tmp_path, pki):
    out = tmp_path / "out" / "nested"
    base = ["dev-1", "--broker", "h", "--tls", "--out", str(out)]
    r = run(*base, "--ca-cert", str(pki / "ca.pem"), "--ca-key", str(tmp_path / "missing.key"))
    assert r.returncode == 1 and "cannot read --ca-key" in r.stderr and "missing.key" in r.stderr
    r = run(*base, "--ca-cert", str(pki / "ca.pem"), "--ca-key", str(pki / "other.key"))
    assert r.returncode == 1 and "openssl failed to sign" in r.stderr, r.stderr
    r = run(*base, "--ca-cert", str(pki / "ca.key"), "--ca-key", str(pki / "ca.key"))
    assert r.returncode == 1 and "CA certificate" in r.stderr, r.stderr
    r = run(*base, "--ca-cert", str(pki / "ca.pem"))
    assert r.returncode == 2 and "--ca-key" in r.stderr
    r = run("ca", "--broker", "h", "--tls", "--ca-cert", str(pki / "ca.pem"), "--ca-key",
            str(pki / "ca.key"), "--out", str(out))
    assert r.returncode == 2 and "/certs/ca.der" in r.stderr
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    r = run(*base, "--ca-cert", str(pki / "ca.pem"), "--ca-key", str(pki / "ca.key"),
            env={"PATH": str(empty_bin)})
    assert r.returncode == 1 and "openssl not found" in r.stderr, r.stderr
    # Parents the failed runs created are gone again, and no staging directory is left.
    assert not (tmp_path / "out").exists()


@pytest.fixture
def repo_secrets():
    """A device id written under secrets/ in the repo (git-ignored); removed after, with
    secrets/ if it was new."""
    dev = "provision-test-%d" % os.getpid()
    top = os.path.join(ROOT, "secrets")
    existed = os.path.isdir(top)
    yield dev
    shutil.rmtree(os.path.join(top, dev), ignore_errors=True)
    # Only there if the tool failed to refuse it; not left in the work tree then either.
    shutil.rmtree(os.path.join(ROOT, "tools", dev), ignore_errors=True)
    if not existed and os.path.isdir(top) and not os.listdir(top):
        os.rmdir(top)


def test_in_the_repo_only_a_git_ignored_directory_is_used(repo_secrets):
    r = run(repo_secrets, "--broker", "h")
    assert r.returncode == 0, r.stderr
    d = os.path.join(ROOT, "secrets", repo_secrets)
    assert os.path.isfile(os.path.join(d, "config.json"))
    # tools/ is tracked, not ignored: committing the config there would publish its secrets.
    r = run(repo_secrets, "--broker", "h", "--out", os.path.join(ROOT, "tools"))
    assert r.returncode == 1 and "not ignored by git" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(ROOT, "tools", repo_secrets))


def test_update_keys_are_written_checked_and_at_most_two(tmp_path):
    from tools import bundle

    first, _ = bundle.keygen("first", str(tmp_path / "keys"))
    second, _ = bundle.keygen("second", str(tmp_path / "keys"))
    out = tmp_path / "secrets"
    # One by its hex, one by its .pub file, as keygen wrote them.
    r = run("pump-0007", "--broker", "h", "--ota-key", first,
            "--ota-key", str(tmp_path / "keys" / "second.pub"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    cfg = validate(json.loads((out / "pump-0007" / "config.json").read_text()))
    assert cfg["ota"]["keys"] == [first, second]
    # A third key, a point off the curve, a missing file: refused, nothing written.
    off_curve = "04" + "11" * 64
    for keys, says in (([first, second, first], "at most two"), ([off_curve], "P-256"),
                       ([str(tmp_path / "nope.pub")], "neither")):
        args = [a for k in keys for a in ("--ota-key", k)]
        r = run("pump-0008", "--broker", "h", *args, "--out", str(out))
        assert r.returncode == 2 and says in r.stderr, r.stderr
        assert not (out / "pump-0008").exists()
