/* The analysers' steps (cmg client analyze, cmg connector analyze): each PASS, FAIL or
 * SKIP, with what was seen, a one-line fix for a failure and the time it took; printed
 * as text or as a JSON array of {name, result, detail, fix, ms}. */
#ifndef CMG_CLIENT_ANALYZE_H
#define CMG_CLIENT_ANALYZE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#define CMG_ANALYZE_MAX_STEPS 256

enum cmg_step_result { CMG_STEP_PASS, CMG_STEP_FAIL, CMG_STEP_SKIP };

struct cmg_analyze_step {
    char name[160];
    enum cmg_step_result result;
    char *detail;
    const char *fix;      /* a literal; NULL unless it failed */
    long long ms;
};

struct cmg_analyze_steps {
    struct cmg_analyze_step v[CMG_ANALYZE_MAX_STEPS];
    size_t n;
    size_t dropped, dropped_failed;   /* steps past CMG_ANALYZE_MAX_STEPS: counted only */
};

/* Adds a step (out of memory, the detail is lost; beyond CMG_ANALYZE_MAX_STEPS, it is
 * only counted, and a failure still fails the run). */
void cmg_analyze_step(struct cmg_analyze_steps *s, const char *name, enum cmg_step_result r,
                      long long ms, const char *fix, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
bool cmg_analyze_has(const struct cmg_analyze_steps *s, const char *name);
bool cmg_analyze_failed(const struct cmg_analyze_steps *s);
/* Text: "PASS  name  detail (N ms)", and "      fix: ..." under a failure. */
void cmg_analyze_print(const struct cmg_analyze_steps *s, bool json, FILE *out);
void cmg_analyze_steps_free(struct cmg_analyze_steps *s);

int cmg_client_analyze_main(int argc, char **argv);
int cmg_connector_analyze_main(int argc, char **argv);

#endif
