// MICROPY_INTERNAL_WFE of the testbed's boards (mpconfigport.h): an idle wait (asyncio with
// nothing to run, select.poll with a timeout) sleeps the CPU until the next interrupt, as a
// board waits in WFE/WFI (ports/rp2: best_effort_wfe_or_timeout), instead of the port's busy
// loop. Under QEMU's -icount sleep=off the idle time then costs no instructions and no host
// time: QEMU moves the guest clock on to the next timer deadline.
#include <stdint.h>

#include "py/mpconfig.h"

#if defined(__arm__)

void mcu_wait_for_event(int32_t timeout_ms) {
    (void)timeout_ms;
    // SysTick interrupts every millisecond (ports/qemu/mcu/arm/ticks.c): at most 1 ms.
    __asm volatile ("wfi");
}

#elif defined(__riscv)

// The CLINT of QEMU's virt machine (hart 0); its timer counts at 10 MHz
// (ports/qemu/mcu/riscv/ticks.c).
#define CLINT_MTIMECMP_LO (*(volatile uint32_t *)0x02004000)
#define CLINT_MTIMECMP_HI (*(volatile uint32_t *)0x02004004)
#define CLINT_MTIME_LO (*(volatile uint32_t *)0x0200bff8)
#define CLINT_MTIME_HI (*(volatile uint32_t *)0x0200bffc)
#define MIE_MTIE (1u << 7)
#define MSTATUS_MIE (1u << 3)

void mcu_wait_for_event(int32_t timeout_ms) {
    // The port runs with no interrupt enabled: arm the machine timer at most 1 ms ahead
    // (the UART is polled, so a wait for input wakes to look), with interrupts masked in
    // mstatus: WFI returns once the timer is pending and no handler runs.
    uint32_t hi, lo;
    do {
        hi = CLINT_MTIME_HI;
        lo = CLINT_MTIME_LO;
    } while (hi != CLINT_MTIME_HI);
    uint64_t now = ((uint64_t)hi << 32) | lo;
    uint64_t ticks = (timeout_ms >= 0 && timeout_ms < 1) ? 0 : 10000;
    uint64_t at = now + ticks;
    uint32_t mstatus;
    __asm volatile ("csrrc %0, mstatus, %1" : "=r" (mstatus) : "r" (MSTATUS_MIE));
    CLINT_MTIMECMP_HI = 0xffffffff;  // no match while the low word changes
    CLINT_MTIMECMP_LO = (uint32_t)at;
    CLINT_MTIMECMP_HI = (uint32_t)(at >> 32);
    __asm volatile ("csrs mie, %0" : : "r" (MIE_MTIE));
    __asm volatile ("wfi");
    __asm volatile ("csrc mie, %0" : : "r" (MIE_MTIE));
    CLINT_MTIMECMP_HI = 0xffffffff;
    CLINT_MTIMECMP_LO = 0xffffffff;
    __asm volatile ("csrw mstatus, %0" : : "r" (mstatus));
}

#endif
