#include "core/net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int cmg_addr_parse(const char *s, int default_port, struct cmg_addr *a, char *err, size_t errlen)
{
    char host[256], port[16];
    const char *colon;
    struct addrinfo hints, *res = NULL;
    size_t hl;
    int rc;

    if (s[0] == '[') {
        const char *end = strchr(s, ']');
        if (!end) {
            snprintf(err, errlen, "'%s': missing ']'", s);
            return -1;
        }
        hl = (size_t)(end - s - 1);
        colon = end[1] == ':' ? end + 1 : NULL;
        if (end[1] && !colon) {
            snprintf(err, errlen, "'%s': expected ':' after ']'", s);
            return -1;
        }
        s++;
    } else {
        colon = strrchr(s, ':');
        hl = colon ? (size_t)(colon - s) : strlen(s);
    }
    if (hl == 0 || hl >= sizeof(host)) {
        snprintf(err, errlen, "'%s': bad host", s);
        return -1;
    }
    memcpy(host, s, hl);
    host[hl] = 0;
    if (colon) {
        char *e;
        long p = strtol(colon + 1, &e, 10);
        if (*e || p <= 0 || p > 65535) {
            snprintf(err, errlen, "'%s': bad port", colon + 1);
            return -1;
        }
        snprintf(port, sizeof(port), "%ld", p);
    } else if (default_port > 0) {
        snprintf(port, sizeof(port), "%d", default_port);
    } else {
        snprintf(err, errlen, "'%s': a port is required (host:port)", s);
        return -1;
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0 || !res) {
        snprintf(err, errlen, "'%s': %s", host, gai_strerror(rc));
        return -1;
    }
    memcpy(&a->ss, res->ai_addr, res->ai_addrlen);
    a->len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

void cmg_addr_str(const struct sockaddr *sa, char *out, size_t outlen)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const void *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
        snprintf(out, outlen, "[%s]:%d", ip, ntohs(s6->sin6_port));
    } else if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const void *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
        snprintf(out, outlen, "%s:%d", ip, ntohs(s4->sin_port));
    } else {
        snprintf(out, outlen, "?");
    }
}

int cmg_net_bind(const struct cmg_addr *a, bool reuseport)
{
    int one = 1, fd, saved;

    fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0)
        goto fail;
    if (a->ss.ss_family == AF_INET6)   /* [::] and 0.0.0.0 are listed separately */
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&a->ss, a->len) < 0)
        goto fail;
    return fd;
fail:
    saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

int cmg_net_listen(const struct cmg_addr *a, bool reuseport, int backlog)
{
    int fd = cmg_net_bind(a, reuseport), saved;

    if (fd < 0 || listen(fd, backlog) == 0)
        return fd;
    saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

int cmg_net_connect(const struct cmg_addr *a)
{
    int one = 1;
    int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, (const struct sockaddr *)&a->ss, a->len) < 0 && errno != EINPROGRESS) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}
