/* Gateway policy payloads: the parser must reject or accept any JSON without
 * reading out of bounds or leaking, and an accepted policy must answer lookups. */
#include "auth/policy.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cmg_policy *p;
    char err[256];

    if (cmg_policy_from_json((const char *)data, size, &p, err, sizeof(err)) < 0)
        return 0;
    for (size_t i = 0; i < p->nmappings; i++)
        if (cmg_policy_mapping(p, p->mappings[i].role, strlen(p->mappings[i].role)) == NULL)
            abort();
    cmg_policy_device_blocked(p, "GUID:x");
    cmg_policy_token_revoked(p, "x");
    cmg_policy_audience(p, "x");
    cmg_policy_unref(p);
    return 0;
}
