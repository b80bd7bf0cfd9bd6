/* Per-source counts: IPv4 per address, IPv6 per /64, and a table that stays exact
 * through many additions and removals (deletion shifts probe runs back). */
#include "core/addrcount.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

static struct cmg_addr_key v4(uint32_t a)
{
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(a)};
    struct cmg_addr_key k;
    cmg_addr_key_of((struct sockaddr *)&sin, &k);
    return k;
}

static struct cmg_addr_key v6(const char *s)
{
    struct sockaddr_in6 sin6 = {.sin6_family = AF_INET6};
    struct cmg_addr_key k;
    assert_int_equal(inet_pton(AF_INET6, s, &sin6.sin6_addr), 1);
    cmg_addr_key_of((struct sockaddr *)&sin6, &k);
    return k;
}

static void ipv6_counts_per_64(void **state)
{
    struct cmg_addrcount t = {0};
    struct cmg_addr_key a = v6("2001:db8:1:2::1"), b = v6("2001:db8:1:2:ffff::9"),
                        c = v6("2001:db8:1:3::1"), m = v6("::ffff:127.0.0.1"), l = v4(0x7f000001);
    (void)state;
    assert_int_equal(cmg_addrcount_add(&t, &a), 0);
    assert_int_equal(cmg_addrcount_add(&t, &b), 0);
    assert_int_equal(cmg_addrcount_add(&t, &c), 0);
    assert_int_equal(cmg_addrcount_add(&t, &m), 0);
    assert_int_equal(cmg_addrcount_get(&t, &a), 2);
    assert_int_equal(cmg_addrcount_get(&t, &c), 1);
    assert_int_equal(cmg_addrcount_get(&t, &l), 1);   /* mapped IPv4 is that IPv4 */
    cmg_addrcount_del(&t, &a);
    cmg_addrcount_del(&t, &a);
    cmg_addrcount_del(&t, &a);   /* one too many: no harm */
    assert_int_equal(cmg_addrcount_get(&t, &b), 0);
    assert_int_equal(t.used, 2);
    cmg_addrcount_free(&t);
}

static void stays_exact_under_churn(void **state)
{
    enum { N = 3000 };
    static uint32_t ref[N];
    struct cmg_addrcount t = {0};
    (void)state;
    srand(7);
    memset(ref, 0, sizeof(ref));
    for (int round = 0; round < 200000; round++) {
        uint32_t i = (uint32_t)rand() % N;
        struct cmg_addr_key k = v4(0x0a000000u + i * 7919u);
        if (rand() % 3 && ref[i] < 5) {
            assert_int_equal(cmg_addrcount_add(&t, &k), 0);
            ref[i]++;
        } else if (ref[i]) {
            cmg_addrcount_del(&t, &k);
            ref[i]--;
        }
    }
    size_t used = 0;
    for (uint32_t i = 0; i < N; i++) {
        struct cmg_addr_key k = v4(0x0a000000u + i * 7919u);
        assert_int_equal(cmg_addrcount_get(&t, &k), ref[i]);
        used += ref[i] != 0;
    }
    assert_int_equal(t.used, used);
    cmg_addrcount_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ipv6_counts_per_64),
        cmocka_unit_test(stays_exact_under_churn),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
