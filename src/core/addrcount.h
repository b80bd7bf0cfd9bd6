/* Counts per source address, for per-source limits: an IPv4 address, or the /64 of
 * an IPv6 address (one subscriber's prefix; counting single IPv6 addresses would let
 * one host open a connection from each of its 2^64). */
#ifndef CMG_ADDRCOUNT_H
#define CMG_ADDRCOUNT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct cmg_addr_key {
    uint8_t b[16];   /* IPv4 as ::ffff:a.b.c.d; IPv6 with its low 64 bits zeroed */
};

struct cmg_addrcount {
    struct cmg_addrcount_slot *v;
    size_t cap, used;
    uint64_t seed;   /* random per table: a peer cannot choose colliding keys */
};

void cmg_addr_key_of(const struct sockaddr *sa, struct cmg_addr_key *k);
uint32_t cmg_addrcount_get(const struct cmg_addrcount *t, const struct cmg_addr_key *k);
/* + 1 for k. 0, or -1 when out of memory (nothing counted). */
int cmg_addrcount_add(struct cmg_addrcount *t, const struct cmg_addr_key *k);
/* - 1 for k; the entry goes at 0, so the table holds only sources with connections. */
void cmg_addrcount_del(struct cmg_addrcount *t, const struct cmg_addr_key *k);
void cmg_addrcount_free(struct cmg_addrcount *t);

#endif
