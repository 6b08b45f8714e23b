/* ring_stress.c: two native threads move a counting sequence through ext/ring.h, no GIL in the way.
 *
 * Why: the Python tests serialise on the GIL except during copies, so they rarely run both sides of
 * the ring at once. Here both run flat out on two cores, and tests/test_ring.py builds this file
 * with ThreadSanitizer, which reports a data race on the samples if any acquire or release that
 * orders them against the indices is missing (each of the four was checked by weakening it to
 * relaxed: TSan then exits 66). Exit status: 0 = every sample arrived once, in order; 1 = not.
 */
#include "ring.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define TOTAL 2000000u /* samples; float32 counts exactly up to 2^24 */
#define CAPACITY 1024u /* samples: small, so the ring wraps and fills often */

static cb_ring *ring;

static void *producer(void *arg)
{
    (void)arg;
    float chunk[777];
    uint32_t next = 0, k = 0;
    while (next < TOTAL) {
        /* chunk sizes 1..777, never a divisor pattern of the capacity */
        size_t n = 1 + (k++ * 37u) % 777u;
        if (n > TOTAL - next) n = TOTAL - next;
        for (size_t i = 0; i < n; i++) chunk[i] = (float)(next + i);
        next += (uint32_t)cb_ring_write(ring, chunk, n); /* what did not fit is sent again */
    }
    return NULL;
}

int main(void)
{
    void *mem = calloc(1, cb_ring_nbytes(CAPACITY, sizeof(float)));
    if (mem == NULL) return 2;
    ring = cb_ring_init(mem, CAPACITY, CB_RING_FLOAT32, sizeof(float));
    pthread_t thread;
    if (pthread_create(&thread, NULL, producer, NULL) != 0) return 2;

    float chunk[555];
    uint32_t expect = 0, k = 0;
    while (expect < TOTAL) {
        size_t n = 1 + (k++ * 53u) % 555u;
        size_t got = cb_ring_read(ring, chunk, n);
        for (size_t i = 0; i < got; i++) {
            if (chunk[i] != (float)(expect + i)) {
                printf("sample %u: got %.0f\n", expect + (unsigned)i, chunk[i]);
                return 1;
            }
        }
        expect += (uint32_t)got;
    }
    pthread_join(thread, NULL);
    printf("moved %u samples; overruns %llu, underruns %llu\n", TOTAL, cb_ring_overruns(ring),
           cb_ring_underruns(ring));
    free(mem);
    return 0;
}
