/* The analysers' list of steps and how it is printed; see analyze.h. */
#include "client/analyze.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

static const char *const result_names[] = {
    [CMG_STEP_PASS] = "PASS", [CMG_STEP_FAIL] = "FAIL", [CMG_STEP_SKIP] = "SKIP"};

void cmg_analyze_step(struct cmg_analyze_steps *s, const char *name, enum cmg_step_result r,
                      long long ms, const char *fix, const char *fmt, ...)
{
    struct cmg_analyze_step *st;
    va_list ap;
    char *detail = NULL;

    if (s->n >= CMG_ANALYZE_MAX_STEPS) {
        s->dropped++;
        s->dropped_failed += r == CMG_STEP_FAIL;
        return;
    }
    st = &s->v[s->n++];
    snprintf(st->name, sizeof(st->name), "%s", name);
    st->result = r;
    st->fix = r == CMG_STEP_FAIL ? fix : NULL;
    st->ms = ms < 0 ? 0 : ms;
    va_start(ap, fmt);
    if (vasprintf(&detail, fmt, ap) < 0)
        detail = NULL;
    va_end(ap);
    st->detail = detail;
}

bool cmg_analyze_has(const struct cmg_analyze_steps *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->v[i].name, name))
            return true;
    return false;
}

bool cmg_analyze_failed(const struct cmg_analyze_steps *s)
{
    for (size_t i = 0; i < s->n; i++)
        if (s->v[i].result == CMG_STEP_FAIL)
            return true;
    return s->dropped_failed > 0;
}

static void print_json(const struct cmg_analyze_steps *s, FILE *out)
{
    cJSON *arr = cJSON_CreateArray();
    char *text;

    for (size_t i = 0; arr && i < s->n; i++) {
        const struct cmg_analyze_step *st = &s->v[i];
        cJSON *o = cJSON_CreateObject();

        if (!o)
            break;
        cJSON_AddStringToObject(o, "name", st->name);
        cJSON_AddStringToObject(o, "result", result_names[st->result]);
        cJSON_AddStringToObject(o, "detail", st->detail ? st->detail : "");
        if (st->fix)
            cJSON_AddStringToObject(o, "fix", st->fix);
        else
            cJSON_AddNullToObject(o, "fix");
        cJSON_AddNumberToObject(o, "ms", (double)st->ms);
        cJSON_AddItemToArray(arr, o);
    }
    text = arr ? cJSON_Print(arr) : NULL;
    fprintf(out, "%s\n", text ? text : "[]");
    free(text);
    cJSON_Delete(arr);
}

/* A detail as text: what a server said may hold control characters, never printed raw. */
static void put_printable(const char *t, FILE *out)
{
    for (; t && *t; t++)
        fputc((unsigned char)*t < 0x20 || *t == 0x7f ? '?' : *t, out);
}

void cmg_analyze_print(const struct cmg_analyze_steps *s, bool json, FILE *out)
{
    size_t width = 0;

    if (json) {
        print_json(s, out);
        return;
    }
    for (size_t i = 0; i < s->n; i++)
        if (strlen(s->v[i].name) > width)
            width = strlen(s->v[i].name);
    for (size_t i = 0; i < s->n; i++) {
        const struct cmg_analyze_step *st = &s->v[i];

        fprintf(out, "%s  %-*s  ", result_names[st->result], (int)width, st->name);
        put_printable(st->detail, out);
        fprintf(out, " (%lld ms)\n", st->ms);
        if (st->fix)
            fprintf(out, "      %-*s  fix: %s\n", (int)width, "", st->fix);
    }
    if (s->dropped)
        fprintf(out, "... and %zu more step(s) not shown, %zu of them failed\n", s->dropped,
                s->dropped_failed);
    fflush(out);
}

void cmg_analyze_steps_free(struct cmg_analyze_steps *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->v[i].detail);
    s->n = 0;
}
