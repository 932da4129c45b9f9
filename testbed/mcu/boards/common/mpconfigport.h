// testbed/mcu: the qemu port's own configuration, then what the firmware and its tests need
// that the port leaves out. The board directories put this directory ahead of the port's on
// the include path, so py/mpconfig.h's <mpconfigport.h> is this file; it includes the port's.
#include "ports/qemu/mpconfigport.h"

// asyncio's C core (_asyncio), as on the rp2 and esp32 ports (the qemu port turns it off).
#undef MICROPY_PY_ASYNCIO
#define MICROPY_PY_ASYNCIO (1)

// os.urandom over the port's mp_hal_get_random (an LCG: the same bytes every boot, which
// keeps a run under -icount reproducible; the firmware only needs them to differ in a boot).
#define MICROPY_PY_OS_URANDOM (1)

// time.time()/time_ns(), gmtime/localtime/mktime, Unix epoch, as rp2 and esp32 have: a
// board whose clock was set to 2026-01-01T00:00:00Z at reset (modtime_mcu.c here).
#define MICROPY_EPOCH_IS_1970 (1)
#define MICROPY_PY_TIME_TIME_TIME_NS (1)
#define MICROPY_PY_TIME_GMTIME_LOCALTIME_MKTIME (1)
#define MICROPY_PY_TIME_INCLUDEFILE "modtime_mcu.c"

// An idle wait sleeps the CPU until the next interrupt, as a board does (mcu_wfe.c).
void mcu_wait_for_event(int32_t timeout_ms);
#define MICROPY_INTERNAL_WFE(TIMEOUT_MS) mcu_wait_for_event(TIMEOUT_MS)

// The bytecode dispatch of the rp2 and esp32 ports.
#define MICROPY_OPT_COMPUTED_GOTO (1)

#if defined(__riscv)
// An ESP32-C3 is rv32imc: no Zba, no Zcmp (QEMU 7.2 has no Zcmp at all), so the native
// emitter must not use them (the port turns both on for its newer RISC-V targets).
#undef MICROPY_EMIT_RV32_ZBA
#define MICROPY_EMIT_RV32_ZBA (0)
#undef MICROPY_EMIT_RV32_ZCMP
#define MICROPY_EMIT_RV32_ZCMP (0)
#endif
