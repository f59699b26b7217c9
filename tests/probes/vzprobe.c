/* vzprobe: the system calls a hostile CT root would try that busybox has no applet for.
 * Built static at test time (tests/test_isolation.py) and run inside a CT.
 * Every attempt is harmless if it succeeds on an unfenced node: it re-sets the current
 * clock value, unloads a module that doesn't exist, loads from an invalid fd, ...
 * Prints "ok" and exits 0 when the call succeeded, else "errno N NAME" and exits 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/swap.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/timex.h>
#include <time.h>
#include <signal.h>
#include <unistd.h>

static int report(long ret) {
    if (ret >= 0) { puts("ok"); return 0; }
    printf("errno %d %s\n", errno, strerrorname_np(errno));
    return 1;
}

int main(int argc, char **argv) {
    const char *op = argc > 1 ? argv[1] : "";
    if (!strcmp(op, "keyctl"))  /* KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING */
        return report(syscall(SYS_keyctl, 0, -3, 0));
    if (!strcmp(op, "kexec"))  /* invalid fds: EBADF once past the permission checks */
        return report(syscall(SYS_kexec_file_load, -1, -1, 0UL, "", 0UL));
    if (!strcmp(op, "finit_module"))
        return report(syscall(SYS_finit_module, -1, "", 0));
    if (!strcmp(op, "delete_module"))  /* no such module: ENOENT once permitted */
        return report(syscall(SYS_delete_module, "vzprobe_no_such_module", O_NONBLOCK));
    if (!strcmp(op, "open_by_handle")) {
        /* "shocker": the root directory of the file system holding the CT's files is inode 2
         * (ext4); a handle needs no path, so it would reach past the CT's root. */
        struct { struct file_handle fh; unsigned int ino_gen[2]; } h = {0};
        h.fh.handle_bytes = 8;
        h.fh.handle_type = 1; /* FILEID_INO32_GEN */
        h.ino_gen[0] = 2;
        int mnt = open("/", O_RDONLY | O_DIRECTORY);
        return report(open_by_handle_at(mnt, &h.fh, O_RDONLY | O_DIRECTORY));
    }
    if (!strcmp(op, "ptrace") && argc > 2)
        return report(ptrace(PTRACE_ATTACH, atoi(argv[2]), 0, 0));
    if (!strcmp(op, "kill") && argc > 2)
        return report(kill(atoi(argv[2]), SIGKILL));
    if (!strcmp(op, "clock_settime")) {  /* the current time again: no change if it works */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        return report(clock_settime(CLOCK_REALTIME, &ts));
    }
    if (!strcmp(op, "settimeofday")) {
        struct timeval tv;
        gettimeofday(&tv, NULL);
        return report(settimeofday(&tv, NULL));
    }
    if (!strcmp(op, "adjtimex")) {  /* write the current tick back */
        struct timex tx = {0};
        if (adjtimex(&tx) < 0) return report(-1);
        long tick = tx.tick;
        memset(&tx, 0, sizeof tx);
        tx.modes = ADJ_TICK;
        tx.tick = tick;
        return report(adjtimex(&tx));
    }
    if (!strcmp(op, "swapon"))  /* no such file: ENOENT once permitted */
        return report(swapon("/vzprobe-no-such-swap", 0));
    if (!strcmp(op, "bpf")) {  /* BPF_PROG_GET_NEXT_ID from 0 */
        unsigned int attr[16] = {0};
        return report(syscall(SYS_bpf, 11, attr, sizeof attr));
    }
    if (!strcmp(op, "read") && argc > 2) {  /* open and read one byte ("empty" if none) */
        char c;
        int fd = open(argv[2], O_RDONLY | O_NONBLOCK);
        if (fd < 0) return report(-1);
        long n = read(fd, &c, 1);
        if (n == 0) { puts("empty"); return 1; }
        return report(n);
    }
    if (!strcmp(op, "write") && argc > 3) {  /* open for writing and write argv[3] */
        int fd = open(argv[2], O_WRONLY);
        if (fd < 0) return report(-1);
        return report(write(fd, argv[3], strlen(argv[3])));
    }
    if (!strcmp(op, "udp") && argc > 4 && strchr(argv[3], ':')) {  /* IPv6: DST[%DEV] */
        struct sockaddr_in6 src = {.sin6_family = AF_INET6}, dst = {.sin6_family = AF_INET6};
        char host[64];
        int s = socket(AF_INET6, SOCK_DGRAM, 0);
        snprintf(host, sizeof host, "%s", argv[3]);
        char *dev = strchr(host, '%');
        if (dev) { *dev++ = 0; dst.sin6_scope_id = if_nametoindex(dev); }
        inet_pton(AF_INET6, argv[2], &src.sin6_addr);
        inet_pton(AF_INET6, host, &dst.sin6_addr);
        dst.sin6_port = htons(atoi(argv[4]));
        if (bind(s, (struct sockaddr *)&src, sizeof src) < 0) return report(-1);
        return report(sendto(s, argv[2], strlen(argv[2]), 0, (struct sockaddr *)&dst, sizeof dst));
    }
    if (!strcmp(op, "udp") && argc > 4) {  /* one datagram from SRC to DST:PORT */
        struct sockaddr_in src = {.sin_family = AF_INET}, dst = {.sin_family = AF_INET};
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        inet_pton(AF_INET, argv[2], &src.sin_addr);
        inet_pton(AF_INET, argv[3], &dst.sin_addr);
        dst.sin_port = htons(atoi(argv[4]));
        if (bind(s, (struct sockaddr *)&src, sizeof src) < 0) return report(-1);
        return report(sendto(s, argv[2], strlen(argv[2]), 0, (struct sockaddr *)&dst, sizeof dst));
    }
    fprintf(stderr, "usage: vzprobe OP [ARG...]\n");
    return 2;
}
