/* base64url without padding (RFC 7515 §2), as JWS and JWK use it. */
#ifndef CMG_B64URL_H
#define CMG_B64URL_H

#include <stddef.h>

/* Room cmg_b64url_encode needs for n bytes, terminating NUL included. */
#define CMG_B64URL_LEN(n) (((n) + 2) / 3 * 4 + 1)

/* Encodes n bytes into out (NUL-terminated); returns the length, or 0 with out
 * untouched if outcap is too small. */
size_t cmg_b64url_encode(const void *in, size_t n, char *out, size_t outcap);
/* Decodes; -1 on a character outside the alphabet, '=' padding, a length that is
 * 1 mod 4, non-zero trailing bits, or an output that would exceed outcap. */
int cmg_b64url_decode(const char *in, size_t n, unsigned char *out, size_t outcap,
                      size_t *outlen);

#endif
