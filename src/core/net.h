/* Sockets: address parsing, listeners, non-blocking connects. */
#ifndef CMG_NET_H
#define CMG_NET_H

#include <stdbool.h>
#include <sys/socket.h>

struct cmg_addr {
    struct sockaddr_storage ss;
    socklen_t len;
};

/* Parses "host:port", "[v6]:port" or "host" with default_port (0: port required).
 * Names are resolved (blocking): call it at start-up, not on the data path.
 * Returns 0, or -1 with a message in err. */
int cmg_addr_parse(const char *s, int default_port, struct cmg_addr *a, char *err, size_t errlen);
/* "1.2.3.4:5" or "[::1]:5" */
void cmg_addr_str(const struct sockaddr *sa, char *out, size_t outlen);
/* A non-blocking socket bound to a, not listening yet: with SO_REUSEPORT, it takes no
 * connection from the others bound to the port until listen(). The fd, or -1 with errno. */
int cmg_net_bind(const struct cmg_addr *a, bool reuseport);
/* A non-blocking listening socket. Returns the fd, or -1 with errno set. */
int cmg_net_listen(const struct cmg_addr *a, bool reuseport, int backlog);
/* Starts a non-blocking connect. Returns the fd (connect may be in progress) or -1. */
int cmg_net_connect(const struct cmg_addr *a);

#endif
