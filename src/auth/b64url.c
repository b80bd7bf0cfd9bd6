/* base64url without padding (RFC 4648 §5, RFC 7515 §2). The decoder is strict
 * so that one byte string has exactly one encoding: tokens are compared and
 * hashed as text, and a lenient decoder would let two spellings of one token pass. */
#include "auth/b64url.h"

#include <stdint.h>

static const char alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static int sextet(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

/* Characters needed for n bytes, without padding and without the NUL. */
static size_t encoded_len(size_t n)
{
    return n / 3 * 4 + (n % 3 ? n % 3 + 1 : 0);
}

size_t cmg_b64url_encode(const void *in, size_t n, char *out, size_t outcap)
{
    const unsigned char *p = in;
    size_t len, o = 0, i = 0;

    if (n > (SIZE_MAX - 4) / 4 * 3 || !out)   /* encoded_len would overflow */
        return 0;
    len = encoded_len(n);
    if (outcap < len + 1)
        return 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
        out[o++] = alphabet[v >> 18 & 63];
        out[o++] = alphabet[v >> 12 & 63];
        out[o++] = alphabet[v >> 6 & 63];
        out[o++] = alphabet[v & 63];
    }
    if (n - i == 1) {
        out[o++] = alphabet[p[i] >> 2];
        out[o++] = alphabet[(p[i] & 3) << 4];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)p[i] << 8 | p[i + 1];
        out[o++] = alphabet[v >> 10 & 63];
        out[o++] = alphabet[v >> 4 & 63];
        out[o++] = alphabet[(v & 15) << 2];
    }
    out[o] = 0;
    return o;
}

int cmg_b64url_decode(const char *in, size_t n, unsigned char *out, size_t outcap,
                      size_t *outlen)
{
    size_t need = n / 4 * 3 + (n % 4 ? n % 4 - 1 : 0), o = 0;
    uint32_t acc = 0;
    int bits = 0;

    if (n % 4 == 1 || need > outcap || (n && (!in || !out)))
        return -1;
    for (size_t i = 0; i < n; i++) {
        int v = sextet((unsigned char)in[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6 | (uint32_t)v) & 0xffffff;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    /* The 2 or 4 bits left over must be zero: else two strings decode alike. */
    if (acc & ((1u << bits) - 1))
        return -1;
    if (outlen)
        *outlen = o;
    return 0;
}
