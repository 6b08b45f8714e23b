/* clock.h: a periodic clock that sleeps to ABSOLUTE deadlines, and the monotonic time base it uses.
 *
 * Why it exists: the model steps every 80 ms and must keep that 12.5 Hz time base for the whole call
 * (docs/latency.md, "Cadence"). A loop that sleeps "period minus elapsed" adds
 * every wake's oversleep (timer slack, scheduling) to the next period, so the cadence drifts by tens of
 * ms per minute. Sleeping until start + k * period instead puts each wake back on the grid: a late wake
 * costs that one wake, never the ones after it.
 *
 * CONTRACT
 * - Time is nanoseconds on the monotonic clock: Linux CLOCK_MONOTONIC (the same clock as Python's
 *   time.monotonic_ns()), macOS mach_absolute_time() converted with mach_timebase_info (the same clock
 *   as time.monotonic_ns() there too). It does not jump with the wall clock; it stops while the host
 *   sleeps on macOS, which a phone call does not survive anyway.
 * - cb_clock_sleep_until() waits for an absolute deadline and returns only once it has passed (signals
 *   restart the wait on the same deadline, so no time is lost or added). It blocks: call it without
 *   the GIL.
 * - A cb_periodic is owned by one thread; nothing in it is atomic. The grid is start + k * period for
 *   k = 1, 2, ...; `next` is the k of the next deadline, `ticks` counts wakes delivered and `missed`
 *   counts grid points dropped, so after every wait the deadline just served is
 *   start + (ticks + missed) * period.
 *
 * MISSED PERIODS (the no-burst policy)
 * If cb_periodic_wait() is called when its deadline AND the following grid point have already passed
 * (the caller ran more than a whole period late), the grid points that are more than one period in the
 * past are dropped and counted in `missed`; the wait is served at once for the latest grid point that
 * has passed, with a lateness below one period. The next deadline is then in the future, so a stall
 * gives the caller one immediate wake, never a burst of them to "catch up". cb_periodic_skip_to_now()
 * drops every passed grid point, the latest included, for a caller that wants its next wake in the
 * future (e.g. after a hold).
 */
#ifndef CALLBOT_CLOCK_H
#define CALLBOT_CLOCK_H

#include <stdint.h>

/* Monotonic time in ns, in the time base of every deadline here. */
int64_t cb_clock_now_ns(void);

/* Sleep until now >= deadline_ns (absolute, monotonic ns). Returns 0, or an errno value when the OS
 * refused the wait (only for an invalid deadline, which cb_periodic never produces). A deadline already
 * in the past returns at once. */
int cb_clock_sleep_until(int64_t deadline_ns);

/* The same, but a signal ends the wait early with EINTR, so a caller with signal handlers to run
 * (Python: KeyboardInterrupt) can run them and call again with the same deadline. */
int cb_clock_sleep_until_interruptible(int64_t deadline_ns);

typedef struct cb_periodic {
    int64_t start_ns;  /* grid origin: deadlines are start_ns + k * period_ns, k >= 1 */
    int64_t period_ns; /* > 0 */
    int64_t next;      /* k of the next deadline */
    int64_t ticks;     /* wakes delivered by cb_periodic_wait */
    int64_t missed;    /* grid points dropped by the no-burst policy or skip_to_now */
} cb_periodic;

/* Put the grid origin at start_ns; the first deadline is start_ns + period_ns. Counters restart. */
void cb_periodic_reset(cb_periodic *p, int64_t period_ns, int64_t start_ns);

/* The next deadline, absolute monotonic ns. */
static inline int64_t cb_periodic_deadline(const cb_periodic *p) {
    return p->start_ns + p->next * p->period_ns;
}

/* Sleep until the next deadline (after applying the no-burst policy above), advance the grid by one and
 * return the lateness of this wake: wake time minus the deadline it served, in ns, >= 0. Blocks: call
 * it without the GIL. */
int64_t cb_periodic_wait(cb_periodic *p);

/* cb_periodic_wait in two halves, for a caller that sleeps by itself (interruptibly):
 * cb_periodic_begin applies the no-burst policy and returns the deadline to sleep until;
 * cb_periodic_end, called once that deadline has passed, advances the grid and returns the lateness. */
int64_t cb_periodic_begin(cb_periodic *p);
int64_t cb_periodic_end(cb_periodic *p, int64_t deadline_ns);

/* Move the next deadline to the first grid point after now; returns how many grid points it dropped
 * (also added to `missed`). Does not sleep. */
int64_t cb_periodic_skip_to_now(cb_periodic *p);

#endif /* CALLBOT_CLOCK_H */
