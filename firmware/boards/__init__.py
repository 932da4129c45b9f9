# Board selection: the one place that maps the running platform to its board module.
# Board modules are the only code allowed to import machine, network, esp32 or rp2.
import sys


def _mcu_board():
    """The board class of a microcontroller, or None on the Unix port."""
    if sys.platform == "esp32":
        from firmware.boards.esp32 import Board

        return Board
    if sys.platform == "rp2":
        from firmware.boards.rp2 import Board

        return Board
    return None


def boards(opened=None):
    """The board objects this process drives: one on a microcontroller, one or more on Unix
    (`opened`: the flash the loader opened, otaboot.load())."""
    cls = _mcu_board()
    if cls is None:
        from firmware import forget
        from firmware.boards import unixargs

        out = unixargs.boards_from_argv(sys.argv[1:], opened)
        forget("firmware.boards.unixargs")  # boot-only code
        return out
    return [cls()]

