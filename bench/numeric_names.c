/* LD_PRELOAD for the rendezvous load bench's processes (bench/rdzv_load.py): getnameinfo answers
 * with the numeric address instead of asking DNS. Every TCPStore client names its own address
 * as it connects; on loopback that address is IPv4-mapped IPv6, which /etc/hosts does not name,
 * and on this machine about 2% of those lookups wait out the resolver's 5 s timeout. Simulated
 * nodes make hundreds of connections from one machine, so that tail would be measured instead of
 * the rendezvous. The answer is the one c10d falls back to when the lookup fails. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <sys/socket.h>

int getnameinfo(const struct sockaddr *addr, socklen_t addrlen, char *host, socklen_t hostlen,
                char *serv, socklen_t servlen, int flags) {
    static int (*real)(const struct sockaddr *, socklen_t, char *, socklen_t, char *, socklen_t, int);
    if (!real)
        real = dlsym(RTLD_NEXT, "getnameinfo");
    return real(addr, addrlen, host, hostlen, serv, servlen, flags | NI_NUMERICHOST);
}
