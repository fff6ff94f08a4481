/*
 * A foreign C client of the p2p audit logger, built at test time with the
 * stubs rpcgen makes from p2p/logger/logger.x:
 *
 *   rpcgen -C logger.x   (logger.h, logger_clnt.c, logger_xdr.c)
 *   gcc -I/usr/include/tirpc log_client.c logger_clnt.c logger_xdr.c -ltirpc
 *
 * Usage: log_client [-t SECONDS] tcp|udp HOST PORT PROGRAM MESSAGE...
 * PORT 0 asks HOST's rpcbind for the port (clnt_create). Prints one line
 * "LOG <result>" per message; exits 0 only when every call returned 0.
 * With -t (the benchmark bench/logger_vs_rpcgen.py), it calls LOG one at a
 * time, each waiting for its reply, cycling through the messages for SECONDS,
 * and prints one line "calls N seconds S" instead; exits 1 at the first call
 * that fails or does not return 0.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "logger.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* LOG the messages in turn, one call at a time, for `seconds`; 0 if all returned 0. */
static int timed(CLIENT *clnt, char **messages, int count, double seconds)
{
    unsigned long calls = 0;
    double start = now(), elapsed = 0;
    while (elapsed < seconds) {
        int *result = log_1(&messages[calls % count], clnt);
        if (result == NULL) {
            clnt_perror(clnt, "LOG");
            return 1;
        }
        if (*result != 0) {
            fprintf(stderr, "LOG returned %d\n", *result);
            return 1;
        }
        calls++;
        if (calls % 64 == 0)
            elapsed = now() - start;
    }
    printf("calls %lu seconds %.6f\n", calls, now() - start);
    return 0;
}

int main(int argc, char **argv)
{
    double seconds = 0;
    if (argc > 2 && strcmp(argv[1], "-t") == 0) {
        seconds = strtod(argv[2], NULL);
        argv += 2;
        argc -= 2;
    }
    if (argc < 6) {
        fprintf(stderr, "usage: %s [-t SECONDS] tcp|udp HOST PORT PROGRAM MESSAGE...\n",
                argv[0]);
        return 2;
    }
    const char *proto = argv[1];
    const char *host = argv[2];
    unsigned long port = strtoul(argv[3], NULL, 10);
    unsigned long program = strtoul(argv[4], NULL, 0);
    CLIENT *clnt;

    if (port == 0) {
        clnt = clnt_create(host, program, P2P_LOGGER_V1, proto);
    } else {
        struct sockaddr_in addr;
        int sock = RPC_ANYSOCK;
        memset(&addr, 0, sizeof addr);
        addr.sin_family = AF_INET;
        addr.sin_port = htons((unsigned short)port);
        if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
            fprintf(stderr, "bad IPv4 address %s\n", host);
            return 2;
        }
        if (strcmp(proto, "udp") == 0) {
            struct timeval wait = {1, 0};
            clnt = clntudp_create(&addr, program, P2P_LOGGER_V1, wait, &sock);
        } else {
            clnt = clnttcp_create(&addr, program, P2P_LOGGER_V1, &sock, 0, 0);
        }
    }
    if (clnt == NULL) {
        clnt_pcreateerror(host);
        return 1;
    }
    struct timeval timeout = {5, 0};
    clnt_control(clnt, CLSET_TIMEOUT, (char *)&timeout);

    int failed = 0;
    if (seconds > 0) {
        failed = timed(clnt, argv + 5, argc - 5, seconds);
        clnt_destroy(clnt);
        return failed;
    }
    for (int i = 5; i < argc; i++) {
        char *message = argv[i];
        int *result = log_1(&message, clnt);
        if (result == NULL) {
            clnt_perror(clnt, "LOG");
            failed = 1;
            continue;
        }
        printf("LOG %d\n", *result);
        if (*result != 0)
            failed = 1;
    }
    clnt_destroy(clnt);
    return failed;
}
