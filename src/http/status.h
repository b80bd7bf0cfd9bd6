/* HTTP status reason phrases (RFC 9110 §15). */
#ifndef CMG_STATUS_H
#define CMG_STATUS_H

const char *cmg_reason_phrase(int status);

#endif
