# Board selection: the one place that maps the running platform to its board module.
# Board modules are the only code allowed to import machine, network, esp32 or rp2.
import sys


def boards():
    """The board objects this process drives: one on a microcontroller, one or more on Unix."""
    if sys.platform == "esp32":
        from firmware.boards.esp32 import Board
    elif sys.platform == "rp2":
        from firmware.boards.rp2 import Board
    else:
        from firmware.boards.unix import boards_from_argv

        return boards_from_argv(sys.argv[1:])
    return [Board()]


def early_watchdog():
    """boot.py arms the watchdog at its longest timeout before anything else can hang; the
    app sets the configured one. On Unix the runner plays the watchdog."""
    if sys.platform in ("esp32", "rp2"):
        from firmware.boards.mcu import early_watchdog

        early_watchdog(8388 if sys.platform == "rp2" else 60000)
