/*
 * A foreign C client of the p2p audit logger, built at test time with the
 * stubs rpcgen makes from p2p/logger/logger.x:
 *
 *   rpcgen -C logger.x   (logger.h, logger_clnt.c, logger_xdr.c)
 *   gcc -I/usr/include/tirpc log_client.c logger_clnt.c logger_xdr.c -ltirpc
 *
 * Usage: log_client tcp|udp HOST PORT PROGRAM MESSAGE...
 * PORT 0 asks HOST's rpcbind for the port (clnt_create). Prints one line
 * "LOG <result>" per message; exits 0 only when every call returned 0.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "logger.h"

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: %s tcp|udp HOST PORT PROGRAM MESSAGE...\n", argv[0]);
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
