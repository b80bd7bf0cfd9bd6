/* A host name of a route that did not resolve is looked up again off the event loop:
 * getaddrinfo_a() resolves in a thread of glibc's own, and a timer looks for the
 * answer. Neither a slow resolver nor devices asking for the role can stall the
 * tunnels; the role's requests fail with CMGConnector_Upstream_DNS_Failed meanwhile. */
#include "connector/cn.h"
#include "core/log.h"

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define POLL_MS 50

struct cmg_cn_lookup {
    struct gaicb cb;
    struct addrinfo hints;
    char port[8];
    struct cmg_timer timer;
    struct cmg_cn_mapping *m;
    struct cmg_loop *loop;
};

static void finish(struct cmg_cn_lookup *l, int rc)
{
    struct cmg_cn_mapping *m = l->m;
    struct addrinfo *ai = l->cb.ar_result;

    m->resolved_ms = cmg_loop_now(l->loop);
    if (rc == 0 && ai && ai->ai_addrlen <= sizeof(m->addr.ss)) {
        memcpy(&m->addr.ss, ai->ai_addr, ai->ai_addrlen);
        m->addr.len = ai->ai_addrlen;
        m->unresolved = false;
        cmg_info("role %s: %s resolves now", m->role, m->host);
    } else {
        snprintf(m->resolve_error, sizeof(m->resolve_error), "cannot resolve %s: %s", m->host,
                 gai_strerror(rc ? rc : EAI_NONAME));
    }
    if (ai)
        freeaddrinfo(ai);
    m->lookup = NULL;
    free(l);
}

static void on_poll(struct cmg_timer *t)
{
    struct cmg_cn_lookup *l = (struct cmg_cn_lookup *)((char *)t - offsetof(struct cmg_cn_lookup, timer));
    int rc = gai_error(&l->cb);

    if (rc == EAI_INPROGRESS)
        cmg_timer_start(l->loop, &l->timer, POLL_MS, on_poll);
    else
        finish(l, rc);
}

void cmg_cn_lookup_start(struct cmg_loop *loop, struct cmg_cn_mapping *m)
{
    struct cmg_cn_lookup *l;
    struct gaicb *list[1];

    if (m->lookup || !(l = calloc(1, sizeof(*l))))
        return;
    l->m = m;
    l->loop = loop;
    snprintf(l->port, sizeof(l->port), "%d", m->port);
    l->hints.ai_socktype = SOCK_STREAM;
    l->hints.ai_flags = AI_NUMERICSERV;
    l->cb.ar_name = m->host;
    l->cb.ar_service = l->port;
    l->cb.ar_request = &l->hints;
    list[0] = &l->cb;
    m->resolved_ms = cmg_loop_now(loop);
    if (getaddrinfo_a(GAI_NOWAIT, list, 1, NULL) != 0) {
        free(l);
        return;
    }
    m->lookup = l;
    cmg_timer_start(loop, &l->timer, POLL_MS, on_poll);
}

void cmg_cn_lookup_cancel(struct cmg_cn_mapping *m)
{
    struct cmg_cn_lookup *l = m->lookup;
    const struct gaicb *list[1];
    struct timespec wait = {1, 0};

    if (!l)
        return;
    cmg_timer_stop(l->loop, &l->timer);
    list[0] = &l->cb;
    /* A lookup under way cannot be taken back: wait for it (a second at most). */
    if (gai_cancel(&l->cb) == EAI_NOTCANCELED)
        gai_suspend(list, 1, &wait);
    if (gai_error(&l->cb) == EAI_INPROGRESS) {
        m->lookup = NULL;   /* still running: its memory stays glibc's until it ends */
        return;
    }
    if (l->cb.ar_result)
        freeaddrinfo(l->cb.ar_result);
    m->lookup = NULL;
    free(l);
}
