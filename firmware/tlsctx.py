# TLS for the broker link: an SSLContext that always verifies the broker against the CA
# file on flash, with an optional client certificate and key (mutual TLS, as cloud IoT
# brokers require). Certificates and keys are DER files (README "TLS").
import ssl

from firmware.bootconfig import ConfigError


def _read(fs, path):
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except OSError:
        raise ConfigError("TLS file %s is missing" % path)


def context(fs, tls):
    """SSLContext for bootconfig's broker.tls; ConfigError if the files are missing or bad."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ca = _read(fs, tls["ca"])
    cert = _read(fs, tls["cert"]) if tls["cert"] else None
    key = _read(fs, tls["key"]) if tls["key"] else None
    try:
        ctx.load_verify_locations(cadata=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
    except (ValueError, OSError) as e:
        raise ConfigError("TLS certificate or key unusable: %r" % (e,))
    return ctx
