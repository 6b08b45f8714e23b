/* stamps.h: when audio crossed the media side of a ring, as (cumulative samples, monotonic ns) pairs.
 *
 * Why it exists: the engine stamps every frame's stages itself (engine/serving/runner.py FrameStats), but the
 * first and last stages happen in the media callbacks (pjmedia's clock thread, possibly another
 * process): the caller's audio entering the rx ring and the bot's audio leaving the tx ring. Those
 * callbacks may not take a lock, allocate or make a syscall beyond a clock read, so they only append
 * one pair here per callback; the engine side later maps a frame's sample positions to those times.
 *
 * CONTRACT
 * - One writer thread (the media callback) and one reader thread (the engine); the block may live in
 *   shared memory, in two processes. 8-byte aligned, CB_STAMPS_BYTES long, zeroed, then
 *   cb_stamps_init.
 * - The writer keeps `total`, the samples it moved through its ring since the ring was made, and
 *   appends (total after this callback, ns) with cb_stamps_advance. For rx it appends BEFORE it
 *   writes the samples (ns read before them too), so a reader that sees a sample finds its stamp, and
 *   the stamp is never later than the sample could be read. For tx it appends AFTER it read them.
 * - The reader asks cb_stamps_find(s, pos): the ns of the oldest pair still held whose total >= pos
 *   (the callback that moved sample pos - 1), 0 if no held pair reaches pos yet or pos is older than
 *   the last CB_STAMPS_HELD - 1 callbacks (1.26 s of 20 ms callbacks).
 * - Lock-free: entries are written with relaxed atomics and published by a release store of `count`;
 *   the reader loads `count` with acquire, reads, and re-checks `count` to drop entries the writer may
 *   have overwritten meanwhile. Never blocks, never allocates.
 */
#ifndef CALLBOT_STAMPS_H
#define CALLBOT_STAMPS_H

#include <stdint.h>

#define CB_STAMPS_HELD 64              /* pairs held (a power of two) */
#define CB_STAMPS_MAGIC 0x53544d5031ULL /* "STMP1" */

typedef struct cb_stamps {
    uint64_t magic;
    int64_t total;  /* writer only: samples moved so far */
    int64_t count;  /* pairs appended so far (release-stored by the writer) */
    int64_t pad[5]; /* the pairs start on their own 64-byte line */
    int64_t pos[CB_STAMPS_HELD];
    int64_t ns[CB_STAMPS_HELD];
} cb_stamps;

#define CB_STAMPS_BYTES ((int64_t)sizeof(cb_stamps))

static inline void cb_stamps_init(cb_stamps *s) {
    s->total = 0;
    __atomic_store_n(&s->count, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->magic, CB_STAMPS_MAGIC, __ATOMIC_RELEASE);
}

static inline int cb_stamps_valid(const cb_stamps *s) {
    return __atomic_load_n(&s->magic, __ATOMIC_ACQUIRE) == CB_STAMPS_MAGIC;
}

/* Writer: `n` more samples moved at `ns`. */
static inline void cb_stamps_advance(cb_stamps *s, int64_t n, int64_t ns) {
    int64_t c = __atomic_load_n(&s->count, __ATOMIC_RELAXED);
    int64_t i = c & (CB_STAMPS_HELD - 1);
    s->total += n;
    __atomic_store_n(&s->pos[i], s->total, __ATOMIC_RELAXED);
    __atomic_store_n(&s->ns[i], ns, __ATOMIC_RELAXED);
    __atomic_store_n(&s->count, c + 1, __ATOMIC_RELEASE);
}

/* Reader: ns of the oldest held pair with total >= pos, else 0. */
static inline int64_t cb_stamps_find(const cb_stamps *s, int64_t pos) {
    int64_t end = __atomic_load_n(&s->count, __ATOMIC_ACQUIRE);
    int64_t first = end > CB_STAMPS_HELD ? end - CB_STAMPS_HELD : 0;
    int64_t k, found = -1, ns = 0;
    for (k = first; k < end; k++) {
        if (__atomic_load_n(&s->pos[k & (CB_STAMPS_HELD - 1)], __ATOMIC_RELAXED) >= pos) {
            found = k;
            ns = __atomic_load_n(&s->ns[k & (CB_STAMPS_HELD - 1)], __ATOMIC_RELAXED);
            break;
        }
    }
    if (found < 0)
        return 0;
    /* the entry may have been overwritten while we read it: only trust it if it is still held */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    end = __atomic_load_n(&s->count, __ATOMIC_RELAXED);
    if (found < end - CB_STAMPS_HELD)
        return 0;
    /* the oldest pair reaching pos is only the right one if the pair before it is still held too
     * (or none came before it): otherwise pos may belong to a pair already overwritten */
    if (found == first && first > 0)
        return 0;
    return ns;
}

/* Reader: how many pairs the writer has appended (0: it never stamped), and the total of the last one
 * (how far its stamps reach). A sample the ring shows as moved but beyond `reached` is one the writer
 * moved and has not stamped yet (for tx it stamps just after reading): ask again, it is not lost. */
static inline int64_t cb_stamps_appended(const cb_stamps *s) {
    return __atomic_load_n(&s->count, __ATOMIC_ACQUIRE);
}

static inline int64_t cb_stamps_reached(const cb_stamps *s) {
    int64_t end = __atomic_load_n(&s->count, __ATOMIC_ACQUIRE);
    if (end == 0)
        return 0;
    /* the last pair is overwritten only CB_STAMPS_HELD appends later: read it as it is now */
    return __atomic_load_n(&s->pos[(end - 1) & (CB_STAMPS_HELD - 1)], __ATOMIC_RELAXED);
}

#endif /* CALLBOT_STAMPS_H */
