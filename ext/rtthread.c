/* rtthread.c: the platform calls behind rtthread.h (Linux and macOS twins). */
#if defined(__linux__)
#define _GNU_SOURCE /* syscall(SYS_gettid), PR_SET_TIMERSLACK, RLIMIT_RTPRIO under -std=c11 */
#endif

#include "rtthread.h"

#include <errno.h>

#if defined(__linux__)
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#include <mach/mach_time.h>
#endif

#if defined(__linux__)

static pid_t thread_id(void) { return (pid_t)syscall(SYS_gettid); }

/* getpriority may legitimately return -1, so success is told by errno. */
static int thread_nice(pid_t tid, int *out) {
    errno = 0;
    int v = getpriority(PRIO_PROCESS, (id_t)tid);
    if (v == -1 && errno) return errno;
    *out = v;
    return 0;
}

static int set_thread_nice(pid_t tid, int value) {
    return setpriority(PRIO_PROCESS, (id_t)tid, value) == 0 ? 0 : errno;
}

void cb_rt_make_realtime(int64_t period_ns, int64_t computation_ns, int64_t constraint_ns,
                         int fifo_priority, int target_nice, cb_rt_result *r, cb_rt_saved *s) {
    (void)period_ns; /* SCHED_FIFO has no notion of period or constraint: see the header */
    (void)constraint_ns;
    pthread_t self = pthread_self();
    pid_t tid = thread_id();
    struct sched_param param;

    s->thread = self;
    pthread_getschedparam(self, &s->policy, &param); /* cannot fail for the calling thread */
    s->sched_priority = param.sched_priority;
    s->nice = 0;
    thread_nice(tid, &s->nice);
    s->timer_slack_ns = (unsigned long)prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);

    r->kind = CB_RT_UNCHANGED;
    r->priority = 0;
    r->primary_err = 0;
    r->fallback_err = 0;
    r->computation_ns = computation_ns;

    /* 1. SCHED_FIFO, at the asked priority or the lower one RLIMIT_RTPRIO grants without privilege. */
    int lo = sched_get_priority_min(SCHED_FIFO), hi = sched_get_priority_max(SCHED_FIFO);
    int prio = fifo_priority < lo ? lo : fifo_priority > hi ? hi : fifo_priority;
    param.sched_priority = prio;
    int err = pthread_setschedparam(self, SCHED_FIFO, &param); /* returns the error; errno untouched */
    if (err == EPERM) {
        struct rlimit rl;
        if (getrlimit(RLIMIT_RTPRIO, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
            (rlim_t)lo <= rl.rlim_cur && rl.rlim_cur < (rlim_t)prio) {
            r->primary_err = err;
            prio = (int)rl.rlim_cur;
            param.sched_priority = prio;
            err = pthread_setschedparam(self, SCHED_FIFO, &param);
        }
    }
    if (err == 0) {
        r->kind = CB_RT_FIFO;
        r->priority = prio;
        return;
    }
    r->primary_err = err;

    /* 2. SCHED_OTHER (unchanged) with a lower nice value and no timer slack. */
    r->kind = CB_RT_OTHER;
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    int now = s->nice;
    if (target_nice < now) {
        err = set_thread_nice(tid, target_nice);
        if (err == 0) {
            now = target_nice;
        } else {
            r->fallback_err = err;
            /* RLIMIT_NICE lets an unprivileged thread go down to 20 - limit. */
            struct rlimit rl;
            if (getrlimit(RLIMIT_NICE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur <= 40) {
                int nice_floor = 20 - (int)rl.rlim_cur;
                if (nice_floor > target_nice && nice_floor < now && set_thread_nice(tid, nice_floor) == 0)
                    now = nice_floor;
            }
        }
    }
    thread_nice(tid, &now);
    r->priority = now;
}

int cb_rt_restore(const cb_rt_saved *s) {
    pthread_t self = pthread_self();
    if (!pthread_equal(self, s->thread)) return CB_RT_WRONG_THREAD;
    struct sched_param param = {.sched_priority = s->sched_priority};
    int err = pthread_setschedparam(self, s->policy, &param);
    int err2 = set_thread_nice(thread_id(), s->nice);
    prctl(PR_SET_TIMERSLACK, s->timer_slack_ns, 0, 0, 0);
    return err ? err : err2;
}

#else /* __APPLE__ */

/* ns -> mach absolute time units (1 on Intel, 3/125 on Apple silicon): ns * denom / numer. */
static uint32_t ns_to_abs(int64_t ns) {
    mach_timebase_info_data_t tb;
    mach_timebase_info(&tb);
    uint64_t v = (uint64_t)(((__uint128_t)(uint64_t)ns * tb.denom) / tb.numer);
    return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
}

#define MIN_COMPUTATION_NS INT64_C(50000)    /* xnu min_rt_quantum: 50 us */
#define MAX_COMPUTATION_NS INT64_C(50000000) /* xnu max_rt_quantum: 50 ms */

void cb_rt_make_realtime(int64_t period_ns, int64_t computation_ns, int64_t constraint_ns,
                         int fifo_priority, int target_nice, cb_rt_result *r, cb_rt_saved *s) {
    (void)fifo_priority;
    (void)target_nice;
    pthread_t self = pthread_self();
    thread_port_t port = pthread_mach_thread_np(self);

    s->thread = self;
    mach_msg_type_number_t count = THREAD_TIME_CONSTRAINT_POLICY_COUNT;
    boolean_t get_default = FALSE;
    kern_return_t kr = thread_policy_get(port, THREAD_TIME_CONSTRAINT_POLICY,
                                         (thread_policy_t)&s->time_constraint, &count, &get_default);
    /* get_default comes back TRUE when the thread has no time-constraint policy of its own. */
    s->had_time_constraint = kr == KERN_SUCCESS && !get_default;
    if (pthread_get_qos_class_np(self, &s->qos, &s->qos_relative_priority) != 0) {
        s->qos = QOS_CLASS_UNSPECIFIED;
        s->qos_relative_priority = 0;
    }

    r->kind = CB_RT_UNCHANGED;
    r->priority = 0;
    r->primary_err = 0;
    r->fallback_err = 0;

    /* 1. Time-constraint policy: the kernel schedules the thread to get `computation` of CPU within
     * `constraint` of the start of each `period`. */
    int64_t comp = computation_ns < MIN_COMPUTATION_NS ? MIN_COMPUTATION_NS
                 : computation_ns > MAX_COMPUTATION_NS ? MAX_COMPUTATION_NS : computation_ns;
    int64_t cons = constraint_ns < comp ? comp : constraint_ns;
    r->computation_ns = comp;
    thread_time_constraint_policy_data_t policy = {
        .period = ns_to_abs(period_ns),
        .computation = ns_to_abs(comp),
        .constraint = ns_to_abs(cons),
        .preemptible = TRUE, /* a step of tens of ms must not hold a core against the audio threads */
    };
    kr = thread_policy_set(port, THREAD_TIME_CONSTRAINT_POLICY, (thread_policy_t)&policy,
                           THREAD_TIME_CONSTRAINT_POLICY_COUNT);
    if (kr == KERN_SUCCESS) {
        r->kind = CB_RT_TIME_CONSTRAINT;
        return;
    }
    r->primary_err = kr;

    /* 2. The highest QoS class an app may ask for without privileges. */
    int err = pthread_set_qos_class_self_np(QOS_CLASS_USER_INTERACTIVE, 0);
    if (err == 0) {
        r->kind = CB_RT_QOS_INTERACTIVE;
    } else {
        r->fallback_err = err;
    }
}

int cb_rt_restore(const cb_rt_saved *s) {
    pthread_t self = pthread_self();
    if (!pthread_equal(self, s->thread)) return CB_RT_WRONG_THREAD;
    thread_port_t port = pthread_mach_thread_np(self);
    kern_return_t kr;
    if (s->had_time_constraint) {
        kr = thread_policy_set(port, THREAD_TIME_CONSTRAINT_POLICY, (thread_policy_t)&s->time_constraint,
                               THREAD_TIME_CONSTRAINT_POLICY_COUNT);
    } else {
        /* Leaving the real-time band = going back to the standard time-sharing policy. */
        thread_extended_policy_data_t standard = {.timeshare = TRUE};
        kr = thread_policy_set(port, THREAD_EXTENDED_POLICY, (thread_policy_t)&standard,
                               THREAD_EXTENDED_POLICY_COUNT);
    }
    int err = 0;
    if (s->qos != QOS_CLASS_UNSPECIFIED) {
        err = pthread_set_qos_class_self_np(s->qos, s->qos_relative_priority);
    }
    return kr != KERN_SUCCESS ? (int)kr : err;
}

#endif
