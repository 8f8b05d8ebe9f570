// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * tandem-ackwrite: proves that no acknowledged write is lost.
 *
 *   tandem-ackwrite write <dev> <max-blocks>   write blocks 0, 1, 2... each
 *       with O_DIRECT|O_DSYNC and print "ACK <n>" once write(2) returned
 *       for block n; stops at the first error ("ERR <n> <errno>") or at
 *       <max-blocks>.
 *   tandem-ackwrite check <dev> <n>            read blocks 0..n and check
 *       each holds what the writer put there; prints "CHECKED <n>" or the
 *       first bad block.
 *
 * Each block carries a magic, its own number and a filler derived from it,
 * so a block from elsewhere, a stale block or a torn write is caught.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BS 4096
#define MAGIC 0x54414e44454d4143ULL /* "TANDEMAC" */

static void fill(uint64_t *b, uint64_t n)
{
	b[0] = MAGIC;
	b[1] = n;
	uint64_t x = n * 0x9e3779b97f4a7c15ULL + 1;
	for (int i = 2; i < BS / 8; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		b[i] = x;
	}
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s write|check <dev> <n>\n", argv[0]);
		return 2;
	}
	long n = atol(argv[3]);
	int writing = strcmp(argv[1], "write") == 0;
	int fd = open(argv[2], (writing ? O_WRONLY | O_DSYNC : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		perror(argv[2]);
		return 2;
	}
	uint64_t *buf, *want;
	if (posix_memalign((void **)&buf, BS, BS) || posix_memalign((void **)&want, BS, BS))
		return 2;
	for (long i = 0; i < n; i++) {
		fill(want, i);
		if (writing) {
			if (pwrite(fd, want, BS, (off_t)i * BS) != BS) {
				printf("ERR %ld %d\n", i, errno);
				return 1;
			}
			printf("ACK %ld\n", i);
			fflush(stdout);
		} else {
			if (pread(fd, buf, BS, (off_t)i * BS) != BS) {
				printf("READ-ERR %ld %d\n", i, errno);
				return 1;
			}
			if (memcmp(buf, want, BS)) {
				printf("BAD %ld magic %llx number %llu\n", i, (unsigned long long)buf[0],
				       (unsigned long long)buf[1]);
				return 1;
			}
		}
	}
	printf(writing ? "WROTE %ld\n" : "CHECKED %ld\n", n);
	return 0;
}
