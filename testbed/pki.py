"""A throwaway PKI made with openssl for TLS runs (tests, benchmarks): a CA, and leaf
certificates signed by it, each also in the DER form the device's TLS files take."""
import subprocess


def _ssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def ca(d, name):
    """NAME.key, NAME.pem, NAME.der in directory d (a pathlib.Path)."""
    _ssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", name + ".key", cwd=d)
    _ssl("req", "-x509", "-new", "-key", name + ".key", "-subj", "/CN=" + name, "-days", "2",
         "-out", name + ".pem", cwd=d)
    _ssl("x509", "-in", name + ".pem", "-outform", "DER", "-out", name + ".der", cwd=d)


def leaf(d, name, ca_name, san=None):
    """A certificate signed by CA ca_name: NAME.pem/.der, its key NAME.key and NAME.key.der."""
    _ssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", name + ".key", cwd=d)
    _ssl("req", "-new", "-key", name + ".key", "-subj", "/CN=" + name, "-out", name + ".csr",
         cwd=d)
    ext = d / (name + ".ext")
    ext.write_text("subjectAltName=%s\n" % san if san else "basicConstraints=CA:FALSE\n")
    _ssl("x509", "-req", "-in", name + ".csr", "-CA", ca_name + ".pem", "-CAkey",
         ca_name + ".key", "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out",
         name + ".pem", cwd=d)
    _ssl("x509", "-in", name + ".pem", "-outform", "DER", "-out", name + ".der", cwd=d)
    _ssl("ec", "-in", name + ".key", "-outform", "DER", "-out", name + ".key.der", cwd=d)


def tls_listeners(certs, tls_port, mtls_port):
    """mosquitto config lines: a TLS listener on tls_port and a mutual-TLS one on
    mtls_port, both with certs/server.pem signed by certs/ca.pem."""
    return "".join(
        "listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\nrequire_certificate %s\n"
        % (port, certs / "ca.pem", certs / "server.pem", certs / "server.key", req)
        for port, req in ((tls_port, "false"), (mtls_port, "true"))
    )
