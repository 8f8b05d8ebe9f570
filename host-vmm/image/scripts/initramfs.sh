#!/usr/bin/env bash
# Step: the guest's initramfs: busybox, the guest tools the tests use (fio,
# sg3-utils) with their shared libraries and loader, tandem.ko, and the init
# files from guest-linux/initramfs.
# Inputs:
#   TANDEM_MODULE_KO     the built module
#   TANDEM_ROOTFS_SRC    guest-linux/initramfs
#   TANDEM_GUEST_TOOLS   space-separated host binaries to copy in
#   TANDEM_TOOLS_SRC     guest-linux/tools: small C tools built static here
# Output: $TANDEM_STEP_OUT/initramfs.cpio.zst
source "$(dirname "$0")/lib.sh"
require_cmd cpio cpio; require_cmd zstd zstd
BUSYBOX=/bin/busybox
linkage=$(ldd "$BUSYBOX" 2>&1 || true)
case "$linkage" in
  *"not a dynamic"*) ;;
  *) die "missing a static busybox at $BUSYBOX (install busybox-static)" ;;
esac

root="$TANDEM_STEP_WORK/root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,var/log,var/run,lib/modules,usr/bin,usr/sbin,etc/acpi/PWRF}
cp "$BUSYBOX" "$root/bin/busybox"
# Applet links made here, not at boot: one less thing between power-on and a shell.
for applet in $("$BUSYBOX" --list-full); do
  [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done

# copy_with_libs <binary>: the binary and every library it loads.
copy_with_libs() {
  local bin=$1 lib
  install -D -m 0755 "$bin" "$root$bin"
  for lib in $(ldd "$bin" 2>/dev/null | awk '/=> \//{print $3} $1 ~ /^\/.*ld-linux/{print $1}'); do
    [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
}
n=0
for tool in $TANDEM_GUEST_TOOLS; do
  path=$(command -v "$tool") || die "missing guest tool '$tool' on the host (ci/deps installs fio and sg3-utils)"
  copy_with_libs "$(readlink -f "$path")"
  # keep the name the tool is called by
  [ "$(readlink -f "$path")" = "$path" ] || { mkdir -p "$root$(dirname "$path")"; ln -sf "$(readlink -f "$path")" "$root$path"; }
  n=$((n + 1))
done
log "copied $n guest tools with $(find "$root/lib" "$root/usr/lib" -name '*.so*' 2>/dev/null | wc -l) libraries"

require_cmd gcc build-essential
for src in "$TANDEM_TOOLS_SRC"/*.c; do
  [ -e "$src" ] || continue
  name=tandem-$(basename "$src" .c)
  gcc -O2 -static -Wall -o "$root/usr/bin/$name" "$src" || die "cannot build $name"
  log "built $name"
done

cp "$TANDEM_MODULE_KO" "$root/lib/modules/tandem.ko"
install -m 0755 "$TANDEM_ROOTFS_SRC/rc" "$root/etc/rc"
install -m 0644 "$TANDEM_ROOTFS_SRC/inittab" "$root/etc/inittab"
install -m 0755 "$TANDEM_ROOTFS_SRC/acpi-power" "$root/etc/acpi/PWRF/00000080"
ln -sf /bin/busybox "$root/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"

( cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet ) \
  | zstd -q -T0 -12 -o "$TANDEM_STEP_OUT/initramfs.cpio.zst"
log "initramfs: $(du -sh "$root" | cut -f1) unpacked, $(stat -c %s "$TANDEM_STEP_OUT/initramfs.cpio.zst") bytes compressed"
