/* stamps.h: when audio crossed the media side of a ring, as (cumulative samples, monotonic ns) pairs.
 *
 * Why it exists: the engine stamps every frame's stages itself (engine/serving/runner.py FrameStats), but
 * the first and last stages happen in the media callbacks (pjmedia's clock thread, possibly another
 * process): the caller's audio entering the rx ring and the bot's audio leaving the tx ring. Those
 * callbacks may not take a lock, allocate or make a syscall beyond a clock read, so they only append
 * one pair here per callback; the engine side later maps a frame's sample positions to those times.
 *
 * CONTRACT
 * - One writer, any number of readers. Exactly one thread (or process) calls cb_stamps_advance at any
 *   one time (the media callback); any thread may call the readers (cb_stamps_find, _appended, _reached,
 *   _valid), which write nothing. Two writers corrupt the log; nothing here detects it.
 * - Wait-free writer: cb_stamps_advance is a few stores, never blocks, never allocates. The readers
 *   never block the writer; cb_stamps_find is wait-free, cb_stamps_reached retries only if the writer
 *   laps the log while it reads (the reader stalled for CB_STAMPS_HELD - 1 callbacks, 1.26 s).
 * - The log does not own its memory: the caller provides CB_STAMPS_BYTES bytes aligned to at least 8
 *   (mmap'd shared memory is page aligned), keeps them alive while the log is used, and frees them.
 *   The block holds no pointers, so each process may map it at a different address.
 * - cb_stamps_init is not thread-safe: it must finish before the writer starts (a thread start or a
 *   process spawn orders it); an attacher checks cb_stamps_valid first.
 * - The writer keeps `total`, the samples it moved through its ring since the ring was made, and
 *   appends (total after this callback, ns) with cb_stamps_advance. For rx it appends BEFORE it
 *   writes the samples (ns read before them too), so a reader that sees a sample finds its stamp, and
 *   the stamp is never later than the sample could be read. For tx it appends AFTER it read them.
 * - The reader asks cb_stamps_find(s, pos): the ns of the oldest pair still held whose total >= pos
 *   (the callback that moved sample pos - 1), 0 if no held pair reaches pos yet or pos is older than
 *   the last CB_STAMPS_HELD - 1 callbacks (1.26 s of 20 ms callbacks): the oldest pair held only
 *   bounds the start of the next one (the samples it covers began in a pair already gone).
 *
 * MEMORY ORDERING (each use below says which hazard its barrier prevents)
 * The pairs are a seqlock whose sequence number is `count`: the writer fills slot count % HELD and then
 * publishes count + 1 with release; a reader loads count with acquire (the pairs below it are
 * complete), reads pairs with relaxed loads, and then re-loads count after an acquire fence to drop
 * any pair the writer may have started to overwrite meanwhile (Boehm, "Can seqlocks get along with
 * programming language memory models?", MSPC 2012: the fence pair below is his). count and the pairs
 * are atomic words, so a racing read returns an old or a new value, never a torn one; the seqlock
 * check decides whether that value may be trusted. tests/stamps_stress.c runs writer and reader flat
 * out and checks every answer against the pair that truly covers the asked position.
 *
 * SHARED MEMORY
 * As in ring.h: a lock-free atomic is a plain memory word updated by one CPU instruction, so it works
 * from any mapping of the same physical page ("address-free", C11 7.17.5 note); a non-lock-free one
 * would be emulated with a lock private to each process, and the log would silently stop being
 * atomic across processes. Hence the compile-time checks below.
 */
#ifndef CALLBOT_STAMPS_H
#define CALLBOT_STAMPS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if !defined(ATOMIC_LLONG_LOCK_FREE) || ATOMIC_LLONG_LOCK_FREE != 2
#error "stamps.h needs always-lock-free 64-bit atomics: only they are address-free across processes"
#endif
#if !defined(ATOMIC_INT_LOCK_FREE) || ATOMIC_INT_LOCK_FREE != 2
#error "stamps.h needs always-lock-free int atomics: only they are address-free across processes"
#endif

/* 128 bytes, as CB_RING_LINE in ring.h (Apple M-series cache lines; x86-64's adjacent-line prefetch):
 * fields written by different threads sit at least this far apart (no false sharing). */
#define CB_STAMPS_LINE 128
#define CB_STAMPS_HELD 64 /* pairs held (a power of two) */
#define CB_STAMPS_MAGIC 0x504d5453u /* "STMP" read as little-endian bytes */
#define CB_STAMPS_VERSION 2u        /* 2: C11 atomics, 128-byte lines (1 had 64-byte lines, 1088 bytes) */

typedef struct cb_stamps {
    /* Written once by cb_stamps_init, read-only afterwards. magic is stored last, with release, so an
     * attacher that sees it (acquire) also sees the other header fields and the zeroed log. */
    atomic_uint magic;
    uint32_t version;
    uint32_t held;         /* CB_STAMPS_HELD at creation: an attacher built with another value refuses */
    uint32_t header_bytes; /* offsetof(cb_stamps, pos) at creation */
    char pad0_[CB_STAMPS_LINE - 4 * 4];

    /* Written by the writer only. */
    atomic_llong count; /* pairs appended so far; pair k sits in slot k % HELD until pair k + HELD */
    long long total;    /* samples moved so far; writer-private (no reader loads it), so not atomic */
    char pad1_[CB_STAMPS_LINE - 2 * 8];

    /* Written by the writer only, read by readers. No padding between them and `count`: the same side
     * writes both, and readers write nothing, so no line is shared by two writers. */
    atomic_llong pos[CB_STAMPS_HELD]; /* the writer's total after the callback */
    atomic_llong ns[CB_STAMPS_HELD];  /* monotonic ns of that callback */
} cb_stamps;

_Static_assert(sizeof(atomic_llong) == 8 && sizeof(long long) == 8, "pairs are 64-bit words");
_Static_assert(offsetof(cb_stamps, count) == CB_STAMPS_LINE, "writer fields on their own line");
_Static_assert(offsetof(cb_stamps, pos) == 2 * CB_STAMPS_LINE, "pairs start on their own line");
_Static_assert(sizeof(cb_stamps) == 2 * CB_STAMPS_LINE + 2 * 8 * CB_STAMPS_HELD,
               "layout is shared between processes (callbot.engine.audio._stamps.NBYTES)");
_Static_assert((CB_STAMPS_HELD & (CB_STAMPS_HELD - 1)) == 0, "slots are indexed by masking");

#define CB_STAMPS_BYTES ((int64_t)sizeof(cb_stamps))

/* Lays out an empty log in `s` (CB_STAMPS_BYTES, 8-byte aligned). Not thread-safe (see CONTRACT). */
static inline void cb_stamps_init(cb_stamps *s)
{
    memset(s, 0, sizeof(cb_stamps));
    s->version = CB_STAMPS_VERSION;
    s->held = CB_STAMPS_HELD;
    s->header_bytes = (uint32_t)offsetof(cb_stamps, pos);
    atomic_init(&s->count, 0);
    for (int i = 0; i < CB_STAMPS_HELD; i++) {
        atomic_init(&s->pos[i], 0);
        atomic_init(&s->ns[i], 0);
    }
    /* release: an attacher that acquires the magic sees the fields above, not what the block held. */
    atomic_store_explicit(&s->magic, CB_STAMPS_MAGIC, memory_order_release);
}

/* 1 if `s` holds a log this header understands (initialised, same version and slot count), else 0. */
static inline int cb_stamps_valid(const cb_stamps *s)
{
    /* acquire: pairs with the release in cb_stamps_init, so the fields read below are its own. */
    if (atomic_load_explicit(&((cb_stamps *)s)->magic, memory_order_acquire) != CB_STAMPS_MAGIC) return 0;
    return s->version == CB_STAMPS_VERSION && s->held == CB_STAMPS_HELD
           && s->header_bytes == offsetof(cb_stamps, pos);
}

/* Writer: `n` more samples moved at `ns`. */
static inline void cb_stamps_advance(cb_stamps *s, int64_t n, int64_t ns)
{
    /* relaxed: only this side stores count, so it reads its own last store. */
    long long c = atomic_load_explicit(&s->count, memory_order_relaxed);
    size_t i = (size_t)c & (CB_STAMPS_HELD - 1);
    s->total += n;
    /* release fence: the slot is about to be overwritten (pair c replaces pair c - HELD). A reader whose
     * loads below see the new pos or ns must, after its acquire fence, also see count >= c (stored by
     * the previous append, before this fence), so its re-check knows pair c - HELD may be gone; without
     * the fence it could see the new values with an older count and return pair c's time for a
     * position of pair c - HELD. */
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&s->pos[i], s->total, memory_order_relaxed);
    atomic_store_explicit(&s->ns[i], ns, memory_order_relaxed);
    /* release: the pair is stored before the count that covers it becomes visible; without it a reader
     * could count pair c as there and read the slot still holding pair c - HELD. */
    atomic_store_explicit(&s->count, c + 1, memory_order_release);
}

/* Reader: 1 if what was read from pair k's slot before an acquire fence is pair k's, given `end`, the
 * count loaded after that fence: the append in progress at count == end overwrites pair end - HELD,
 * and the appends after it overwrite newer pairs (which the fence would have made end show). */
static inline int cb_stamps_held_(long long k, long long end) { return k > end - CB_STAMPS_HELD; }

/* Reader: ns of the oldest held pair with total >= pos, else 0 (see CONTRACT). */
static inline int64_t cb_stamps_find(const cb_stamps *s, int64_t pos)
{
    cb_stamps *w = (cb_stamps *)s; /* C11 atomic loads take non-const pointers */
    /* acquire: pairs with the release of count in cb_stamps_advance, so pairs below end are complete. */
    long long end = atomic_load_explicit(&w->count, memory_order_acquire);
    long long first = end > CB_STAMPS_HELD ? end - CB_STAMPS_HELD : 0;
    long long k, found = -1;
    int64_t ns = 0;
    for (k = first; k < end; k++) {
        size_t i = (size_t)k & (CB_STAMPS_HELD - 1);
        /* relaxed: ordered by the acquire above (complete) and the fence below (still held) */
        if (atomic_load_explicit(&w->pos[i], memory_order_relaxed) >= pos) {
            found = k;
            ns = atomic_load_explicit(&w->ns[i], memory_order_relaxed);
            break;
        }
    }
    if (found < 0) return 0;
    /* pair found answers only if the pair before it was read too (its total < pos, so sample pos - 1
     * was moved by pair found) or none came before it. That read needs no check of its own: its slot
     * holds pair found - 1 or a newer pair, and a newer pair's total is >= pair found's, >= pos, so a
     * value < pos can only be pair found - 1's (which is why the slot under overwrite, pair
     * end - HELD, may be scanned). */
    if (found == first && first > 0) return 0;
    /* acquire fence: pairs with the writer's release fence. If any pos or ns read above came from an
     * append that overwrote its slot, the count loaded below shows that append begun. */
    atomic_thread_fence(memory_order_acquire);
    long long end2 = atomic_load_explicit(&w->count, memory_order_relaxed);
    if (!cb_stamps_held_(found, end2)) return 0; /* its slot was overwritten meanwhile: too old */
    return ns;
}

/* Reader: how many pairs the writer has appended (0: it never stamped). */
static inline int64_t cb_stamps_appended(const cb_stamps *s)
{
    /* acquire: a caller that goes on to read pairs below this count sees them complete. */
    return atomic_load_explicit(&((cb_stamps *)s)->count, memory_order_acquire);
}

/* Reader: the total of the last pair appended (how far its stamps reach; 0 if none). A sample the ring
 * shows as moved but beyond `reached` is one the writer moved and has not stamped yet (for tx it stamps
 * just after reading): ask again, it is not lost. */
static inline int64_t cb_stamps_reached(const cb_stamps *s)
{
    cb_stamps *w = (cb_stamps *)s;
    for (;;) {
        /* acquire: pairs with the release of count, so pair end - 1 is complete. */
        long long end = atomic_load_explicit(&w->count, memory_order_acquire);
        if (end == 0) return 0;
        int64_t reached = atomic_load_explicit(&w->pos[(size_t)(end - 1) & (CB_STAMPS_HELD - 1)],
                                               memory_order_relaxed);
        /* acquire fence: as in cb_stamps_find, the re-check below sees an append that overwrote the slot */
        atomic_thread_fence(memory_order_acquire);
        if (cb_stamps_held_(end - 1, atomic_load_explicit(&w->count, memory_order_relaxed))) return reached;
        /* the writer lapped the log while this thread was descheduled: read the newest pair again */
    }
}

#endif /* CALLBOT_STAMPS_H */
