/*
 * fsmeta: an ext4 metadata workload. A seeded sequence of create, write,
 * rename and unlink operations on a pool of files in one directory; each
 * operation is acknowledged on stdout only after the file and the directory
 * were fsynced, so every acknowledged operation's effect must survive a crash
 * that the storage stack's contract covers.
 *
 *   fsmeta [--ops N] [--seed S] [--files F] [--max-size BYTES] DIR
 *   fsmeta --check --acked N [--window W] [--seed S] [--files F] [--max-size BYTES] DIR
 *
 * The operation sequence is a pure function of (seed, files, max-size), so
 * --check replays it in memory up to the last acknowledged operation N and
 * compares every file in the pool with what it must be. Operations N+1 to
 * N+W (W <= 64) may have happened without their acknowledgement reaching the
 * host, the last of them only partly: a file they touch may be found in its
 * acknowledged state or in any state they left (a prefix, or zeros, for an
 * interrupted create/write). Every other state is a failure.
 *
 * Write mode prints "<op> <create|write|rename|unlink> <name> [<name>]\n" per
 * acknowledged operation (op counts from 1), flushed. Check mode prints one
 * JSON object with the failures (the first 64) and "ok".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_FILES 4096
#define MAX_LISTED 64

enum op_kind { OP_CREATE, OP_WRITE, OP_RENAME, OP_UNLINK };
static const char *const op_names[] = {"create", "write", "rename", "unlink"};

struct slot {
    int present;
    uint64_t version; /* the op that wrote the content */
    uint64_t length;
    uint64_t last_op; /* the op that last changed this name */
};

struct op {
    enum op_kind kind;
    unsigned a, b; /* slot indexes; b only for rename */
    uint64_t length; /* create/write */
};

struct sim {
    uint64_t rng;
    unsigned files;
    uint64_t max_size;
    struct slot slot[MAX_FILES];
};

static uint64_t mix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static uint64_t next(struct sim *s)
{
    s->rng = mix(s->rng);
    return s->rng;
}

/* The index-th slot (0-based) whose present flag equals `present`. */
static unsigned pick(struct sim *s, int present, unsigned count)
{
    unsigned want = (unsigned)(next(s) % count);
    for (unsigned i = 0; i < s->files; i++)
        if (s->slot[i].present == present && want-- == 0)
            return i;
    abort();
}

/* Draw op k and apply it to the simulated state. */
static struct op step(struct sim *s, uint64_t k)
{
    unsigned present = 0;
    for (unsigned i = 0; i < s->files; i++)
        present += (unsigned)s->slot[i].present;
    unsigned r = (unsigned)(next(s) % 100);
    struct op op = {0};
    if (present == 0 || (r < 30 && present < s->files))
        op.kind = OP_CREATE;
    else if (r < 55)
        op.kind = OP_WRITE;
    else if (r < 80)
        op.kind = OP_RENAME;
    else
        op.kind = OP_UNLINK;

    switch (op.kind) {
    case OP_CREATE:
        op.a = pick(s, 0, s->files - present);
        op.length = 1 + next(s) % s->max_size;
        s->slot[op.a] = (struct slot){1, k, op.length, k};
        break;
    case OP_WRITE:
        op.a = pick(s, 1, present);
        op.length = 1 + next(s) % s->max_size;
        s->slot[op.a] = (struct slot){1, k, op.length, k};
        break;
    case OP_RENAME:
        op.a = pick(s, 1, present);
        op.b = (unsigned)(next(s) % s->files);
        if (op.b == op.a)
            op.b = (op.b + 1) % s->files;
        if (op.b == op.a) { /* a pool of one file: rename becomes a write */
            op.kind = OP_WRITE;
            op.length = 1 + next(s) % s->max_size;
            s->slot[op.a] = (struct slot){1, k, op.length, k};
            break;
        }
        s->slot[op.b] = s->slot[op.a];
        s->slot[op.b].last_op = k;
        s->slot[op.a] = (struct slot){0, 0, 0, k};
        break;
    case OP_UNLINK:
        op.a = pick(s, 1, present);
        s->slot[op.a] = (struct slot){0, 0, 0, k};
        break;
    }
    return op;
}

static void sim_init(struct sim *s, uint64_t seed, unsigned files, uint64_t max_size)
{
    memset(s, 0, sizeof(*s));
    s->rng = mix(seed);
    s->files = files;
    s->max_size = max_size;
}

static void content(unsigned char *buf, uint64_t length, uint64_t seed, uint64_t version)
{
    uint64_t state = mix(seed ^ mix(version));
    for (uint64_t i = 0; i < length; i++) {
        if (i % 8 == 0)
            state = mix(state);
        buf[i] = (unsigned char)(state >> (8 * (i % 8)));
    }
}

static void name_of(char *out, size_t n, unsigned slot)
{
    snprintf(out, n, "f%04u", slot);
}

static void die(const char *what, const char *name)
{
    fprintf(stderr, "fsmeta: %s %s: %s\n", what, name, strerror(errno));
    exit(1);
}

static void write_file(int dirfd, const char *name, int flags, const unsigned char *buf,
                       uint64_t length)
{
    int fd = openat(dirfd, name, O_WRONLY | O_CLOEXEC | flags, 0644);
    if (fd < 0)
        die("open", name);
    uint64_t done = 0;
    while (done < length) {
        ssize_t w = write(fd, buf + done, length - done);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            die("write", name);
        }
        done += (uint64_t)w;
    }
    if (fsync(fd) < 0)
        die("fsync", name);
    if (close(fd) < 0)
        die("close", name);
}

static int run_writer(const char *dir, uint64_t ops, uint64_t seed, unsigned files,
                      uint64_t max_size)
{
    if (mkdir(dir, 0755) < 0 && errno != EEXIST)
        die("mkdir", dir);
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        die("open", dir);
    DIR *d = fdopendir(dup(dirfd));
    if (!d)
        die("opendir", dir);
    for (struct dirent *e; (e = readdir(d));) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            fprintf(stderr, "fsmeta: %s is not empty (found %s); start from an empty directory\n",
                    dir, e->d_name);
            return 1;
        }
    }
    closedir(d);
    /* The directory itself must be durable before the first acknowledgement. */
    char parent[4096];
    snprintf(parent, sizeof(parent), "%s/..", dir);
    int pfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (pfd < 0 || fsync(pfd) < 0 || fsync(dirfd) < 0)
        die("fsync", dir);
    close(pfd);

    static struct sim s;
    sim_init(&s, seed, files, max_size);
    unsigned char *buf = malloc(max_size);
    if (!buf)
        die("malloc", "buffer");
    for (uint64_t k = 1; ops == 0 || k <= ops; k++) {
        struct op op = step(&s, k);
        char a[32], b[32];
        name_of(a, sizeof(a), op.a);
        name_of(b, sizeof(b), op.b);
        switch (op.kind) {
        case OP_CREATE:
            content(buf, op.length, seed, k);
            write_file(dirfd, a, O_CREAT | O_EXCL, buf, op.length);
            break;
        case OP_WRITE:
            content(buf, op.length, seed, k);
            write_file(dirfd, a, O_TRUNC, buf, op.length);
            break;
        case OP_RENAME:
            if (renameat(dirfd, a, dirfd, b) < 0)
                die("rename", a);
            break;
        case OP_UNLINK:
            if (unlinkat(dirfd, a, 0) < 0)
                die("unlink", a);
            break;
        }
        if (fsync(dirfd) < 0)
            die("fsync", dir);
        if (op.kind == OP_RENAME)
            printf("%" PRIu64 " %s %s %s\n", k, op_names[op.kind], a, b);
        else
            printf("%" PRIu64 " %s %s\n", k, op_names[op.kind], a);
        fflush(stdout);
    }
    free(buf);
    close(dirfd);
    return 0;
}

static unsigned failures;

static void fail(const char *name, const char *expected, const char *found)
{
    if (failures < MAX_LISTED)
        printf("%s{\"name\": \"%s\", \"expected\": \"%s\", \"found\": \"%s\"}", failures ? ", " : "",
               name, expected, found);
    failures++;
}

/* A state a name may be found in: the acknowledged one, or one an unacknowledged op left. */
struct candidate {
    int present;
    uint64_t version, length, op;
    int partial_ok; /* a create/write that may have been cut mid-way: a prefix will do */
};

#define MAX_WINDOW 64

static int matches(const struct candidate *c, const unsigned char *got, ssize_t n,
                   unsigned char *want, uint64_t seed)
{
    if (!c->present)
        return n < 0;
    if (n < 0)
        return 0;
    if ((uint64_t)n > c->length || (!c->partial_ok && (uint64_t)n != c->length))
        return 0;
    content(want, c->length, seed, c->version);
    if (memcmp(want, got, (size_t)n) == 0)
        return 1;
    for (ssize_t i = 0; i < n; i++) /* cut before the data reached the disk */
        if (got[i])
            return 0;
    return c->partial_ok;
}

static int run_check(const char *dir, uint64_t acked, uint64_t window, uint64_t seed,
                     unsigned files, uint64_t max_size)
{
    static struct sim s;
    static struct candidate cand[MAX_FILES][MAX_WINDOW + 1];
    static unsigned ncand[MAX_FILES];
    sim_init(&s, seed, files, max_size);
    for (uint64_t k = 1; k <= acked; k++)
        step(&s, k);
    for (unsigned i = 0; i < files; i++) {
        struct slot *e = &s.slot[i];
        cand[i][0] = (struct candidate){e->present, e->version, e->length, e->last_op, 0};
        ncand[i] = 1;
    }
    for (uint64_t k = acked + 1; k <= acked + window; k++) {
        struct op op = step(&s, k);
        unsigned touched[2] = {op.a, op.b};
        for (int t = 0; t < (op.kind == OP_RENAME ? 2 : 1); t++) {
            unsigned i = touched[t];
            struct slot *e = &s.slot[i];
            int partial = op.kind == OP_CREATE || op.kind == OP_WRITE;
            cand[i][ncand[i]++] = (struct candidate){e->present, e->version, e->length, k, partial};
        }
    }

    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0 && !(errno == ENOENT && acked == 0))
        die("open", dir);
    unsigned char *want = malloc(max_size), *got = malloc(max_size + 1);
    if (!want || !got)
        die("malloc", "buffer");
    unsigned checked = 0, n_uncertain = 0;
    printf("{\"dir\": \"%s\", \"acked\": %" PRIu64 ", \"window\": %" PRIu64 ", \"failures\": [", dir,
           acked, window);
    for (unsigned i = 0; dirfd >= 0 && i < files; i++) {
        char name[32], exp[128], found[96];
        name_of(name, sizeof(name), i);
        checked++;
        n_uncertain += ncand[i] > 1;
        ssize_t n = -1;
        int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            n = pread(fd, got, max_size + 1, 0);
            close(fd);
            if (n < 0) {
                fail(name, "readable", strerror(errno));
                continue;
            }
        } else if (errno != ENOENT) {
            fail(name, "absent or readable", strerror(errno));
            continue;
        }
        int ok = 0;
        for (unsigned c = 0; c < ncand[i] && !ok; c++)
            ok = matches(&cand[i][c], got, n, want, seed);
        if (ok)
            continue;
        struct candidate *e = &cand[i][0];
        if (e->present)
            snprintf(exp, sizeof(exp), "%" PRIu64 " bytes of version %" PRIu64 " (op %" PRIu64 ")%s",
                     e->length, e->version, e->op, ncand[i] > 1 ? " or a later state" : "");
        else
            snprintf(exp, sizeof(exp), "absent since op %" PRIu64 "%s", e->op,
                     ncand[i] > 1 ? " or a later state" : "");
        if (n < 0)
            snprintf(found, sizeof(found), "absent");
        else if (e->present && (uint64_t)n == e->length)
            snprintf(found, sizeof(found), "%zd bytes, different content", n);
        else
            snprintf(found, sizeof(found), "%zd bytes", n);
        fail(name, exp, found);
    }
    if (dirfd >= 0) {
        DIR *d = fdopendir(dup(dirfd));
        for (struct dirent *ent; d && (ent = readdir(d));) {
            unsigned idx;
            char tail;
            if (!strcmp(ent->d_name, ".") || !strcmp(ent->d_name, ".."))
                continue;
            if (sscanf(ent->d_name, "f%4u%c", &idx, &tail) != 1 || idx >= files ||
                strlen(ent->d_name) != 5)
                fail(ent->d_name, "no such name in the pool", "present");
        }
        if (d)
            closedir(d);
        close(dirfd);
    }
    printf("], \"failure_count\": %u, \"checked\": %u, \"uncertain\": %u, \"ok\": %s}\n", failures,
           checked, n_uncertain, failures ? "false" : "true");
    free(want);
    free(got);
    return 0;
}

static uint64_t parse_u64(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || !*s) {
        fprintf(stderr, "fsmeta: %s must be a number, not '%s'\n", what, s);
        exit(2);
    }
    return v;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: fsmeta [--ops N] [--seed S] [--files F] [--max-size BYTES] DIR\n"
            "       fsmeta --check --acked N [--window W] [--seed S] [--files F] [--max-size BYTES] DIR\n");
    exit(2);
}

int main(int argc, char **argv)
{
    uint64_t ops = 0, seed = 0, max_size = 16384, acked = 0, window = 16, files = 32;
    int check = 0;
    const char *dir = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--check"))
            check = 1;
        else if (!strcmp(a, "--ops") && i + 1 < argc)
            ops = parse_u64(argv[++i], "--ops");
        else if (!strcmp(a, "--seed") && i + 1 < argc)
            seed = parse_u64(argv[++i], "--seed");
        else if (!strcmp(a, "--files") && i + 1 < argc)
            files = parse_u64(argv[++i], "--files");
        else if (!strcmp(a, "--max-size") && i + 1 < argc)
            max_size = parse_u64(argv[++i], "--max-size");
        else if (!strcmp(a, "--acked") && i + 1 < argc)
            acked = parse_u64(argv[++i], "--acked");
        else if (!strcmp(a, "--window") && i + 1 < argc)
            window = parse_u64(argv[++i], "--window");
        else if (a[0] == '-' || dir)
            usage();
        else
            dir = a;
    }
    if (!dir)
        usage();
    if (files < 1 || files > MAX_FILES || max_size < 1 || max_size > (64u << 20)) {
        fprintf(stderr, "fsmeta: --files must be in [1, %d] and --max-size in [1, 64M]\n", MAX_FILES);
        return 2;
    }
    if (window > MAX_WINDOW) {
        fprintf(stderr, "fsmeta: --window must be at most %d\n", MAX_WINDOW);
        return 2;
    }
    if (strlen(dir) > 2048 || strchr(dir, '"') || strchr(dir, '\\')) {
        fprintf(stderr, "fsmeta: DIR must be a plain path of at most 2048 bytes\n");
        return 2;
    }
    if (check)
        return run_check(dir, acked, window, seed, (unsigned)files, max_size);
    return run_writer(dir, ops, seed, (unsigned)files, max_size);
}
