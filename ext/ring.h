/* ring.h: a lock-free single-producer / single-consumer ring of PCM samples.
 *
 * Why it exists: the pjmedia clock thread, the resampler and the inference thread hand PCM to each
 * other without locks, allocation or waiting (docs/latency.md, "Hot-path rules"), and the same ring
 * must work when producer and consumer are two processes sharing a memory block (the JACK model).
 *
 * CONTRACT
 * - One producer and one consumer. Exactly one thread (or process) calls the write side
 *   (cb_ring_write, cb_ring_write_regions / cb_ring_commit_write) and exactly one calls the read side
 *   (cb_ring_read, cb_ring_read_regions / cb_ring_commit_read), at any one time. Two producers or two
 *   consumers corrupt the ring; nothing here detects it.
 * - Wait-free on both sides: every call finishes in a bounded number of steps, never blocks, never
 *   allocates. What does not fit is not written (the caller is told how much was); a read that finds
 *   fewer samples than asked copies what is there.
 * - Capacity is a power of two, counted in samples (items of `itemsize` bytes), at most
 *   CB_RING_MAX_CAPACITY. All of it is usable: the indices are 64-bit counters that only grow (masked
 *   on use), so full (write - read == capacity) and empty (write == read) never look alike. At 192 kHz
 *   a 64-bit counter wraps after three million years.
 * - The ring does not own its memory. The caller provides one block of cb_ring_nbytes(capacity,
 *   itemsize) bytes, aligned to at least 8 bytes (mmap'd shared memory is page aligned), keeps it alive
 *   while the ring is used, and frees it. The block holds the header and the samples and no pointers,
 *   so each process may map it at a different address.
 * - cb_ring_init is not thread-safe: it must finish before either side starts (a thread start or a
 *   process spawn orders it). There is no reset: make a new ring instead, since a reset racing a live
 *   producer or consumer cannot be made safe without a lock.
 * - Readable/writable counts asked from a third thread are a snapshot, clamped to [0, capacity].
 *
 * MEMORY ORDERING (each use below says which hazard its barrier prevents)
 * Each side writes only its own index and reads the other's. A side loads the other's index with
 * acquire and publishes its own with release, so "samples copied, then index moved" on one side is
 * seen in that order by the other. Nothing stronger (seq_cst) is needed: there is no third variable
 * whose order with the indices matters. tests/ring_stress.c runs both sides under ThreadSanitizer,
 * which reports a race on the samples when any one of the four acquire/release pairs is weakened.
 *
 * SHARED MEMORY
 * A lock-free atomic is a plain memory word updated by one CPU instruction, so it works from any
 * mapping of the same physical page ("address-free", C11 7.17.5 note). A non-lock-free atomic would be
 * emulated with a lock kept in a table inside this process, invisible to the other process: the ring
 * would silently stop being atomic across processes. Hence the compile-time checks below.
 */
#ifndef CALLBOT_RING_H
#define CALLBOT_RING_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if !defined(ATOMIC_LLONG_LOCK_FREE) || ATOMIC_LLONG_LOCK_FREE != 2
#error "ring.h needs always-lock-free 64-bit atomics: only they are address-free across processes"
#endif
#if !defined(ATOMIC_INT_LOCK_FREE) || ATOMIC_INT_LOCK_FREE != 2
#error "ring.h needs always-lock-free int atomics: only they are address-free across processes"
#endif

/* 128 bytes: Apple M-series cores use 128-byte cache lines, x86-64 64-byte lines (and its adjacent-line
 * prefetcher pulls pairs of them). Fields written by different sides sit at least this far apart so a
 * store by one side never invalidates the line the other side is spinning on (false sharing). */
#define CB_RING_LINE 128
#define CB_RING_MAGIC 0x47524243u /* "CBRG" read as little-endian bytes */
#define CB_RING_VERSION 1u
#define CB_RING_MAX_CAPACITY (1u << 30) /* samples: 4 GiB of float32, far above any audio use */

/* Sample types, stored in the header so that an attaching process can check what it maps. */
enum { CB_RING_INT16 = 1, CB_RING_FLOAT32 = 2 };

/* Results of cb_ring_check (why a block is not a ring an attacher can use). */
enum {
    CB_RING_OK = 0,
    CB_RING_ERR_SIZE = 1,      /* block smaller than the header, or than header + data */
    CB_RING_ERR_ALIGN = 2,     /* block not 8-byte aligned: the atomics would tear */
    CB_RING_ERR_MAGIC = 3,     /* no ring was initialised here */
    CB_RING_ERR_VERSION = 4,   /* initialised by an incompatible ring.h */
    CB_RING_ERR_CAPACITY = 5,  /* capacity not a power of two within limits */
    CB_RING_ERR_DTYPE = 6,     /* unknown sample type or itemsize */
    CB_RING_ERR_INDICES = 7,   /* read index ahead of the write index, or more than capacity behind */
};

typedef struct cb_ring {
    /* Written once by cb_ring_init, read-only afterwards. magic is stored last, with release, so an
     * attacher that sees it (acquire) also sees every other header field. */
    atomic_uint magic;
    uint32_t version;
    uint32_t capacity;     /* samples, a power of two */
    uint32_t itemsize;     /* bytes per sample */
    uint32_t dtype;        /* CB_RING_INT16 or CB_RING_FLOAT32 */
    uint32_t header_bytes; /* sizeof(cb_ring) at creation, so data is found at the same offset */
    char pad0_[CB_RING_LINE - 6 * 4];

    /* Written by the producer only. */
    atomic_ullong write_index; /* samples ever written; the next sample goes to write_index & mask */
    atomic_ullong overruns;    /* writes that could not take all their samples (the rest was dropped) */
    char pad1_[CB_RING_LINE - 2 * 8];

    /* Written by the consumer only. */
    atomic_ullong read_index; /* samples ever read; the next sample comes from read_index & mask */
    atomic_ullong underruns;  /* reads that found fewer samples than they asked for */
    char pad2_[CB_RING_LINE - 2 * 8];
    /* The samples follow: capacity * itemsize bytes. */
} cb_ring;

_Static_assert(sizeof(atomic_ullong) == 8, "indices are 64-bit words");
_Static_assert(sizeof(cb_ring) == 3 * CB_RING_LINE, "header layout is shared between processes");
_Static_assert(offsetof(cb_ring, write_index) == CB_RING_LINE, "producer fields on their own line");
_Static_assert(offsetof(cb_ring, read_index) == 2 * CB_RING_LINE, "consumer fields on their own line");

static inline unsigned char *cb_ring_data(cb_ring *r) { return (unsigned char *)r + sizeof(cb_ring); }

static inline int cb_ring_is_pow2(uint64_t n) { return n != 0 && (n & (n - 1)) == 0; }

/* Bytes a block must have for a ring of `capacity` samples of `itemsize` bytes. */
static inline size_t cb_ring_nbytes(size_t capacity, size_t itemsize)
{
    return sizeof(cb_ring) + capacity * itemsize;
}

/* Lays out an empty ring in `mem`. The caller has checked capacity (power of two, at most
 * CB_RING_MAX_CAPACITY), dtype/itemsize, alignment and size. Not thread-safe (see CONTRACT). */
static inline cb_ring *cb_ring_init(void *mem, uint32_t capacity, uint32_t dtype, uint32_t itemsize)
{
    cb_ring *r = (cb_ring *)mem;
    memset(r, 0, sizeof(cb_ring));
    r->version = CB_RING_VERSION;
    r->capacity = capacity;
    r->itemsize = itemsize;
    r->dtype = dtype;
    r->header_bytes = (uint32_t)sizeof(cb_ring);
    atomic_init(&r->write_index, 0);
    atomic_init(&r->overruns, 0);
    atomic_init(&r->read_index, 0);
    atomic_init(&r->underruns, 0);
    /* release: an attacher that acquires the magic must see the fields above, not the zeros (or the
     * stale ring) that were in the block before. */
    atomic_store_explicit(&r->magic, CB_RING_MAGIC, memory_order_release);
    return r;
}

/* Checks that `mem` (of `size` bytes) holds a ring this header understands; CB_RING_OK or why not. */
static inline int cb_ring_check(const void *mem, size_t size)
{
    if (((uintptr_t)mem & 7u) != 0) return CB_RING_ERR_ALIGN;
    if (size < sizeof(cb_ring)) return CB_RING_ERR_SIZE;
    cb_ring *r = (cb_ring *)mem;
    /* acquire: pairs with the release in cb_ring_init, so the fields read below are the ones
     * cb_ring_init wrote, not what the block held before. */
    if (atomic_load_explicit(&r->magic, memory_order_acquire) != CB_RING_MAGIC) return CB_RING_ERR_MAGIC;
    if (r->version != CB_RING_VERSION || r->header_bytes != sizeof(cb_ring)) return CB_RING_ERR_VERSION;
    if (!cb_ring_is_pow2(r->capacity) || r->capacity > CB_RING_MAX_CAPACITY) return CB_RING_ERR_CAPACITY;
    if (!((r->dtype == CB_RING_INT16 && r->itemsize == 2) || (r->dtype == CB_RING_FLOAT32 && r->itemsize == 4)))
        return CB_RING_ERR_DTYPE;
    if (size < cb_ring_nbytes(r->capacity, r->itemsize)) return CB_RING_ERR_SIZE;
    unsigned long long w = atomic_load_explicit(&r->write_index, memory_order_acquire);
    unsigned long long rd = atomic_load_explicit(&r->read_index, memory_order_acquire);
    if (rd > w || w - rd > r->capacity) return CB_RING_ERR_INDICES;
    return CB_RING_OK;
}

/* ---- counts ------------------------------------------------------------------------------------ */

/* Samples the consumer can read now. Exact on the consumer side; a snapshot elsewhere. */
static inline size_t cb_ring_readable(cb_ring *r)
{
    /* Load read first: the write index only grows, so a later load of it is >= any read index we saw
     * (acquire on read keeps the second load from being hoisted above the first). */
    unsigned long long rd = atomic_load_explicit(&r->read_index, memory_order_acquire);
    /* acquire: samples below this index were copied in before the producer published it. */
    unsigned long long w = atomic_load_explicit(&r->write_index, memory_order_acquire);
    unsigned long long n = w - rd;
    return n > r->capacity ? r->capacity : (size_t)n; /* a third thread may see the consumer lag */
}

/* Free slots the producer can fill now. Exact on the producer side; a snapshot elsewhere. */
static inline size_t cb_ring_writable(cb_ring *r) { return r->capacity - cb_ring_readable(r); }

/* ---- zero-copy region API --------------------------------------------------------------------- *
 * A side asks for up to n slots as at most two regions (the second one starts at the ring's base
 * when the first reaches its end), fills or consumes them in place, then commits how many it used.
 * Counts in the regions are samples; pointers are into the ring's data. */

typedef struct cb_ring_regions {
    void *first;
    size_t first_n;
    void *second;
    size_t second_n;
} cb_ring_regions;

static inline size_t cb_ring_split_(cb_ring *r, unsigned long long index, size_t n, cb_ring_regions *out)
{
    size_t mask = (size_t)r->capacity - 1;
    size_t start = (size_t)index & mask;
    size_t to_end = (size_t)r->capacity - start;
    out->first = cb_ring_data(r) + start * r->itemsize;
    out->first_n = n < to_end ? n : to_end;
    out->second = cb_ring_data(r);
    out->second_n = n - out->first_n;
    return n;
}

/* Producer: regions for up to n samples; returns how many slots they hold (<= n, maybe 0). */
static inline size_t cb_ring_write_regions(cb_ring *r, size_t n, cb_ring_regions *out)
{
    /* relaxed: only this side stores write_index, so it reads its own last store. */
    unsigned long long w = atomic_load_explicit(&r->write_index, memory_order_relaxed);
    /* acquire: pairs with the consumer's release of read_index, so the consumer has finished copying
     * out of the slots it freed before we overwrite them (else it could read our new samples). */
    unsigned long long rd = atomic_load_explicit(&r->read_index, memory_order_acquire);
    size_t space = (size_t)r->capacity - (size_t)(w - rd);
    return cb_ring_split_(r, w, n < space ? n : space, out);
}

/* Producer: makes n samples written into the regions visible to the consumer. */
static inline void cb_ring_commit_write(cb_ring *r, size_t n)
{
    unsigned long long w = atomic_load_explicit(&r->write_index, memory_order_relaxed);
    /* release: the sample bytes stored into the regions become visible before the index that covers
     * them; without it the consumer could copy slots whose new samples have not landed yet. */
    atomic_store_explicit(&r->write_index, w + n, memory_order_release);
}

/* Consumer: regions holding up to n readable samples; returns how many they hold (<= n, maybe 0). */
static inline size_t cb_ring_read_regions(cb_ring *r, size_t n, cb_ring_regions *out)
{
    /* relaxed: only this side stores read_index. */
    unsigned long long rd = atomic_load_explicit(&r->read_index, memory_order_relaxed);
    /* acquire: pairs with the producer's release of write_index, so the samples below it are
     * visible before we copy them (else we could read stale bytes from the previous lap). */
    unsigned long long w = atomic_load_explicit(&r->write_index, memory_order_acquire);
    size_t avail = (size_t)(w - rd);
    return cb_ring_split_(r, rd, n < avail ? n : avail, out);
}

/* Consumer: hands n consumed slots back to the producer. */
static inline void cb_ring_commit_read(cb_ring *r, size_t n)
{
    unsigned long long rd = atomic_load_explicit(&r->read_index, memory_order_relaxed);
    /* release: our loads from the slots complete before the producer can see them free; without it
     * a reordered load could return a sample the producer wrote after reusing the slot. */
    atomic_store_explicit(&r->read_index, rd + n, memory_order_release);
}

/* ---- counters: each written by one side only ---------------------------------------------------- */

/* Each side counts its own events only: overruns by the producer, underruns by the consumer.
 * relaxed: statistics, ordered with nothing; one writer each, so load + store cannot lose a count
 * (and avoids a locked read-modify-write on the hot path). */
static inline void cb_ring_count_overrun(cb_ring *r)
{
    atomic_store_explicit(&r->overruns, atomic_load_explicit(&r->overruns, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

static inline void cb_ring_count_underrun(cb_ring *r)
{
    atomic_store_explicit(&r->underruns, atomic_load_explicit(&r->underruns, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

static inline unsigned long long cb_ring_overruns(cb_ring *r)
{
    return atomic_load_explicit(&r->overruns, memory_order_relaxed);
}

static inline unsigned long long cb_ring_underruns(cb_ring *r)
{
    return atomic_load_explicit(&r->underruns, memory_order_relaxed);
}

/* ---- copying API (built on the regions) ------------------------------------------------------- */

/* Producer: copies up to n samples from src; returns how many. If fewer than n fit, the rest is
 * dropped (the newest samples, never ones already queued) and one overrun is counted. */
static inline size_t cb_ring_write(cb_ring *r, const void *src, size_t n)
{
    cb_ring_regions g;
    size_t done = cb_ring_write_regions(r, n, &g);
    size_t isz = r->itemsize;
    if (g.first_n) memcpy(g.first, src, g.first_n * isz);
    if (g.second_n) memcpy(g.second, (const unsigned char *)src + g.first_n * isz, g.second_n * isz);
    if (done) cb_ring_commit_write(r, done);
    if (done < n) cb_ring_count_overrun(r);
    return done;
}

/* Consumer: copies up to n samples into dst; returns how many. If fewer than n were there, those
 * few are still copied (dst's tail is left untouched) and one underrun is counted. */
static inline size_t cb_ring_read(cb_ring *r, void *dst, size_t n)
{
    cb_ring_regions g;
    size_t done = cb_ring_read_regions(r, n, &g);
    size_t isz = r->itemsize;
    if (g.first_n) memcpy(dst, g.first, g.first_n * isz);
    if (g.second_n) memcpy((unsigned char *)dst + g.first_n * isz, g.second, g.second_n * isz);
    if (done) cb_ring_commit_read(r, done);
    if (done < n) cb_ring_count_underrun(r);
    return done;
}

/* Consumer: copies exactly n samples into dst and returns n, or, if fewer than n are there, copies
 * nothing, counts one underrun and returns 0 (for a consumer that needs whole frames). */
static inline size_t cb_ring_read_exact(cb_ring *r, void *dst, size_t n)
{
    if (cb_ring_readable(r) < n) {
        cb_ring_count_underrun(r);
        return 0;
    }
    return cb_ring_read(r, dst, n);
}

#endif /* CALLBOT_RING_H */
