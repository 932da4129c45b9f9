// Included by extmod/modtime.c (MICROPY_PY_TIME_INCLUDEFILE): the wall clock of the testbed's
// boards. QEMU's machines have no battery-backed clock the port reads, so the clock reads a
// fixed start (as if set by SNTP at reset) plus the time since reset; under -icount that is
// the instruction count, so a run prints the same times every time.
#include "py/mphal.h"
#include "py/obj.h"
#include "shared/timeutils/timeutils.h"

#define MCU_CLOCK_START_S (1767225600ULL) // 2026-01-01T00:00:00Z

static mp_uint_t mcu_clock_s(void) {
    return MCU_CLOCK_START_S + mp_hal_ticks_ms() / 1000;
}

// time.localtime()/gmtime() without an argument.
static void mp_time_localtime_get(timeutils_struct_time_t *tm) {
    timeutils_seconds_since_epoch_to_struct_time(mcu_clock_s(), tm);
}

static mp_obj_t mp_time_time_get(void) {
    return mp_obj_new_int_from_uint(mcu_clock_s());
}

uint64_t mp_hal_time_ns(void) {
    return MCU_CLOCK_START_S * 1000000000ULL + (uint64_t)mp_hal_ticks_ms() * 1000000ULL;
}
