/* memwitness MIB [free|unmap|remap|fork]: a witness that a migration moved a process's memory
 * intact.
 *
 * Fills MIB MiB of anonymous memory with a seeded pattern, leaving every 7th page untouched
 * (runs of present pages with holes between them; with a churn mode no holes), and 1 MiB
 * more that it then makes PROT_NONE (pages a reader can only get at with FOLL_FORCE). It
 * writes /tmp/memwitness.ready and then, each time /tmp/memwitness.check appears, checks
 * every byte against the pattern and writes "ok" or "bad ..." to /tmp/memwitness.result
 * (and removes the request). A churn mode also changes its mappings all the time, as an
 * allocator does: every 0.5 ms, one page in the middle of a 64 KiB run (walking the region
 * in a scattered order) is
 *   free   freed (madvise(MADV_DONTNEED)) and filled again,
 *   unmap  unmapped, mapped anew at the same address and filled again,
 *   remap  moved elsewhere (mremap) and back, its content kept,
 *   fork   freed and filled again (as free), and every 50 ms a forked child checks 64
 *          scattered pages (the ones its parent has not got back yet are missing in it too).
 * Built static by tests/test_migrate.py and copied into the CT. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096UL
#define HOLE_EVERY 7

static uint64_t word(uint64_t i) { /* splitmix64: incompressible, position-dependent */
    uint64_t z = i * 0x9e3779b97f4a7c15ULL + 0x5eed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void put(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (f) { fputs(text, f); fclose(f); }
}

#define CHURN_EVERY 16     /* the page churned in each run of 16 (64 KiB) */
#define CHURN_SLEEP_US 500 /* between two churn steps */

/* fill (check=0) or check (check=1) the pages of [buf, buf+len) that are not holes;
 * returns the first bad byte offset + 1, or 0 */
static size_t walk(uint64_t *buf, size_t len, uint64_t seed, int holes, int check) {
    size_t per_page = PAGE / 8;
    for (size_t p = 0; p < len / PAGE; p++) {
        uint64_t *pg = buf + p * per_page;
        int hole = holes && p % HOLE_EVERY == HOLE_EVERY - 1;
        for (size_t i = 0; i < per_page; i++) {
            uint64_t want = hole ? 0 : word(seed + p * per_page + i);
            if (!check) {
                if (!hole) pg[i] = want;
            } else if (pg[i] != want) {
                return (p * per_page + i) * 8 + 1;
            }
        }
    }
    return 0;
}

enum mode { STILL, FREE, UNMAP, REMAP, FORK };

/* one churn step on the step-th page of the walk; *spare* is a page-sized reservation a
 * moved page goes to for a moment (REMAP). Returns 0, or -1 if a call failed. */
static int churn(uint64_t *big, size_t len, size_t step, enum mode mode, void *spare) {
    size_t runs = len / PAGE / CHURN_EVERY, per_page = PAGE / 8;
    size_t p = (step * 7919 % runs) * CHURN_EVERY + CHURN_EVERY / 2; /* 7919: a prime */
    uint64_t *pg = big + p * per_page;
    int fixed = MREMAP_MAYMOVE | MREMAP_FIXED, prot = PROT_READ | PROT_WRITE;
    if (mode == REMAP) {
        if (mremap(pg, PAGE, PAGE, fixed, spare) == MAP_FAILED ||
            mremap(spare, PAGE, PAGE, fixed, pg) == MAP_FAILED ||
            mmap(spare, PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                 -1, 0) == MAP_FAILED)
            return -1;
        return 0;
    }
    if ((mode == FREE || mode == FORK) && madvise(pg, PAGE, MADV_DONTNEED))
        return -1;
    if (mode == UNMAP && (munmap(pg, PAGE) ||
                          mmap(pg, PAGE, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
                              == MAP_FAILED))
        return -1;
    for (size_t i = 0; i < per_page; i++) pg[i] = word(1 + p * per_page + i);
    return 0;
}

static enum mode parse_mode(const char *arg) {
    static const char *names[] = {"", "free", "unmap", "remap", "fork"};
    for (int m = FREE; m <= FORK; m++)
        if (arg && !strcmp(arg, names[m])) return (enum mode)m;
    return STILL;
}

#define FORK_PAGES 64 /* pages a forked child checks */

/* fork a child that checks FORK_PAGES pages of [big, big+len) (no holes) from the
 * step-th on, scattered; 0 if it found them all as written */
static int forked_check(uint64_t *big, size_t len, size_t step) {
    size_t pages = len / PAGE, per_page = PAGE / 8;
    int status;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        for (size_t k = 0; k < FORK_PAGES; k++) {
            size_t p = (step * 31 + k * 4099) % pages; /* 4099: a prime */
            for (size_t i = 0; i < per_page; i++)
                if (big[p * per_page + i] != word(1 + p * per_page + i)) _exit(1);
        }
        _exit(0);
    }
    if (waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}

int main(int argc, char **argv) {
    size_t len = (argc > 1 ? strtoul(argv[1], NULL, 10) : 32) << 20, nlen = 1 << 20;
    enum mode mode = parse_mode(argc > 2 ? argv[2] : NULL);
    int churning = mode != STILL, flags = MAP_PRIVATE | MAP_ANONYMOUS;
    uint64_t *big = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, -1, 0);
    uint64_t *none = mmap(NULL, nlen, PROT_READ | PROT_WRITE, flags, -1, 0);
    void *spare = mmap(NULL, PAGE, PROT_NONE, flags, -1, 0);
    char msg[128];
    if (big == MAP_FAILED || none == MAP_FAILED || spare == MAP_FAILED) return 1;
    walk(big, len, 1, !churning, 0);
    walk(none, nlen, 1ULL << 40, 0, 0);
    if (mprotect(none, nlen, PROT_NONE)) return 1;
    put("/tmp/memwitness.ready", "ready\n");
    size_t failed = 0; /* the churn step that failed, + 1: churning stops, checks say so */
    for (size_t step = 0;; step++) {
        if (churning && !failed && churn(big, len, step, mode, spare)) failed = step + 1;
        if (mode == FORK && !failed && step % 100 == 50 && forked_check(big, len, step))
            failed = step + 1;
        usleep(churning ? CHURN_SLEEP_US : 50000);
        if (churning && step % 100) continue;
        if (access("/tmp/memwitness.check", F_OK)) continue;
        size_t bad = failed ? 0 : walk(big, len, 1, !churning, 1), bad_none = 0;
        if (mprotect(none, nlen, PROT_READ) == 0) {
            bad_none = walk(none, nlen, 1ULL << 40, 0, 1);
            mprotect(none, nlen, PROT_NONE);
        }
        if (failed) snprintf(msg, sizeof msg, "bad: churn step %zu failed (or its forked check)\n", failed - 1);
        else if (bad) snprintf(msg, sizeof msg, "bad at %zu of the big region\n", bad - 1);
        else if (bad_none) snprintf(msg, sizeof msg, "bad at %zu of the PROT_NONE region\n", bad_none - 1);
        else snprintf(msg, sizeof msg, "ok\n");
        put("/tmp/memwitness.result", msg);
        unlink("/tmp/memwitness.check");
    }
}
