// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * tandem-mmio-bench: the cost of one 32-bit MMIO read of a PCI BAR, from
 * inside the guest. Maps /sys/bus/pci/devices/<bdf>/resource<N> and times
 * batches of reads; prints the median per-read cost in nanoseconds.
 *
 *   tandem-mmio-bench <bdf> <bar> <offset> [batches] [reads-per-batch]
 *
 * Used by `ci/bench channel` as the baseline a channel round trip is
 * compared with (a register of a QEMU built-in device, same engine).
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s <bdf> <bar> <offset> [batches] [reads]\n", argv[0]);
		return 2;
	}
	char path[256];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource%s", argv[1], argv[2]);
	unsigned long offset = strtoul(argv[3], NULL, 0);
	int batches = argc > 4 ? atoi(argv[4]) : 21;
	int reads = argc > 5 ? atoi(argv[5]) : 200;
	if (batches < 1 || batches > 1000 || reads < 1 || reads > 1000000 || offset % 4) {
		fprintf(stderr, "bad arguments\n");
		return 2;
	}
	int fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0) {
		perror(path);
		return 1;
	}
	long page = sysconf(_SC_PAGESIZE);
	unsigned long base = offset & ~(unsigned long)(page - 1);
	volatile uint32_t *map = mmap(NULL, page, PROT_READ, MAP_SHARED, fd, base);
	if (map == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	volatile uint32_t *reg = map + (offset - base) / 4;
	double *per = calloc(batches, sizeof(double));
	uint32_t sink = 0;
	for (int b = 0; b < batches; b++) {
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		for (int i = 0; i < reads; i++)
			sink ^= *reg;
		clock_gettime(CLOCK_MONOTONIC, &t1);
		double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
		per[b] = ns / reads;
	}
	qsort(per, batches, sizeof(double), cmp);
	printf("mmio_read_ns_median=%.0f min=%.0f max=%.0f batches=%d reads=%d value=0x%08x\n",
	       per[batches / 2], per[0], per[batches - 1], batches, reads, (unsigned)*reg);
	(void)sink;
	return 0;
}
