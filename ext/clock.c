/* clock.c: the platform calls behind clock.h (Linux and macOS twins), and the periodic grid. */
#if defined(__linux__)
#define _POSIX_C_SOURCE 200809L /* clock_nanosleep under -std=c11 */
#endif

#include "clock.h"

#include <errno.h>

#if defined(__APPLE__)
#include <mach/mach_time.h>
#include <pthread.h>
#elif defined(__linux__)
#include <time.h>
#else
#error "clock.c supports Linux and macOS"
#endif

#define NS_PER_S INT64_C(1000000000)

#if defined(__APPLE__)
/* mach_absolute_time ticks are numer/denom ns (1/1 on Intel, 125/3 on Apple silicon). The ratio never
 * changes while the system runs, so it is read once. 128-bit products keep the conversion exact and
 * free of overflow for any tick count. */
static mach_timebase_info_data_t timebase;
static pthread_once_t timebase_once = PTHREAD_ONCE_INIT;

static void timebase_init(void) { mach_timebase_info(&timebase); }

static int64_t ticks_to_ns(uint64_t ticks) {
    pthread_once(&timebase_once, timebase_init);
    return (int64_t)(((__uint128_t)ticks * timebase.numer) / timebase.denom);
}

/* Rounded up, so the wait never ends before the deadline in ns. */
static uint64_t ns_to_ticks_ceil(int64_t ns) {
    pthread_once(&timebase_once, timebase_init);
    __uint128_t num = (__uint128_t)(uint64_t)ns * timebase.denom;
    return (uint64_t)((num + timebase.numer - 1) / timebase.numer);
}
#endif

int64_t cb_clock_now_ns(void) {
#if defined(__APPLE__)
    return ticks_to_ns(mach_absolute_time());
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail for CLOCK_MONOTONIC with a valid pointer */
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
#endif
}

int cb_clock_sleep_until_interruptible(int64_t deadline_ns) {
    if (deadline_ns < 0) return EINVAL;
#if defined(__APPLE__)
    /* mach_wait_until takes an absolute tick count; KERN_ABORTED means a signal cut it short. */
    kern_return_t kr = mach_wait_until(ns_to_ticks_ceil(deadline_ns));
    return kr == KERN_SUCCESS ? 0 : kr == KERN_ABORTED ? EINTR : EINVAL;
#else
    struct timespec ts = {.tv_sec = deadline_ns / NS_PER_S, .tv_nsec = deadline_ns % NS_PER_S};
    /* clock_nanosleep returns the error number; it does not set errno. */
    return clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
#endif
}

int cb_clock_sleep_until(int64_t deadline_ns) {
    /* An interrupted wait restarts on the same absolute deadline, not on a recomputed relative delay,
     * so interruptions add no drift: the point of waiting on deadlines. */
    int err;
    do {
        err = cb_clock_sleep_until_interruptible(deadline_ns);
    } while (err == EINTR);
    return err;
}

void cb_periodic_reset(cb_periodic *p, int64_t period_ns, int64_t start_ns) {
    p->start_ns = start_ns;
    p->period_ns = period_ns;
    p->next = 1;
    p->ticks = 0;
    p->missed = 0;
}

int64_t cb_periodic_begin(cb_periodic *p) {
    int64_t deadline = cb_periodic_deadline(p);
    int64_t behind = cb_clock_now_ns() - deadline;
    if (behind >= p->period_ns) {
        /* No burst: serve only the latest grid point that has passed; drop the older ones. */
        int64_t drop = behind / p->period_ns;
        p->next += drop;
        p->missed += drop;
        deadline += drop * p->period_ns;
    }
    return deadline;
}

int64_t cb_periodic_end(cb_periodic *p, int64_t deadline_ns) {
    p->next += 1;
    p->ticks += 1;
    return cb_clock_now_ns() - deadline_ns;
}

int64_t cb_periodic_wait(cb_periodic *p) {
    int64_t deadline = cb_periodic_begin(p);
    cb_clock_sleep_until(deadline); /* deadline >= start_ns >= 0 (checked by the binding): cannot fail */
    return cb_periodic_end(p, deadline);
}

int64_t cb_periodic_skip_to_now(cb_periodic *p) {
    int64_t behind = cb_clock_now_ns() - cb_periodic_deadline(p);
    if (behind < 0) return 0;
    int64_t drop = behind / p->period_ns + 1; /* every grid point <= now */
    p->next += drop;
    p->missed += drop;
    return drop;
}
