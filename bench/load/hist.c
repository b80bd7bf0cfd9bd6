#include "hist.h"

#include <math.h>
#include <string.h>

static unsigned bucket_of(uint64_t v)
{
    unsigned m;

    if (v < (1u << LOAD_HIST_LINEAR_BITS))
        return (unsigned)v;
    if (v >= (uint64_t)1 << LOAD_HIST_MAX_BITS)
        return LOAD_HIST_BUCKETS - 1;
    m = 63u - (unsigned)__builtin_clzll(v);   /* v lies in [2^m, 2^(m+1)) */
    return (1u << LOAD_HIST_LINEAR_BITS) + (m - LOAD_HIST_LINEAR_BITS) * (1u << LOAD_HIST_SUB_BITS) +
           (unsigned)((v >> (m - LOAD_HIST_SUB_BITS)) - (1u << LOAD_HIST_SUB_BITS));
}

/* The highest value that falls in bucket i. */
static uint64_t bucket_high(unsigned i)
{
    unsigned k, m;
    uint64_t sub;

    if (i < (1u << LOAD_HIST_LINEAR_BITS))
        return i;
    k = i - (1u << LOAD_HIST_LINEAR_BITS);
    m = LOAD_HIST_LINEAR_BITS + k / (1u << LOAD_HIST_SUB_BITS);
    sub = (k % (1u << LOAD_HIST_SUB_BITS)) + (1u << LOAD_HIST_SUB_BITS);
    return ((sub + 1) << (m - LOAD_HIST_SUB_BITS)) - 1;
}

void load_hist_reset(struct load_hist *h)
{
    memset(h, 0, sizeof(*h));
    h->min = UINT64_MAX;
}

void load_hist_record(struct load_hist *h, uint64_t ns)
{
    h->counts[bucket_of(ns)]++;
    h->count++;
    h->sum += (double)ns;
    if (ns < h->min)
        h->min = ns;
    if (ns > h->max)
        h->max = ns;
}

void load_hist_merge(struct load_hist *dst, const struct load_hist *src)
{
    if (!src->count)
        return;
    for (unsigned i = 0; i < LOAD_HIST_BUCKETS; i++)
        dst->counts[i] += src->counts[i];
    dst->count += src->count;
    dst->sum += src->sum;
    if (src->min < dst->min)
        dst->min = src->min;
    if (src->max > dst->max)
        dst->max = src->max;
}

uint64_t load_hist_percentile(const struct load_hist *h, double pct)
{
    uint64_t rank, seen = 0;

    if (!h->count)
        return 0;
    if (pct >= 100.0)
        return h->max;
    rank = (uint64_t)ceil(pct / 100.0 * (double)h->count);
    if (rank < 1)
        rank = 1;
    for (unsigned i = 0; i < LOAD_HIST_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            uint64_t v = bucket_high(i);
            return v > h->max ? h->max : v;
        }
    }
    return h->max;
}

double load_hist_mean(const struct load_hist *h) { return h->count ? h->sum / (double)h->count : 0; }
