/* HTTP status reason phrases (RFC 9110 §15). */
#ifndef CMG_STATUS_H
#define CMG_STATUS_H

#include <stddef.h>

const char *cmg_reason_phrase(int status);
/* The current time as an HTTP-date (RFC 9110 §5.6.7), "Sun, 06 Nov 1994 08:49:37 GMT",
 * for a Date field: the analyser measures its clock against it. */
void cmg_http_date(char *out, size_t outlen);

#endif
