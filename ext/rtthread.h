/* rtthread.h: ask the OS to run the CALLING thread as a real-time thread, get told what it granted,
 * and put the thread back the way it was.
 *
 * Why it exists: the inference thread must wake on its 80 ms deadline and finish its step before the
 * next one even when other work wants the same cores (docs/latency.md, "Cadence"). Under the default
 * time-sharing policy a wake waits behind whatever else is runnable; a real-time policy runs first.
 * Such policies need privileges that a phone bot usually lacks, so asking never fails: the call takes
 * the best the OS allows and reports what that was and why the first choice was refused.
 *
 * WHAT IS TRIED, IN ORDER
 * Linux: 1. SCHED_FIFO at the asked priority (pthread_setschedparam). Refused (EPERM) without
 *           CAP_SYS_NICE unless RLIMIT_RTPRIO allows it, so on EPERM the priority is lowered to that
 *           limit when it is >= 1 and tried again.
 *        2. Else stay SCHED_OTHER and lower the thread's nice value (setpriority on the thread id: on
 *           Linux nice is per thread), to the asked value or, if refused, to the floor RLIMIT_NICE allows.
 *        Under SCHED_OTHER the thread's timer slack is also set to 1 ns (PR_SET_TIMERSLACK, needs no
 *        privilege): the default 50 us of slack makes every timed wake up to 50 us late. SCHED_FIFO
 *        threads have no slack. SCHED_DEADLINE would take period/computation/constraint directly, but it
 *        always needs root, refuses fork() and has admission control: not worth it for one thread.
 * macOS: 1. THREAD_TIME_CONSTRAINT_POLICY with period, computation, constraint in mach absolute time
 *           units. The kernel refuses a computation outside [50 us, 50 ms] (xnu max_rt_quantum), so it is
 *           clamped into that range first and the value used is reported.
 *        2. Else pthread_set_qos_class_self_np(QOS_CLASS_USER_INTERACTIVE, 0).
 *
 * CONTRACT
 * - Every call acts on the calling thread only. cb_rt_restore must be called on the thread whose state
 *   was saved; it returns CB_RT_WRONG_THREAD otherwise and changes nothing.
 * - Arguments are checked by the caller (the Python layer): 0 < computation <= constraint <= period,
 *   all of them small enough for 32 bits of mach time units.
 */
#ifndef CALLBOT_RTTHREAD_H
#define CALLBOT_RTTHREAD_H

#include <pthread.h>
#include <stdint.h>

#if defined(__APPLE__)
#include <mach/mach.h>
#include <mach/thread_policy.h>
#include <pthread/qos.h>
#elif !defined(__linux__)
#error "rtthread supports Linux and macOS"
#endif

enum cb_rt_kind {
    CB_RT_UNCHANGED = 0,      /* nothing could be changed */
    CB_RT_FIFO = 1,           /* Linux SCHED_FIFO; priority = its sched priority */
    CB_RT_OTHER = 2,          /* Linux SCHED_OTHER kept; priority = the thread's nice value */
    CB_RT_TIME_CONSTRAINT = 3, /* macOS THREAD_TIME_CONSTRAINT_POLICY */
    CB_RT_QOS_INTERACTIVE = 4, /* macOS QOS_CLASS_USER_INTERACTIVE */
};

#define CB_RT_WRONG_THREAD (-1)

typedef struct cb_rt_result {
    int kind;               /* enum cb_rt_kind: what the thread runs under now */
    int priority;           /* see enum cb_rt_kind; 0 on macOS */
    int primary_err;        /* why the first choice was refused: errno (Linux), kern_return_t
                               (macOS); 0 = granted */
    int fallback_err;       /* why the fallback was refused (errno); 0 = granted or not needed */
    int64_t computation_ns; /* macOS: computation asked of the kernel after clamping; Linux: as given */
} cb_rt_result;

/* The calling thread's scheduling state, as cb_rt_make_realtime found it. */
typedef struct cb_rt_saved {
    pthread_t thread;
#if defined(__linux__)
    int policy;
    int sched_priority;
    int nice;
    unsigned long timer_slack_ns;
#else
    int had_time_constraint;
    thread_time_constraint_policy_data_t time_constraint;
    qos_class_t qos;
    int qos_relative_priority;
#endif
} cb_rt_saved;

/* Save the calling thread's state into *saved, then make it as real-time as permitted (above) and
 * describe the outcome in *result. fifo_priority and target_nice are Linux's targets (ignored on macOS). */
void cb_rt_make_realtime(int64_t period_ns, int64_t computation_ns, int64_t constraint_ns,
                         int fifo_priority, int target_nice, cb_rt_result *result, cb_rt_saved *saved);

/* Put the calling thread back to *saved. Returns 0, CB_RT_WRONG_THREAD, or the errno / kern_return_t of
 * the first call that failed. */
int cb_rt_restore(const cb_rt_saved *saved);

#endif /* CALLBOT_RTTHREAD_H */
