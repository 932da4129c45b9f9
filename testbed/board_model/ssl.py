# `ssl` for the board-model build of the Unix port (testbed/board_model/build.sh): CPython's
# names over MicroPython's C module `tls`. The ESP32 and RP2 builds get an `ssl` module from
# micropython-lib through their port manifests; this build freezes no micropython-lib, so it
# freezes this instead. It covers what firmware/tlsctx.py and asyncio call, nothing more.
import tls
from tls import CERT_NONE, CERT_OPTIONAL, CERT_REQUIRED, PROTOCOL_TLS_CLIENT  # noqa: F401


class SSLContext:
    def __init__(self, protocol):
        self._ctx = tls.SSLContext(protocol)

    @property
    def verify_mode(self):
        return self._ctx.verify_mode

    @verify_mode.setter
    def verify_mode(self, mode):
        self._ctx.verify_mode = mode

    def load_verify_locations(self, cadata):
        # tls takes the CA (DER or PEM bytes) only positionally; CPython callers name it.
        self._ctx.load_verify_locations(cadata)

    def load_cert_chain(self, cert, key):
        self._ctx.load_cert_chain(cert, key)

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True,
                    server_hostname=None):
        return self._ctx.wrap_socket(sock, server_side=server_side,
                                     do_handshake_on_connect=do_handshake_on_connect,
                                     server_hostname=server_hostname)
