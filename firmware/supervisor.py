# Supervisor: runs a device's tasks, restarts one that died (backoff, counted), resets the
# board when a critical one keeps dying, and feeds the watchdog only while the loop runs and
# every task that promised to check in did so in time. A stuck await or a busy loop thus
# stops the feeding and the hardware (or the Unix runner standing in for it) resets.
import asyncio

# A task that dies this many times within DEATH_WINDOW_MS is beyond restarting.
DEATH_LIMIT = 3
DEATH_WINDOW_MS = 60000
RESTART_BASE_MS = 500
RESTART_CAP_MS = 60000


class _Task:
    def __init__(self, name, factory, critical):
        self.name = name
        self.factory = factory  # fn() -> coroutine; called again for each restart
        self.critical = critical
        self.task = None
        self.deadline = None  # ticks by which the task must check in again; None: no promise
        self.restarts = 0
        self.recent = 0  # deaths within the current window
        self.window_start = None  # board uptime (s) of the window's first death


class Supervisor:
    def __init__(self, board, log, rnd, wdt_ms, on_fatal, grace_ms=None):
        self.board = board
        self.log = log
        self.rnd = rnd
        self.ticks = board.ticks_ms
        self.diff = board.ticks_diff
        self.add = board.ticks_add
        self.wdt_ms = wdt_ms
        # Slack on every promise, so a loop that is merely busy is not mistaken for a hang.
        self.grace_ms = wdt_ms if grace_ms is None else grace_ms
        self.on_fatal = on_fatal  # async fn(reason): the device's reset path
        self.tasks = {}
        self.stats = {"restarts": 0, "unhandled": 0, "starved": 0, "feeds": 0}
        self._starving = None  # name of the task that stopped the feeding, while it lasts
        self._fatal = False

    # ---- tasks -----------------------------------------------------------------------

    def spawn(self, name, factory, critical=True, within_ms=None):
        """Run factory() as a supervised task. within_ms: it must check in (beat) by then,
        and from then on by whatever each beat promises."""
        t = _Task(name, factory, critical)
        if within_ms is not None:
            t.deadline = self.add(self.ticks(), within_ms + self.grace_ms)
        self.tasks[name] = t
        t.task = asyncio.create_task(self._keep(t))
        return t.task

    def beat(self, name, within_ms):
        """`name` is alive and will check in again within `within_ms`; None: it is idle on
        purpose (waiting for another supervised task) and promises nothing."""
        t = self.tasks.get(name)
        if t is not None:
            t.deadline = None if within_ms is None else self.add(
                self.ticks(), within_ms + self.grace_ms)

    def set_timeout(self, wdt_ms):
        """The configured watchdog timeout, once the config is read."""
        self.wdt_ms = self.grace_ms = wdt_ms
        self.board.arm_watchdog(wdt_ms)

    def fire(self, coro, what):
        """A one-off task whose failure is counted and logged instead of lost."""
        return asyncio.create_task(self._once(coro, what))

    async def _once(self, coro, what):
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.unhandled(what, e)

    def unhandled(self, what, e):
        self.stats["unhandled"] += 1
        self.log("E", "unhandled error in %s: %r" % (what, e))

    async def _keep(self, t):
        while True:
            try:
                await t.factory()
                t.deadline = None
                return  # finished by design (a stop): nothing left to promise
            except asyncio.CancelledError:
                raise
            except Exception as e:
                err = e
            now = self.ticks()
            # In uptime, not ticks: a window that began weeks ago is not "recent" after a wrap.
            up = self.board.uptime_s()
            if t.window_start is None or up - t.window_start > DEATH_WINDOW_MS // 1000:
                t.window_start = up
                t.recent = 0
            t.recent += 1
            t.restarts += 1
            self.stats["restarts"] += 1
            if t.critical and t.recent >= DEATH_LIMIT:
                self.log("E", "task %s died %d times in %d s: %r; resetting" % (
                    t.name, t.recent, DEATH_WINDOW_MS // 1000, err))
                await self.fatal("task %s keeps dying" % t.name)
                return
            d = min(RESTART_CAP_MS, RESTART_BASE_MS << min(t.recent, 16))
            d = int(d * self.rnd.uniform(0.5, 1.5))
            self.log("E", "task %s died: %r; restart %d in %d ms" % (t.name, err, t.restarts, d))
            if t.deadline is not None:
                t.deadline = self.add(now, d + self.grace_ms)
            await asyncio.sleep_ms(d)

    async def fatal(self, reason):
        if not self._fatal:
            self._fatal = True
            await self.on_fatal(reason)

    def cancel_all(self):
        for t in self.tasks.values():
            if t.task is not None:
                t.task.cancel()
        self.tasks = {}

    def restarts(self):
        return {t.name: t.restarts for t in self.tasks.values() if t.restarts}

    # ---- watchdog --------------------------------------------------------------------

    def overdue(self, now=None):
        """(name, ms late) of the first task past its promise, or None."""
        if now is None:
            now = self.ticks()
        for t in self.tasks.values():
            if t.deadline is not None:
                late = self.diff(now, t.deadline)
                if late > 0:
                    return t.name, late
        return None

    async def watchdog(self):
        """Feed while healthy. Runs from the start of a boot (before the config is read, so
        waiting for a config is not a hang); being scheduled at all proves the loop turns."""
        board = self.board
        board.arm_watchdog(self.wdt_ms)
        step = self.wdt_ms // 4
        woke = self.ticks()
        while True:
            now = self.ticks()
            self._credit(self.diff(now, woke) - step)
            woke = now
            board.uptime_s()  # the uptime counter must look at the ticks at least every 2^29 ms
            late = self.overdue(now)  # the `now` the stall was measured at
            if late is None:
                board.feed_watchdog()
                self.stats["feeds"] += 1
                if self._starving:
                    self.log("W", "watchdog: task %s is back; feeding again" % self._starving)
                    self._starving = None
            elif self._starving != late[0]:
                self._starving = late[0]
                self.stats["starved"] += 1
                self.log("E", "watchdog: task %s missed its check-in by %d ms; not feeding" % late)
            await asyncio.sleep_ms(step)

    def _credit(self, stalled):
        """The loop did not run for `stalled` ms (a long flash erase; on the Unix board, its
        driven clock): no task could check in meanwhile, so the promises move by as much. A
        stall longer than the watchdog's timeout is the hardware's to judge, not ours."""
        if stalled <= self.wdt_ms:
            return
        for t in self.tasks.values():
            if t.deadline is not None:
                t.deadline = self.add(t.deadline, stalled)
