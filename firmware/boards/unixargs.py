# The Unix port's command line: which boards this process drives (one --flash each) and
# what the runner tells them. Boot-only: firmware/boards drops this module once the boards
# exist, so its bytecode does not stay in the heap for the rest of the run.
import sys

from firmware.boards.unix import DEFAULT_FLASH, Board, LoopTicker, SharedHeap


def _usage(msg):
    print("unix board: " + msg)
    print(
        "usage: micropython main.py [--flash-size BYTES] [--wdt HOST:PORT] "
        "[--ticks-before-wrap S] --flash IMAGE "
        "[--put DEST=HOSTFILE]... [--reset-cause CAUSE] [--control HOSTFILE] [--app DIR] "
        "[--rtc-memory HOSTFILE] [--sleep-scale F] "
        "[--flash IMAGE2 ...]"
    )
    sys.exit(2)


def boards_from_argv(argv, opened=None):
    """--flash IMAGE starts a device; --put DEST=SRC copies a host file onto that device's
    flash before it boots (what `mpremote cp` does for a real board); --reset-cause,
    --control, --app (a directory holding the package `app`), --rtc-memory (the host file
    of its RTC memory, or `none` for a board without one) and --sleep-scale (its deep sleeps scaled) also apply to the last
    --flash; --wdt is the runner's watchdog for all;
    --ticks-before-wrap S starts every board's ticks S seconds before their 2^30 wrap.
    `opened`: the images the loader opened already (unixflash.mount_single)."""
    size = DEFAULT_FLASH
    wdt = None
    before_wrap = None
    out = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if i + 1 >= len(argv):
            _usage("missing value after " + a)
        v = argv[i + 1]
        i += 2
        if a == "--flash-size":
            size = int(v)
        elif a == "--wdt":
            host, _, port = v.rpartition(":")
            wdt = (host, int(port))
        elif a == "--ticks-before-wrap":
            before_wrap = int(float(v) * 1000)
            if not 0 <= before_wrap < 0x40000000:
                _usage("--ticks-before-wrap: 0 to 1073741 s")
        elif a == "--flash":
            out.append(Board(v, size, opened=opened))
        elif not out:
            _usage(a + " before any --flash")
        elif a == "--reset-cause":
            out[-1].cause = v
        elif a == "--rtc-memory":
            if v == "none":
                out[-1].sleep_memory = None  # as an RP2040: the duty state goes to flash
            else:
                out[-1].sleep_memory.path = v
        elif a == "--sleep-scale":
            out[-1].sleep_scale = float(v)
        elif a == "--control":
            out[-1].control.path = v
        elif a == "--app":
            out[-1].app_dir = v
        elif a == "--put":
            dest, _, src = v.partition("=")
            with open(src, "rb") as f:
                data = f.read()
            with out[-1].fs.open(dest, "wb") as f:
                f.write(data)
        else:
            _usage("unknown option " + a)
    if not out:
        out.append(Board("flash.img", size))
    shared = SharedHeap() if len(out) > 1 else None
    ticker = LoopTicker() if len(out) > 1 else None
    for b in out:
        b.wdt_addr = wdt
        b.shared = shared
        b.ticker = ticker
        if before_wrap is not None:
            b.set_ticks_before_wrap(before_wrap)
    return out
