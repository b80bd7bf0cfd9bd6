/* The admin operations of client notifications (notify_ops.c), in ops.c's table:
 * "notify", "notify.status", "notify.resend", "notify.list", and "device.list" with
 * each device's last_seen and channel. */
#ifndef CMG_SITE_NOTIFY_OPS_H
#define CMG_SITE_NOTIFY_OPS_H

#include "site/ctx.h"

#include <cjson/cJSON.h>

int cmg_notify_op_send(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                       size_t len);
int cmg_notify_op_status(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                         size_t len);
int cmg_notify_op_resend(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                         size_t len);
int cmg_notify_op_list(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                       size_t len);
int cmg_notify_op_devices(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                          size_t len);

#endif
