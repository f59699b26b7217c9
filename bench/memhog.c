/* A process with N MiB of touched anonymous memory and a 5 ms tick loop that records the
 * longest gap between ticks it ever saw (what a migration's freeze looks like from inside).
 * usage: memhog MIB          writes /tmp/memhog.gap_ms and /tmp/memhog.ticks
 * Built static by bench/migrate.py and copied into the container. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void put(const char *path, double v) {
    FILE *f = fopen(path, "w");
    if (f) { fprintf(f, "%.1f\n", v); fclose(f); }
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 100;
    size_t n = mib << 20;
    uint64_t *buf = malloc(n), x = 88172645463325252ULL;
    if (!buf) return 1;
    for (size_t i = 0; i < n / 8; i++) { /* xorshift: incompressible, every page touched */
        x ^= x << 13; x ^= x >> 7; x ^= x << 17; buf[i] = x;
    }
    put("/tmp/memhog.ready", mib);
    double last = now_ms(), gap = 0;
    for (unsigned long ticks = 1;; ticks++) {
        usleep(5000);
        double t = now_ms();
        if (t - last > gap) { gap = t - last; put("/tmp/memhog.gap_ms", gap); }
        last = t;
        if (ticks % 200 == 0) put("/tmp/memhog.ticks", ticks);
    }
}
