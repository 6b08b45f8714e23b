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
    float *scratch; /* the outputs of one block */
    long next_in;   /* newest input the next output needs, relative to the first not yet consumed */
    int phase;      /* branch of the next output: its index at in_rate*up, modulo up */
};

/* most outputs one block of RS_BLOCK inputs can complete */
static size_t scratch_size(int up, int down)
{
    return ((size_t)RS_BLOCK * up + down - 1) / down + 1;
}

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
    rs->scratch = calloc(scratch_size(up, down), sizeof(float));
    if (!rs->coef || !rs->work || !rs->scratch) {
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
    free(rs->scratch);
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

static inline int16_t to_s16(float v)
{
    if (v >= 32767.0f)
        return 32767;
    if (v <= -32768.0f)
        return -32768;
    return (int16_t)lrintf(v); /* nearest, ties to even (the default rounding mode) */
}

/* Outputs y[g*step_out] for g < count, all from one branch c, the g-th reading x + g*stride.
 * Each output is summed over the taps in the same order (tap 0 first) whichever path computes it,
 * so results do not depend on how the stream was chunked. Eight outputs at a time give eight
 * independent sums in registers, where one sum would wait on its previous add (2x faster, measured). */
static void branch_outputs(const float *restrict c, int k, const float *restrict x, int stride,
                           size_t count, float *restrict y, int step_out)
{
    size_t g = 0;
    for (; g + 8 <= count; g += 8) {
        const float *xg = x + g * (size_t)stride;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, a4 = 0.0f, a5 = 0.0f, a6 = 0.0f, a7 = 0.0f;
        const size_t s = (size_t)stride;
        for (int i = 0; i < k; i++) {
            const float ci = c[i];
            a0 += ci * xg[i];
            a1 += ci * xg[s + i];
            a2 += ci * xg[2 * s + i];
            a3 += ci * xg[3 * s + i];
            a4 += ci * xg[4 * s + i];
            a5 += ci * xg[5 * s + i];
            a6 += ci * xg[6 * s + i];
            a7 += ci * xg[7 * s + i];
        }
        y[g * step_out] = a0;
        y[(g + 1) * step_out] = a1;
        y[(g + 2) * step_out] = a2;
        y[(g + 3) * step_out] = a3;
        y[(g + 4) * step_out] = a4;
        y[(g + 5) * step_out] = a5;
        y[(g + 6) * step_out] = a6;
        y[(g + 7) * step_out] = a7;
    }
    for (; g < count; g++) {
        const float *xg = x + g * (size_t)stride;
        float a = 0.0f;
        for (int i = 0; i < k; i++)
            a += c[i] * xg[i];
        y[g * step_out] = a;
    }
}

/* Consume the nb samples already placed after the history in rs->work; put at most max_out outputs in
 * rs->scratch and return how many. Output w reads inputs j-k+1 .. j, where j = floor(t/up) and
 * t = next_in*up + phase + w*down; they sit at work[j .. j+k-1] (the history holds the negative ones).
 * Outputs w, w+up, w+2*up, ... share a branch and step down inputs apart: one branch_outputs call each. */
static size_t run_block(rs_t *rs, size_t nb, size_t max_out)
{
    const int k = rs->k, up = rs->up, down = rs->down;
    const long long t0 = (long long)rs->next_in * up + rs->phase;
    size_t count = 0;
    if ((long long)nb * up > t0)
        count = (size_t)(((long long)nb * up - t0 + down - 1) / down);
    if (count > max_out)
        count = max_out;
    for (int r = 0; r < up && (size_t)r < count; r++) {
        long long t = t0 + (long long)r * down;
        branch_outputs(rs->coef + (size_t)(t % up) * k, k, rs->work + t / up, down,
                       (count - r + up - 1) / up, rs->scratch + r, up);
    }
    const long long t_next = t0 + (long long)count * down;
    rs->next_in = (long)(t_next / up - (long long)nb);
    rs->phase = (int)(t_next % up);
    memmove(rs->work, rs->work + nb, ((size_t)k - 1) * sizeof(float));
    return count;
}

static void emit(const rs_t *rs, size_t count, float *of, int16_t *os)
{
    if (of)
        memcpy(of, rs->scratch, count * sizeof(float));
    else
        for (size_t i = 0; i < count; i++)
            os[i] = to_s16(rs->scratch[i]);
}

size_t rs_process_f32(rs_t *rs, const float *in, size_t n, float *out)
{
    size_t w = 0;
    for (size_t done = 0; done < n;) {
        size_t nb = n - done < RS_BLOCK ? n - done : RS_BLOCK;
        memcpy(rs->work + rs->k - 1, in + done, nb * sizeof(float));
        size_t count = run_block(rs, nb, (size_t)-1);
        emit(rs, count, out + w, NULL);
        w += count;
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
        size_t count = run_block(rs, nb, (size_t)-1);
        emit(rs, count, NULL, out + w);
        w += count;
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
        size_t count = run_block(rs, RS_BLOCK, want - w);
        emit(rs, count, of ? of + w : NULL, os ? os + w : NULL);
        w += count;
    }
    rs_reset(rs);
    return w;
}

size_t rs_flush_f32(rs_t *rs, float *out) { return flush(rs, out, NULL); }
size_t rs_flush_s16(rs_t *rs, int16_t *out) { return flush(rs, NULL, out); }

void rs_f32_to_s16(const float *in, size_t n, float scale, int16_t *out)
{
    for (size_t i = 0; i < n; i++) {
        float v = in[i] * scale;
        out[i] = v == v ? to_s16(v) : 0; /* NaN != NaN */
    }
}

void rs_s16_to_f32(const int16_t *in, size_t n, float scale, float *out)
{
    for (size_t i = 0; i < n; i++)
        out[i] = (float)in[i] * scale;
}
