/* Request targets from devices: cmg_path_check and cmg_path_parse must never
 * read out of bounds, and a target that passes the check has no dot segment. */
#include "http/path.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *p = malloc(size ? size : 1);   /* exact size, so overreads are caught */
    struct cmg_path path;

    if (!p)
        return 0;
    memcpy(p, data, size);
    if (cmg_path_check(p, size) == 0) {
        size_t end = size;
        for (size_t i = 0; i < size; i++)
            if (p[i] == '?') {
                end = i;
                break;
            }
        for (size_t i = 0; i + 3 <= end; i++)
            if (!memcmp(p + i, "/..", 3) && (i + 3 == end || p[i + 3] == '/'))
                abort();
        cmg_path_parse(p, size, &path);
        if (path.kind != CMG_PATH_OTHER &&
            (path.role < p || path.role + path.role_len > p + size || path.role_len == 0 ||
             path.rest + path.rest_len != p + size))
            abort();
    }
    free(p);
    return 0;
}
