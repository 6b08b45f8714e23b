/* Streaming polyphase FIR resampler: see resampler.h for the contract.
 *
 * Output m sits at index t = m*down of the virtual stream "input zero-stuffed to in_rate*up". It is the
 * dot product of branch (t mod up) with the k inputs ending at input floor(t/up). Only that branch's
 * non-zero taps are touched, so the cost per output is k = ceil(ntaps/up) multiply-adds.
 */
#include "resampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct rs {
    int up, down;
    int k;          /* taps per branch */
    int delay;      /* prototype group delay, samples at in_rate*up */
    float *coef;    /* up branches of k taps, each reversed so the dot product walks the inputs forwards */
    float *work;    /* k-1 samples of history, then up to RS_BLOCK new ones */
    long next_in;   /* newest input the next output needs, relative to the first not yet consumed */
    int phase;      /* branch of the next output: its index at in_rate*up, modulo up */
};

rs_t *rs_create(const float *h, int ntaps, int up, int down, int delay)
{
    if (!h || ntaps < 1 || ntaps > 65536 || up < 1 || down < 1 || up > 64 || down > 64 || delay < 0)
        return NULL;
    rs_t *rs = calloc(1, sizeof *rs);
    if (!rs)
        return NULL;
    rs->up = up;
    rs->down = down;
    rs->k = (ntaps + up - 1) / up;
    rs->delay = delay;
    rs->coef = calloc((size_t)up * rs->k, sizeof(float));
    rs->work = calloc((size_t)rs->k - 1 + RS_BLOCK, sizeof(float));
    if (!rs->coef || !rs->work) {
        rs_destroy(rs);
        return NULL;
    }
    for (int p = 0; p < up; p++)
        for (int i = 0; i < rs->k; i++) {
            int tap = p + i * up;
            /* zero stuffing divides the signal's level by up; the branches give it back */
            rs->coef[p * rs->k + (rs->k - 1 - i)] = tap < ntaps ? (float)up * h[tap] : 0.0f;
        }
    rs_reset(rs);
    return rs;
}

void rs_destroy(rs_t *rs)
{
    if (!rs)
        return;
    free(rs->coef);
    free(rs->work);
    free(rs);
}

void rs_reset(rs_t *rs)
{
    memset(rs->work, 0, ((size_t)rs->k - 1) * sizeof(float));
    rs->next_in = 0;
    rs->phase = 0;
}

/* outputs whose index at in_rate*up, counted from the first unconsumed input, is below `limit` */
static size_t outputs_before(const rs_t *rs, long long limit)
{
    long long first = (long long)rs->next_in * rs->up + rs->phase;
    if (limit <= first)
        return 0;
    return (size_t)((limit - first + rs->down - 1) / rs->down);
}

size_t rs_output_count(const rs_t *rs, size_t n)
{
    return outputs_before(rs, (long long)n * rs->up);
}

size_t rs_flush_count(const rs_t *rs)
{
    return outputs_before(rs, rs->delay);
}

static inline float dot(const float *c, const float *x, int k)
{
    /* four independent sums for instruction-level parallelism; a fixed order keeps results reproducible */
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    int i = 0;
    for (; i + 4 <= k; i += 4) {
        a0 += c[i] * x[i];
        a1 += c[i + 1] * x[i + 1];
        a2 += c[i + 2] * x[i + 2];
        a3 += c[i + 3] * x[i + 3];
    }
    for (; i < k; i++)
        a0 += c[i] * x[i];
    return (a0 + a1) + (a2 + a3);
}

static inline int16_t to_s16(float v)
{
    if (v >= 32767.0f)
        return 32767;
    if (v <= -32768.0f)
        return -32768;
    return (int16_t)lrintf(v); /* nearest, ties to even (the default rounding mode) */
}

/* Consume the nb samples already placed after the history in rs->work; write at most max_out outputs
 * to of (float) or os (int16). */
static size_t run_block(rs_t *rs, size_t nb, size_t max_out, float *of, int16_t *os)
{
    const int k = rs->k, up = rs->up, down = rs->down;
    long j = rs->next_in;
    int ph = rs->phase;
    size_t w = 0;
    while (j < (long)nb && w < max_out) {
        /* inputs j-k+1 .. j of this block sit at work[j .. j+k-1] (the history fills the negative ones) */
        float v = dot(rs->coef + (size_t)ph * k, rs->work + j, k);
        if (of)
            of[w] = v;
        else
            os[w] = to_s16(v);
        w++;
        ph += down;
        j += ph / up;
        ph %= up;
    }
    rs->next_in = j - (long)nb;
    rs->phase = ph;
    memmove(rs->work, rs->work + nb, ((size_t)k - 1) * sizeof(float));
    return w;
}

size_t rs_process_f32(rs_t *rs, const float *in, size_t n, float *out)
{
    size_t w = 0;
    for (size_t done = 0; done < n;) {
        size_t nb = n - done < RS_BLOCK ? n - done : RS_BLOCK;
        memcpy(rs->work + rs->k - 1, in + done, nb * sizeof(float));
        w += run_block(rs, nb, (size_t)-1, out + w, NULL);
        done += nb;
    }
    return w;
}

size_t rs_process_s16(rs_t *rs, const int16_t *in, size_t n, int16_t *out)
{
    size_t w = 0;
    for (size_t done = 0; done < n;) {
        size_t nb = n - done < RS_BLOCK ? n - done : RS_BLOCK;
        float *dst = rs->work + rs->k - 1;
        for (size_t i = 0; i < nb; i++)
            dst[i] = (float)in[done + i];
        w += run_block(rs, nb, (size_t)-1, NULL, out + w);
        done += nb;
    }
    return w;
}

/* Feed silence until the delay's worth of output is out. */
static size_t flush(rs_t *rs, float *of, int16_t *os)
{
    size_t want = rs_flush_count(rs), w = 0;
    while (w < want) {
        memset(rs->work + rs->k - 1, 0, RS_BLOCK * sizeof(float));
        w += run_block(rs, RS_BLOCK, want - w, of ? of + w : NULL, os ? os + w : NULL);
    }
    rs_reset(rs);
    return w;
}

size_t rs_flush_f32(rs_t *rs, float *out) { return flush(rs, out, NULL); }
size_t rs_flush_s16(rs_t *rs, int16_t *out) { return flush(rs, NULL, out); }
