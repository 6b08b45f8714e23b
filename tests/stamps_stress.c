/* stamps_stress.c: a writer thread appends to an ext/stamps.h log flat out while the main thread asks it
 * where positions near the oldest held pair went, no GIL in the way.
 *
 * Why: the Python tests append and read from one thread, so they never see a pair overwritten while it
 * is read. Here every pair's ns encodes the span of samples it covers, (total before) << 32 | (total
 * after), so each answer is checked exactly: find(pos) may say "unknown" (0), but a time it returns
 * must be that of the pair that moved sample pos - 1. The asked positions cluster around the oldest
 * held pairs, where the writer overwrites slots while the reader scans them. tests/test_stamps.py
 * builds this file plain and under ThreadSanitizer. Exit status: 0 = every answer right; 1 = not.
 */
#include "stamps.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef QUERIES
#define QUERIES 300000 /* finds the reader makes; then the writer stops */
#endif
#define MAX_APPENDS 20000000 /* pairs, at most 97 samples each: totals stay below 2^31 */

static cb_stamps *log_;
static atomic_int stop, done;
static int64_t last_n; /* the writer's last append, read after the join */

static int64_t span(int64_t before, int64_t after) { return (before << 32) | after; }

static void *writer(void *arg)
{
    (void)arg;
    int64_t total = 0;
    for (uint32_t k = 0; k < MAX_APPENDS && !atomic_load_explicit(&stop, memory_order_relaxed); k++) {
        int64_t n = 1 + (k * 37u) % 97u; /* 1..97 samples, never a divisor pattern of the 64 slots */
        cb_stamps_advance(log_, n, span(total, total + n));
        total += n;
        last_n = n;
        /* a pause of 0..255 spins: a reader's find scans up to 64 pairs, and an unpaced writer would
         * age every asked position out before the scan ends; the jitter varies where they meet */
        for (volatile uint32_t spin = (k * 2654435761u) >> 24; spin > 0; spin--) {
        }
    }
    atomic_store_explicit(&done, 1, memory_order_release);
    return NULL;
}

/* 0 if `t`, the answer to find(pos), is unknown or the pair covering sample pos - 1; else 1. */
static int wrong(int64_t pos, int64_t t)
{
    if (t == 0) return 0;
    int64_t before = t >> 32, after = t & 0xffffffff;
    if (before < pos && pos <= after) return 0;
    printf("find(%lld) answered the pair covering (%lld, %lld]\n", (long long)pos, (long long)before,
           (long long)after);
    return 1;
}

int main(void)
{
    log_ = aligned_alloc(CB_STAMPS_LINE, sizeof(cb_stamps));
    if (log_ == NULL) return 2;
    cb_stamps_init(log_);
    pthread_t thread;
    if (pthread_create(&thread, NULL, writer, NULL) != 0) return 2;

    uint64_t rng = 0x9e3779b97f4a7c15u, queries = 0, answered = 0;
    int64_t last_reached = 0;
    while (queries < QUERIES && !atomic_load_explicit(&done, memory_order_acquire)) {
        int64_t reached = cb_stamps_reached(log_);
        if (reached < last_reached) {
            printf("reached went back: %lld after %lld\n", (long long)reached, (long long)last_reached);
            return 1;
        }
        last_reached = reached;
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17; /* xorshift64 */
        int64_t pos;
        if (rng & 1) {
            /* anywhere from 64 pairs (about 3100 samples) behind the newest to 100 samples ahead */
            pos = reached + 100 - (int64_t)(rng % 3300);
        } else {
            /* within the oldest pairs held, where slots are overwritten while find reads them (the
             * test peeks at the log: a pair's total, 61 pairs back, minus up to 3 pairs of samples) */
            long long end = atomic_load_explicit(&log_->count, memory_order_acquire);
            size_t oldish = (size_t)(end - (CB_STAMPS_HELD - 3)) & (CB_STAMPS_HELD - 1);
            pos = atomic_load_explicit(&log_->pos[oldish], memory_order_relaxed) - (int64_t)(rng >> 1) % 300;
        }
        if (pos < 1) continue;
        int64_t t = cb_stamps_find(log_, pos);
        if (wrong(pos, t)) return 1;
        queries++;
        answered += t != 0;
    }
    atomic_store_explicit(&stop, 1, memory_order_relaxed);
    pthread_join(thread, NULL);

    /* quiet now: the newest pairs answer exactly, later positions are not reached yet */
    int64_t total = cb_stamps_reached(log_);
    if (wrong(total, cb_stamps_find(log_, total)) || cb_stamps_find(log_, total) == 0
        || cb_stamps_find(log_, total - last_n) == 0 || cb_stamps_find(log_, total + 1) != 0) {
        printf("after the writer stopped: appended %lld, reached %lld\n", (long long)cb_stamps_appended(log_),
               (long long)total);
        return 1;
    }
    printf("appended %lld pairs; %llu queries, %llu answered\n", (long long)cb_stamps_appended(log_),
           (unsigned long long)queries, (unsigned long long)answered);
    free(log_);
    return 0;
}
