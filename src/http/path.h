/* Request targets: the one canonical form the gateway forwards, and the CCM proxy
 * prefixes that name a role (docs/policy.md, "Paths"). */
#ifndef CMG_PATH_H
#define CMG_PATH_H

#include <stddef.h>

enum cmg_path_kind {
    CMG_PATH_OTHER,        /* no proxy prefix */
    CMG_PATH_MUTUAL_AUTH,  /* /CCM_Proxy_MutualAuth/<role>/...: client certificate */
    CMG_PATH_SERVER_AUTH,  /* /CCM_Proxy_ServerAuth/<role>/...: bearer token */
};

struct cmg_path {
    enum cmg_path_kind kind;
    const char *role;      /* not NUL-terminated */
    size_t role_len;
    const char *rest;      /* what follows the role: "", "/...", or "?..." */
    size_t rest_len;
};

/* Writes the canonical form of an origin-form target to out, which has room for
 * n + 1 bytes (the form is never longer; it is NUL-terminated), and its length to
 * *out_len. In the path: escapes of unreserved characters decoded, other escapes in
 * upper case, "//" merged into "/". Refused (-1, with a short reason in *why): no
 * leading '/', control bytes, space, raw bytes above 0x7e, '#', '\' or "%5C", bad
 * escapes, %00, an encoded '/' or control byte, "%25" followed by two hex digits
 * (double encoding), escapes that are not shortest-form UTF-8, and any "." or ".."
 * segment (after dropping ";params"). The query is kept as it came, once checked. */
int cmg_path_canonical(const char *p, size_t n, char *out, size_t *out_len, const char **why);
/* 0 if the target is acceptable and already in its canonical form; -1 otherwise. */
int cmg_path_check(const char *p, size_t n);
/* Splits a checked target; kind is CMG_PATH_OTHER when no prefix matches. */
void cmg_path_parse(const char *p, size_t n, struct cmg_path *out);
/* The percent-decoded value of NAME=... in the query q (n bytes, without the '?') into
 * out (cap bytes). 1 if found and decoded, 0 if absent, -1 if malformed, empty, too long,
 * or holding a byte no request-target has (controls, space, non-ASCII). */
int cmg_query_param(const char *q, size_t n, const char *name, char *out, size_t cap);
/* The value of a hexadecimal digit, or -1. */
int cmg_hex_digit(char c);
/* Longest role id we accept. */
#define CMG_ROLE_ID_MAX 64

#endif
