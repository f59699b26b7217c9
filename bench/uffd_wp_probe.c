/* Probe for issue 13's pre-copy question: can this kernel track the pages a process writes
 * without soft-dirty bits (which it lacks, so CRIU's pre-dump is out)? A userfaultfd in
 * asynchronous write-protect mode (UFFD_FEATURE_WP_ASYNC, Linux >= 6.7: the kernel resolves
 * the write faults itself, nothing has to serve them) plus the PAGEMAP_SCAN ioctl on
 * /proc/PID/pagemap (report PAGE_IS_WRITTEN pages and write-protect them again in one call)
 * is soft-dirty's replacement: arm, let the task run, then read which pages changed.
 *
 * It maps N MiB (default 1024), touches every page, arms, writes 1% of the pages scattered,
 * and times the arming, the writes and the scan. Not used by vzbackup: CRIU has no such
 * tracking yet (see README, "Benchmarks"). Exit status 2 when the kernel lacks either part.
 *
 *     gcc -O2 -o /tmp/uffd_wp_probe bench/uffd_wp_probe.c && /tmp/uffd_wp_probe [MIB]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct page_region { uint64_t start, end, categories; };
struct pm_scan_arg { uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages,
                     category_inverted, category_mask, category_anyof_mask, return_mask; };
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WRITTEN (1 << 1)
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static long scan(int pm, char *buf, size_t n, int wp, struct page_region *vec, size_t vlen, size_t *pages) {
    struct pm_scan_arg a = { .size = sizeof(a), .flags = wp ? PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC : 0,
        .start = (uint64_t)buf, .end = (uint64_t)buf + n, .vec = (uint64_t)vec, .vec_len = vlen,
        .category_mask = PAGE_IS_WRITTEN, .return_mask = PAGE_IS_WRITTEN };
    long r = ioctl(pm, PAGEMAP_SCAN, &a);
    *pages = 0;
    for (long i = 0; i < r; i++) *pages += (vec[i].end - vec[i].start) / 4096;
    return r;
}

int main(int argc, char **argv) {
    size_t n = (size_t)(argc > 1 ? atoi(argv[1]) : 1024) << 20;
    char *buf = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) { perror("mmap"); return 1; }
    memset(buf, 1, n);
    int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0) { perror("userfaultfd"); return 2; }
    struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED };
    if (ioctl(uffd, UFFDIO_API, &api)) { perror("UFFDIO_API (WP_ASYNC)"); return 2; }
    struct uffdio_register reg = { .range = { (uint64_t)buf, n }, .mode = UFFDIO_REGISTER_MODE_WP };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) { perror("UFFDIO_REGISTER WP"); return 2; }
    int pm = open("/proc/self/pagemap", O_RDONLY);
    size_t vlen = n / 4096, pages;
    struct page_region *vec = calloc(vlen, sizeof(*vec));
    double t0 = now();
    long r = scan(pm, buf, n, 1, vec, vlen, &pages);  /* write-protect everything: the "pre-dump" */
    double t1 = now();
    if (r < 0) { perror("PAGEMAP_SCAN"); return 2; }
    printf("arm (write-protect %zu MiB, report written): %.3f s, %zu pages written before\n", n >> 20, t1 - t0, pages);
    size_t dirty = n / 4096 / 100;  /* the workload writes 1% of its pages, scattered */
    double t2 = now();
    for (size_t i = 0; i < dirty; i++) buf[(i * 100 + 7) * 4096 % n] = 2;
    double t3 = now();
    r = scan(pm, buf, n, 1, vec, vlen, &pages);  /* the freeze: which pages changed since */
    double t4 = now();
    printf("dirtied %zu pages in %.4f s (async WP faults); scan+re-arm found %zu written pages in %ld regions: %.4f s\n",
           dirty, t3 - t2, pages, r, t4 - t3);
    r = scan(pm, buf, n, 0, vec, vlen, &pages);
    printf("rescan without writes: %zu written pages\n", pages);
    return 0;
}
