/* The gateway's notification window: each line of the input is a control message a
 * connector may send on its control stream ("notify-sync", "notify": contract of
 * docs/tunnel.md), given to the hub that runs in the gateway (cmg_notify_control). A
 * small window (16) makes eviction, tombstones, epoch changes and de-duplication happen
 * often; a hub is made per input, so what one input leaves cannot hide another's leak. */
#include "gateway/gw.h"
#include "gateway/notify.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct cmg_gateway *gateway(void)
{
    static struct cmg_gateway gw;

    if (!gw.loop) {
        if (!(gw.loop = cmg_loop_new()))
            abort();
        gw.cfg.notify_window = 16;
        gw.cfg.notify_heartbeat_ms = 45000;
        gw.cfg.notify_retry_ms = 4000;
        gw.cfg.notify_buffer = 64 * 1024;
        cmg_log_set_level(CMG_LOG_ERROR);
    }
    return &gw;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cmg_gateway *gw = gateway();
    const char *p = (const char *)data, *end = p + size;

    if (cmg_notify_start(gw) < 0)
        abort();
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
        cJSON *msg = cJSON_ParseWithLength(p, len);
        const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(msg, "type"));

        if (type)
            cmg_notify_control(gw, type, msg, "fuzz");
        cJSON_Delete(msg);
        p += len + (nl != NULL);
    }
    cmg_notify_stop(gw);
    return 0;
}
