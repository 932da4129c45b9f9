# Guest side of testbed/mcu: the qemu port has no network stack, so there is no socket
# module. This one stands in for a board whose network is down: its constants let modules
# that import socket at load time (mqtt.client, firmware.ntp, the Unix board) load, and any
# use raises OSError(EHOSTUNREACH). Tests that need a real socket are skipped by
# testbed/mcu/test.py (its SKIP table, each with its reason), never run against this.
import errno

AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_RAW = 3
IPPROTO_IP = 0
IPPROTO_TCP = 6
IPPROTO_UDP = 17
SOL_SOCKET = 1
SO_REUSEADDR = 4


def _down():
    raise OSError(errno.EHOSTUNREACH)


def getaddrinfo(*args, **kw):
    _down()


class socket:
    def __init__(self, *args, **kw):
        _down()
