/*
 * The reference for bench/logger_vs_rpcgen.py: an ONC-RPC server of
 * p2p/logger/logger.x as rpcgen makes it, whose LOG appends the record and a
 * newline to a file with one write(2) before replying 0.
 *
 *   rpcgen -C -h -o logger.h logger.x
 *   rpcgen -C -m -o logger_svc.c logger.x     (dispatch p2p_logger_1, no main)
 *   rpcgen -C -c -o logger_xdr.c logger.x
 *   gcc -O2 -I/usr/include/tirpc -I. logger_rpcgen_server.c logger_svc.c logger_xdr.c -ltirpc
 *
 * Usage: logger_rpcgen_server PROGRAM AUDIT_FILE
 * Listens on 127.0.0.1, TCP and UDP on ports the kernel chooses, registers the
 * dispatch with the RPC library only (protocol 0: no rpcbind/portmapper), and
 * prints "rpcgen logger tcp PORT udp PORT" once it serves.
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "logger.h"

extern void p2p_logger_1(struct svc_req *, SVCXPRT *);

static int audit_fd = -1;

int *log_1_svc(char **argp, struct svc_req *rqstp)
{
    static int result;
    static char *line;
    static size_t room;
    size_t len = strlen(*argp);
    (void)rqstp;

    if (len + 1 > room) {
        free(line);
        room = len + 1 > 4096 ? len + 1 : 4096;
        line = malloc(room);
        if (line == NULL) {
            room = 0;
            result = -1;
            return &result;
        }
    }
    memcpy(line, *argp, len);
    line[len] = '\n';
    result = write(audit_fd, line, len + 1) == (ssize_t)(len + 1) ? 0 : -1;
    return &result;
}

static int bound_socket(int type, unsigned short *port)
{
    struct sockaddr_in addr;
    socklen_t size = sizeof addr;
    int sock = socket(AF_INET, type, 0);
    if (sock < 0)
        return -1;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(sock, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        getsockname(sock, (struct sockaddr *)&addr, &size) < 0) {
        close(sock);
        return -1;
    }
    *port = ntohs(addr.sin_port);
    return sock;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s PROGRAM AUDIT_FILE\n", argv[0]);
        return 2;
    }
    unsigned long program = strtoul(argv[1], NULL, 0);
    audit_fd = open(argv[2], O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (audit_fd < 0) {
        perror(argv[2]);
        return 1;
    }
    unsigned short tcp_port, udp_port;
    int tcp = bound_socket(SOCK_STREAM, &tcp_port);
    int udp = bound_socket(SOCK_DGRAM, &udp_port);
    if (tcp < 0 || udp < 0 || listen(tcp, SOMAXCONN) < 0) {
        perror("socket");
        return 1;
    }
    SVCXPRT *tcp_xprt = svctcp_create(tcp, 0, 0);
    SVCXPRT *udp_xprt = svcudp_create(udp);
    if (tcp_xprt == NULL || udp_xprt == NULL) {
        fprintf(stderr, "cannot create the RPC transports\n");
        return 1;
    }
    /* protocol 0: known to svc_run's dispatch, not registered with rpcbind */
    if (!svc_register(tcp_xprt, program, P2P_LOGGER_V1, p2p_logger_1, 0) ||
        !svc_register(udp_xprt, program, P2P_LOGGER_V1, p2p_logger_1, 0)) {
        fprintf(stderr, "cannot register the dispatch\n");
        return 1;
    }
    printf("rpcgen logger tcp %u udp %u\n", tcp_port, udp_port);
    fflush(stdout);
    svc_run();
    fprintf(stderr, "svc_run returned\n");
    return 1;
}
