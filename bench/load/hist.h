/* A log-linear latency histogram in the manner of HdrHistogram: values below
 * 2^11 ns are counted exactly, and every power of two above is cut into 1024
 * buckets, so any value read back is within 0.1 % of what was recorded, from
 * 1 ns up to 2^42 ns (about 73 minutes). Recording is one index computation
 * and an increment, so a tail percentile such as p99.9 rests on every sample,
 * not on a reservoir. */
#ifndef LOAD_HIST_H
#define LOAD_HIST_H

#include <stdint.h>

#define LOAD_HIST_LINEAR_BITS 11
#define LOAD_HIST_SUB_BITS 10
#define LOAD_HIST_MAX_BITS 42
#define LOAD_HIST_BUCKETS \
    ((1u << LOAD_HIST_LINEAR_BITS) + \
     (LOAD_HIST_MAX_BITS - LOAD_HIST_LINEAR_BITS) * (1u << LOAD_HIST_SUB_BITS))

struct load_hist {
    uint64_t count;
    uint64_t min, max;       /* ns; min is UINT64_MAX while empty */
    double sum;              /* ns, for the mean */
    uint64_t counts[LOAD_HIST_BUCKETS];
};

void load_hist_reset(struct load_hist *h);
void load_hist_record(struct load_hist *h, uint64_t ns);
/* Adds the samples of src to dst. */
void load_hist_merge(struct load_hist *dst, const struct load_hist *src);
/* The value (ns) at or below which pct percent of the samples lie: the highest
 * value its bucket stands for, never above the largest sample. 0 when empty. */
uint64_t load_hist_percentile(const struct load_hist *h, double pct);
double load_hist_mean(const struct load_hist *h);

#endif
