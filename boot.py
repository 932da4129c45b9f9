# Runs before main.py on a board. Kept minimal: the watchdog first, so a hang anywhere
# later resets the board; gc threshold early so fragmentation stays low.
import gc

from firmware.boards import early_watchdog

early_watchdog()
gc.threshold((gc.mem_free() + gc.mem_alloc()) // 4)
