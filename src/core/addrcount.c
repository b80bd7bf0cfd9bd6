#include "core/addrcount.h"

#include <netinet/in.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

struct cmg_addrcount_slot {
    struct cmg_addr_key k;
    uint32_t n;   /* 0: empty */
};

void cmg_addr_key_of(const struct sockaddr *sa, struct cmg_addr_key *k)
{
    memset(k, 0, sizeof(*k));
    if (sa->sa_family == AF_INET) {
        k->b[10] = k->b[11] = 0xff;
        memcpy(k->b + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6) {
        const uint8_t *a = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
        bool v4mapped = IN6_IS_ADDR_V4MAPPED(&((const struct sockaddr_in6 *)sa)->sin6_addr);
        memcpy(k->b, a, v4mapped ? 16 : 8);
    }
}

static size_t hash(const struct cmg_addrcount *t, const struct cmg_addr_key *k)
{
    uint64_t h = 14695981039346656037ull ^ t->seed;   /* FNV-1a, seeded */
    for (int i = 0; i < 16; i++)
        h = (h ^ k->b[i]) * 1099511628211ull;
    return (size_t)(h ^ (h >> 29));
}

/* The slot holding k, or the empty one where it would go. */
static struct cmg_addrcount_slot *find(const struct cmg_addrcount *t, const struct cmg_addr_key *k)
{
    size_t i = hash(t, k) & (t->cap - 1);
    while (t->v[i].n && memcmp(&t->v[i].k, k, sizeof(*k)) != 0)
        i = (i + 1) & (t->cap - 1);
    return &t->v[i];
}

static int grow(struct cmg_addrcount *t)
{
    struct cmg_addrcount old = *t;

    t->cap = old.cap ? old.cap * 2 : 64;
    t->v = calloc(t->cap, sizeof(*t->v));
    if (!t->v) {
        *t = old;
        return -1;
    }
    if (!old.cap && getrandom(&t->seed, sizeof(t->seed), GRND_NONBLOCK) != sizeof(t->seed))
        t->seed = (uint64_t)(uintptr_t)t->v;
    for (size_t i = 0; i < old.cap; i++)
        if (old.v[i].n)
            *find(t, &old.v[i].k) = old.v[i];
    free(old.v);
    return 0;
}

uint32_t cmg_addrcount_get(const struct cmg_addrcount *t, const struct cmg_addr_key *k)
{
    return t->cap ? find(t, k)->n : 0;
}

int cmg_addrcount_add(struct cmg_addrcount *t, const struct cmg_addr_key *k)
{
    struct cmg_addrcount_slot *s;

    if ((t->used + 1) * 2 > t->cap && grow(t) < 0)
        return -1;
    s = find(t, k);
    if (!s->n) {
        s->k = *k;
        t->used++;
    }
    s->n++;
    return 0;
}

void cmg_addrcount_del(struct cmg_addrcount *t, const struct cmg_addr_key *k)
{
    struct cmg_addrcount_slot *s;
    size_t i, j, home;

    if (!t->cap || !(s = find(t, k))->n || --s->n)
        return;
    /* Linear probing without tombstones: shift later members of the run back. */
    t->used--;
    i = (size_t)(s - t->v);
    for (j = (i + 1) & (t->cap - 1); t->v[j].n; j = (j + 1) & (t->cap - 1)) {
        home = hash(t, &t->v[j].k) & (t->cap - 1);
        /* Moves j into the hole at i unless its home lies cyclically in (i, j]. */
        if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
            t->v[i] = t->v[j];
            t->v[j].n = 0;
            i = j;
        }
    }
}

void cmg_addrcount_free(struct cmg_addrcount *t)
{
    free(t->v);
    memset(t, 0, sizeof(*t));
}
