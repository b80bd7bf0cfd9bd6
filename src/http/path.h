/* Request targets: validation, and the CCM proxy prefixes that name a role. */
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

/* 0 if the origin-form target is acceptable: starts with '/', no control bytes,
 * well-formed %XX escapes, no "." or ".." segment, no encoded '/', '\' or NUL
 * in the path; -1 otherwise. */
int cmg_path_check(const char *p, size_t n);
/* Splits a checked target; kind is CMG_PATH_OTHER when no prefix matches. */
void cmg_path_parse(const char *p, size_t n, struct cmg_path *out);
/* Longest role id we accept. */
#define CMG_ROLE_ID_MAX 64

#endif
