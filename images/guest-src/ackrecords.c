/*
 * ackrecords: append numbered, checksummed records to a file, syncing each,
 * and report every record on stdout only after its sync returned -- so each
 * line the host receives is a promise the storage stack has to keep.
 *
 *   ackrecords [--sync fsync|fdatasync|none] [--size BYTES] [--records N]
 *              [--seed S] [--interval-us U] FILE
 *   ackrecords --check [--size BYTES] [--seed S] FILE
 *
 * Record layout (little-endian, `size` bytes, size >= 64 and a multiple of 8):
 *   0  u32 magic "PCAR"     4  u32 size      8  u64 seq (1, 2, ...)
 *   16 u64 seed             24 payload (size - 28 bytes, from seq and seed)
 *   size-4 u32 CRC-32 (IEEE) of bytes [0, size-4)
 * Record `seq` lives at offset (seq - 1) * size.
 *
 * Write mode prints "<seq>\n" per acknowledged record, flushed. Check mode
 * prints one JSON object: the highest contiguous valid seq, the number of
 * valid records, and each invalid one (index, offset, reason), the first 64.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x52414350u /* "PCAR" read as little-endian u32 */
#define HEADER 24
#define MAX_LISTED 64

enum sync_mode { SYNC_FSYNC, SYNC_FDATASYNC, SYNC_NONE };

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_ieee(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* splitmix64: the payload is a pure function of (seed, seq). */
static uint64_t mix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static void fill_record(unsigned char *rec, size_t size, uint64_t seq, uint64_t seed)
{
    put_u32(rec, MAGIC);
    put_u32(rec + 4, (uint32_t)size);
    put_u64(rec + 8, seq);
    put_u64(rec + 16, seed);
    uint64_t state = mix(seed ^ mix(seq));
    for (size_t i = HEADER; i < size - 4; i++) {
        if ((i - HEADER) % 8 == 0)
            state = mix(state);
        rec[i] = (unsigned char)(state >> (8 * ((i - HEADER) % 8)));
    }
    put_u32(rec + size - 4, crc32_ieee(rec, size - 4));
}

static void usage(void)
{
    fprintf(stderr,
            "usage: ackrecords [--sync fsync|fdatasync|none] [--size BYTES] [--records N]\n"
            "                  [--seed S] [--interval-us U] FILE\n"
            "       ackrecords --check [--size BYTES] [--seed S] FILE\n");
    exit(2);
}

static uint64_t parse_u64(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || !*s) {
        fprintf(stderr, "ackrecords: %s must be a number, not '%s'\n", what, s);
        exit(2);
    }
    return v;
}

static int write_all(int fd, const unsigned char *buf, size_t n)
{
    while (n) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

static int run_writer(const char *path, size_t size, uint64_t records, uint64_t seed,
                      enum sync_mode sync_mode, uint64_t interval_us)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        fprintf(stderr, "ackrecords: open %s: %s\n", path, strerror(errno));
        return 1;
    }
    unsigned char *rec = malloc(size);
    if (!rec) {
        fprintf(stderr, "ackrecords: out of memory\n");
        return 1;
    }
    /* Make the (empty) file and its directory entry durable before the first ack. */
    if (sync_mode != SYNC_NONE) {
        char dir[4096];
        snprintf(dir, sizeof(dir), "%s", path);
        char *slash = strrchr(dir, '/');
        if (!slash)
            snprintf(dir, sizeof(dir), ".");
        else if (slash == dir)
            dir[1] = '\0';
        else
            *slash = '\0';
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fsync(fd) < 0 || dfd < 0 || fsync(dfd) < 0) {
            fprintf(stderr, "ackrecords: fsync %s: %s\n", path, strerror(errno));
            return 1;
        }
        close(dfd);
    }
    for (uint64_t seq = 1; records == 0 || seq <= records; seq++) {
        fill_record(rec, size, seq, seed);
        if (write_all(fd, rec, size) < 0) {
            fprintf(stderr, "ackrecords: write record %" PRIu64 ": %s\n", seq, strerror(errno));
            return 1;
        }
        int rc = 0;
        if (sync_mode == SYNC_FSYNC)
            rc = fsync(fd);
        else if (sync_mode == SYNC_FDATASYNC)
            rc = fdatasync(fd);
        if (rc < 0) {
            fprintf(stderr, "ackrecords: sync record %" PRIu64 ": %s\n", seq, strerror(errno));
            return 1;
        }
        /* The acknowledgement: only after the sync returned. */
        printf("%" PRIu64 "\n", seq);
        fflush(stdout);
        if (interval_us) {
            struct timespec ts = {(time_t)(interval_us / 1000000),
                                  (long)(interval_us % 1000000) * 1000};
            nanosleep(&ts, NULL);
        }
    }
    free(rec);
    return close(fd) < 0 ? 1 : 0;
}

static const char *classify(const unsigned char *rec, const unsigned char *want, size_t size,
                            uint64_t seq, int check_seed, uint64_t seed)
{
    size_t zeros = 0;
    for (size_t i = 0; i < size; i++)
        zeros += rec[i] == 0;
    if (zeros == size)
        return "zero";
    if (get_u32(rec) != MAGIC)
        return "bad-magic";
    if (get_u32(rec + 4) != size)
        return "bad-size";
    if (get_u32(rec + size - 4) != crc32_ieee(rec, size - 4))
        return "bad-checksum";
    if (get_u64(rec + 8) != seq)
        return "bad-seq";
    if (check_seed && get_u64(rec + 16) != seed)
        return "bad-seed";
    if (check_seed && memcmp(rec, want, size) != 0)
        return "bad-payload";
    return NULL;
}

static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            printf("\\u%04x", (unsigned char)*s);
        else
            putchar(*s);
    }
    putchar('"');
}

static int run_check(const char *path, size_t size, int check_seed, uint64_t seed)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) {
            printf("{\"file\": ");
            json_string(path);
            printf(", \"exists\": false, \"record_size\": %zu, \"file_size\": 0, "
                   "\"highest_contiguous\": 0, \"valid\": 0, \"invalid_count\": 0, \"invalid\": []}\n",
                   size);
            return 0;
        }
        fprintf(stderr, "ackrecords: open %s: %s\n", path, strerror(errno));
        return 1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        fprintf(stderr, "ackrecords: stat %s: %s\n", path, strerror(errno));
        return 1;
    }
    unsigned char *rec = malloc(size), *want = malloc(size);
    if (!rec || !want) {
        fprintf(stderr, "ackrecords: out of memory\n");
        return 1;
    }
    uint64_t contiguous = 0, valid = 0, invalid = 0;
    int gap = 0;
    printf("{\"file\": ");
    json_string(path);
    printf(", \"exists\": true, \"record_size\": %zu, \"file_size\": %lld, \"invalid\": [", size,
           (long long)st.st_size);
    for (uint64_t index = 0;; index++) {
        ssize_t got = pread(fd, rec, size, (off_t)(index * size));
        if (got < 0) {
            fprintf(stderr, "ackrecords: read %s: %s\n", path, strerror(errno));
            return 1;
        }
        if (got == 0)
            break;
        const char *reason;
        if ((size_t)got < size) {
            reason = "short";
        } else {
            fill_record(want, size, index + 1, seed);
            reason = classify(rec, want, size, index + 1, check_seed, seed);
        }
        if (!reason) {
            valid++;
            if (!gap)
                contiguous = index + 1;
            continue;
        }
        gap = 1;
        if (invalid < MAX_LISTED)
            printf("%s{\"seq\": %" PRIu64 ", \"offset\": %" PRIu64 ", \"reason\": \"%s\"}",
                   invalid ? ", " : "", index + 1, index * (uint64_t)size, reason);
        invalid++;
        if ((size_t)got < size)
            break;
    }
    printf("], \"invalid_count\": %" PRIu64 ", \"highest_contiguous\": %" PRIu64
           ", \"valid\": %" PRIu64 "}\n",
           invalid, contiguous, valid);
    free(rec);
    free(want);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    size_t size = 4096;
    uint64_t records = 0, seed = 0, interval_us = 0;
    int check = 0, check_seed = 0;
    enum sync_mode sync_mode = SYNC_FSYNC;
    const char *path = NULL;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--check")) {
            check = 1;
        } else if (!strcmp(a, "--sync") && i + 1 < argc) {
            const char *m = argv[++i];
            if (!strcmp(m, "fsync"))
                sync_mode = SYNC_FSYNC;
            else if (!strcmp(m, "fdatasync"))
                sync_mode = SYNC_FDATASYNC;
            else if (!strcmp(m, "none"))
                sync_mode = SYNC_NONE;
            else
                usage();
        } else if (!strcmp(a, "--size") && i + 1 < argc) {
            size = (size_t)parse_u64(argv[++i], "--size");
        } else if (!strcmp(a, "--records") && i + 1 < argc) {
            records = parse_u64(argv[++i], "--records");
        } else if (!strcmp(a, "--seed") && i + 1 < argc) {
            seed = parse_u64(argv[++i], "--seed");
            check_seed = 1;
        } else if (!strcmp(a, "--interval-us") && i + 1 < argc) {
            interval_us = parse_u64(argv[++i], "--interval-us");
        } else if (a[0] == '-' || path) {
            usage();
        } else {
            path = a;
        }
    }
    if (!path)
        usage();
    if (size < 64 || size % 8 || size > (64u << 20)) {
        fprintf(stderr, "ackrecords: --size must be a multiple of 8 in [64, 64M], not %zu\n", size);
        return 2;
    }
    crc_init();
    if (check)
        return run_check(path, size, check_seed, seed);
    return run_writer(path, size, records, seed, sync_mode, interval_us);
}
