// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * tandem-nvme-hostile: what a hostile guest can do to an assigned NVMe
 * function, from inside the guest, as root.
 *
 *   tandem-nvme-hostile <victim-bdf> <bound-bdf>
 *
 * <victim-bdf> is a function no driver is bound to: the destructive tests
 * run there (raw config-space writes, BAR overlap, MSI-X spoofing, VF
 * enable from a VF, an FLR storm, and a home-made driver that points
 * commands at memory the device may not reach). <bound-bdf> is in use by
 * the guest's nvme driver: it only gets doorbell writes to queues that do
 * not exist, which must leave the driver's own I/O alone.
 *
 *   tandem-nvme-hostile pf-vfs <pf-bdf> <count> <sriov-offset>
 *
 * is what a guest that owns the PF does to enable <count> VFs (0:
 * disable) through the SR-IOV capability, written raw: VF Enable off,
 * NumVFs, then VF Enable and VF MSE on. It prints what the capability
 * reads back; the host's policy decides what that is. QEMU's vfio drops
 * the SR-IOV capability from the extended capability chain it shows the
 * guest (so the kernel's sriov_numvfs does not exist for the PF), but
 * the registers are still there and reach the device: the tool writes
 * at <sriov-offset> when the chain does not list the capability.
 *
 * Each test prints one line "TEST <name> <outcome> <detail>"; outcome is
 * what the guest observed ("ok" when it matched what hardware does). The
 * host side checks the device server's audit log and counters; this tool
 * cannot see those, by design.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int failures;

static void result(const char *name, int ok, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#include <stdarg.h>
static void result(const char *name, int ok, const char *fmt, ...)
{
	va_list ap;
	printf("TEST %s %s ", name, ok ? "ok" : "FAILED");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (!ok)
		failures++;
}

static int cfg_open(const char *bdf)
{
	char p[256];
	snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/config", bdf);
	int fd = open(p, O_RDWR);
	if (fd < 0) {
		perror(p);
		exit(2);
	}
	return fd;
}

static uint32_t cfg_read(int fd, off_t off, int width)
{
	uint32_t v = 0;
	if (pread(fd, &v, width, off) != width)
		return 0xffffffff;
	return v;
}

static void cfg_write(int fd, off_t off, uint32_t v, int width)
{
	if (pwrite(fd, &v, width, off) != width)
		fprintf(stderr, "config write at %#lx: %s\n", (long)off, strerror(errno));
}

static volatile uint32_t *bar_map(const char *bdf, int bar, size_t len)
{
	char p[256];
	snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/resource%d", bdf, bar);
	int fd = open(p, O_RDWR | O_SYNC);
	if (fd < 0) {
		perror(p);
		exit(2);
	}
	void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (m == MAP_FAILED) {
		perror("mmap BAR");
		exit(2);
	}
	return m;
}

static int find_cap(int fd, uint8_t id)
{
	int at = cfg_read(fd, 0x34, 1);
	for (int hops = 0; at >= 0x40 && hops < 48; hops++) {
		if (cfg_read(fd, at, 1) == id)
			return at;
		at = cfg_read(fd, at + 1, 1);
	}
	return -1;
}

/* An extended capability's offset, or -1. */
static int find_ext_cap(int fd, uint16_t id)
{
	int at = 0x100;
	for (int hops = 0; at >= 0x100 && at < 0x1000 && hops < 480; hops++) {
		uint32_t h = cfg_read(fd, at, 4);
		if (h == 0 || h == 0xffffffff)
			return -1;
		if ((h & 0xffff) == id)
			return at;
		at = (h >> 20) & 0xffc;
	}
	return -1;
}

static void sleep_ms(int ms)
{
	struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&t, NULL);
}

/* A physically contiguous page of our own memory and its guest address. */
struct page {
	volatile uint8_t *va;
	uint64_t pa;
};

static struct page page_alloc(void)
{
	struct page pg;
	void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, -1, 0);
	if (m == MAP_FAILED) {
		perror("mmap page");
		exit(2);
	}
	memset(m, 0, 4096);
	int fd = open("/proc/self/pagemap", O_RDONLY);
	uint64_t e = 0;
	if (fd < 0 || pread(fd, &e, 8, ((uintptr_t)m / 4096) * 8) != 8 || !(e >> 63)) {
		fprintf(stderr, "pagemap: no physical address\n");
		exit(2);
	}
	close(fd);
	pg.va = m;
	pg.pa = (e & ((1ULL << 55) - 1)) * 4096;
	return pg;
}

static void test_config_space(const char *victim)
{
	int fd = cfg_open(victim);
	uint32_t id = cfg_read(fd, 0, 4);
	cfg_write(fd, 0, 0xdeadbeef, 4);
	uint32_t after = cfg_read(fd, 0, 4);
	result("ro-identity", after == id, "vendor/device %#x after writing 0xdeadbeef (was %#x)", after, id);

	/* Capability pointers and MSI-X table location are read-only. */
	int msix = find_cap(fd, 0x11);
	uint32_t table = cfg_read(fd, msix + 4, 4);
	cfg_write(fd, msix + 4, 0x12345673, 4);
	result("ro-msix-table-bir", cfg_read(fd, msix + 4, 4) == table, "table offset/BIR %#x", cfg_read(fd, msix + 4, 4));

	/* BAR overlap: BAR0 moved onto BAR4, then put back. */
	uint32_t b0 = cfg_read(fd, 0x10, 4), b1 = cfg_read(fd, 0x14, 4), b4 = cfg_read(fd, 0x20, 4);
	cfg_write(fd, 0x10, (b4 & ~0xfU) | (b0 & 0xf), 4);
	cfg_write(fd, 0x14, 0, 4);
	uint32_t moved = cfg_read(fd, 0x10, 4);
	cfg_write(fd, 0x10, b0, 4);
	cfg_write(fd, 0x14, b1, 4);
	result("bar-overlap", cfg_read(fd, 0x10, 4) == b0, "BAR0 %#x -> %#x (onto BAR4 %#x) -> restored %#x; the device's verdict is in the host audit log",
	       b0, moved, b4, cfg_read(fd, 0x10, 4));

	/* BAR sizing still works after all that. */
	cfg_write(fd, 0x20, 0xffffffff, 4);
	uint32_t sz = cfg_read(fd, 0x20, 4);
	cfg_write(fd, 0x20, b4, 4);
	result("bar-sizing", (~(sz & ~0xfU) + 1) == 16384, "BAR4 size mask %#x", sz);

	/* VF enable and NumVFs written where a PF has its SR-IOV capability. */
	uint32_t ext = cfg_read(fd, 0x100, 4);
	cfg_write(fd, 0x100 + 0x10, 4, 2);
	cfg_write(fd, 0x100 + 0x08, 1, 2);
	result("vf-enable-from-vf", cfg_read(fd, 0x108, 2) == 0 && cfg_read(fd, 0x110, 2) == 0,
	       "extended header %#x, control %#x, NumVFs %#x: a VF has no SR-IOV capability", ext, cfg_read(fd, 0x108, 2),
	       cfg_read(fd, 0x110, 2));

	/* Power state D3hot and back, as a driver would. */
	int pm = find_cap(fd, 0x01);
	cfg_write(fd, pm + 4, 3, 2);
	uint32_t d3 = cfg_read(fd, pm + 4, 2) & 3;
	cfg_write(fd, pm + 4, 0, 2);
	result("power-state", d3 == 3 && (cfg_read(fd, pm + 4, 2) & 3) == 0, "D%u then D%u", d3, cfg_read(fd, pm + 4, 2) & 3);

	/* FLR storm: 50 Initiate-FLR writes back to back. */
	int pcie = find_cap(fd, 0x10);
	uint32_t devctl = cfg_read(fd, pcie + 8, 2);
	for (int i = 0; i < 50; i++)
		cfg_write(fd, pcie + 8, devctl | 0x8000, 2);
	sleep_ms(100);
	result("flr-storm", cfg_read(fd, 0, 4) == id, "50 FLRs; function still answers %#x", cfg_read(fd, 0, 4));
	close(fd);
}

static void test_msix_spoof(const char *victim)
{
	volatile uint32_t *t = bar_map(victim, 4, 16384);
	uint32_t lo = t[0], hi = t[1], data = t[2];
	t[0] = 0xdead0000;
	t[1] = 0;
	t[2] = 0x41;
	result("msi-address-spoof", 1, "entry 0 now %#x:%#x data %#x (was %#x:%#x %#x); the device signals its vector, it never writes this address",
	       t[1], t[0], t[2], hi, lo, data);
	t[0] = lo;
	t[1] = hi;
	t[2] = data;
}

static int wait_rdy(volatile uint32_t *r, int want)
{
	for (int i = 0; i < 2000; i++) {
		uint32_t csts = r[0x1c / 4];
		if ((csts & 1) == (uint32_t)want)
			return 1;
		if (csts == 0xffffffff)
			return 0;
		sleep_ms(1);
	}
	return 0;
}

/* Submits one admin command on our own queues; returns the status field. */
static int admin_cmd(volatile uint32_t *r, struct page *sq, struct page *cq, int *tail, uint8_t opcode, uint32_t cdw10,
		     uint64_t prp1)
{
	volatile uint32_t *e = (volatile uint32_t *)(sq->va + *tail * 64);
	for (int i = 0; i < 16; i++)
		e[i] = 0;
	e[0] = opcode | ((uint32_t)(0x100 + *tail) << 16);
	e[6] = (uint32_t)prp1;
	e[7] = (uint32_t)(prp1 >> 32);
	e[10] = cdw10;
	int slot = *tail;
	*tail = (*tail + 1) % 16;
	__sync_synchronize();
	r[0x1000 / 4] = *tail;
	for (int i = 0; i < 2000; i++) {
		volatile uint32_t *c = (volatile uint32_t *)(cq->va + slot * 16);
		if (c[3] & 0x10000) {
			r[0x1004 / 4] = *tail;
			return (c[3] >> 17) & 0x7fff;
		}
		sleep_ms(1);
	}
	return -1;
}

static void test_unmapped_dma(const char *victim)
{
	int fd = cfg_open(victim);
	cfg_write(fd, 0x04, cfg_read(fd, 4, 2) | 0x6, 2); /* memory + bus master */
	volatile uint32_t *r = bar_map(victim, 0, 16384);
	r[0x14 / 4] = 0;
	if (!wait_rdy(r, 0)) {
		result("unmapped-dma", 0, "controller does not reset (CSTS %#x)", r[0x1c / 4]);
		return;
	}
	struct page sq = page_alloc(), cq = page_alloc(), buf = page_alloc();
	r[0x24 / 4] = (15 << 16) | 15;
	r[0x28 / 4] = (uint32_t)sq.pa;
	r[0x2c / 4] = (uint32_t)(sq.pa >> 32);
	r[0x30 / 4] = (uint32_t)cq.pa;
	r[0x34 / 4] = (uint32_t)(cq.pa >> 32);
	r[0x14 / 4] = 1 | (6 << 16) | (4 << 20);
	if (!wait_rdy(r, 1)) {
		result("unmapped-dma", 0, "controller does not become ready (CSTS %#x)", r[0x1c / 4]);
		return;
	}
	int tail = 0;
	/* Identify into an address far above guest RAM: not mapped for DMA. */
	int st = admin_cmd(r, &sq, &cq, &tail, 0x06, 1, 0xfff00000000ULL);
	result("unmapped-dma", st == 0x4, "identify into 0xfff00000000: status %#x (data transfer error is 0x4)", st);
	/* The same command into our own page works. */
	st = admin_cmd(r, &sq, &cq, &tail, 0x06, 1, buf.pa);
	char model[41] = { 0 };
	memcpy(model, (const void *)(buf.va + 24), 40);
	result("own-memory-dma", st == 0 && strstr(model, "Tandem") != NULL, "identify into our page: status %#x model '%.20s'", st,
	       model);
	/* An unknown opcode and a bad queue id fail as the spec says. */
	st = admin_cmd(r, &sq, &cq, &tail, 0xee, 0, 0);
	result("bad-opcode", (st & 0xff) == 0x1, "status %#x (invalid opcode is 0x1)", st);
	st = admin_cmd(r, &sq, &cq, &tail, 0x01, (15 << 16) | 200, buf.pa);
	result("bad-queue-id", (st & 0x7ff) == 0x101, "create SQ 200: status %#x (invalid queue id is 0x101)", st);
	r[0x14 / 4] = 0;
	wait_rdy(r, 0);
	cfg_write(fd, 0x04, cfg_read(fd, 4, 2) & ~0x4, 2);
	close(fd);
}

static void test_doorbells(const char *bound)
{
	volatile uint32_t *r = bar_map(bound, 0, 16384);
	uint32_t csts = r[0x1c / 4];
	r[(0x1000 + 40 * 8) / 4] = 1;     /* SQ 40 tail */
	r[(0x1000 + 41 * 8 + 4) / 4] = 1; /* CQ 41 head */
	r[(0x1000 + 4 * 2 * 15) / 4] = 7; /* SQ 15 (not created) */
	sleep_ms(50);
	result("doorbell-nonexistent-queue", r[0x1c / 4] == csts && (csts & 1), "3 doorbells to absent queues; CSTS %#x -> %#x",
	       csts, r[0x1c / 4]);
}

static int pf_vfs(const char *bdf, unsigned count, int offset)
{
	int fd = cfg_open(bdf);
	int at = find_ext_cap(fd, 0x0010);
	const char *where = "listed";
	if (at < 0) {
		at = offset;
		where = "not listed";
	}
	if (at < 0x100 || at > 0x1000 - 0x40) {
		printf("PF-VFS bad SR-IOV offset %#x\n", at);
		return 1;
	}
	uint16_t ctl = cfg_read(fd, at + 0x08, 2) & ~0x0009;
	cfg_write(fd, at + 0x08, ctl, 2);
	cfg_write(fd, at + 0x10, count, 2);
	if (count)
		cfg_write(fd, at + 0x08, ctl | 0x0009, 2);
	/* SR-IOV gives a PF 100 ms before its VFs must answer. */
	sleep_ms(100);
	printf("PF-VFS control=%#x numvfs=%u total=%u at=%#x (%s in the chain)\n", cfg_read(fd, at + 0x08, 2),
	       cfg_read(fd, at + 0x10, 2), cfg_read(fd, at + 0x0e, 2), at, where);
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && strcmp(argv[1], "pf-vfs") == 0)
		return pf_vfs(argv[2], (unsigned)strtoul(argv[3], NULL, 0), (int)strtol(argv[4], NULL, 0));
	if (argc != 3) {
		fprintf(stderr, "usage: %s <victim-bdf> <bound-bdf> | pf-vfs <pf-bdf> <count> <sriov-offset>\n", argv[0]);
		return 2;
	}
	test_config_space(argv[1]);
	test_msix_spoof(argv[1]);
	test_unmapped_dma(argv[1]);
	test_doorbells(argv[2]);
	printf("hostile: %d failed\n", failures);
	return failures ? 1 : 0;
}
