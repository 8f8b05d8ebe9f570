#!/usr/bin/env bash
# Step: the execution engine, QEMU with the vfio-user client, built from
# Debian's source package of a pinned version (bookworm's 7.2 has no
# vfio-user client, and newer Debian binaries need a newer glibc).
# Inputs:
#   TANDEM_QEMU_SOURCE_VERSION   e.g. 1:10.2.2+ds-1
#   TANDEM_QEMU_CONFIGURE        configure options (the cache key includes them)
#   TANDEM_MESON_VERSION         meson from PyPI (bookworm's is too old)
#   TANDEM_QEMU_PATCHES          a directory of Tandem's own patches, applied
#                                after Debian's (fixes Tandem depends on)
# Output: $TANDEM_STEP_OUT/bin/qemu-system-x86_64
source "$(dirname "$0")/lib.sh"
require_cmd ninja ninja-build; require_cmd pkg-config pkg-config; require_cmd cc build-essential
require_cmd python3 python3
pkg-config --exists glib-2.0 || die "missing glib headers (install libglib2.0-dev)"
pkg-config --exists pixman-1 || die "missing pixman headers (install libpixman-1-dev)"
pkg-config --exists libfdt || [ -e /usr/include/libfdt.h ] || die "missing libfdt headers (install libfdt-dev)"

private_apt_update
cd "$TANDEM_STEP_WORK"
log "apt: downloading the source of qemu=$TANDEM_QEMU_SOURCE_VERSION"
private_apt source --download-only "qemu=$TANDEM_QEMU_SOURCE_VERSION" >/dev/null \
  || die "cannot download qemu=$TANDEM_QEMU_SOURCE_VERSION (is the pinned version still in the archive?)"
orig=$(ls qemu_*.orig.tar.* | head -n 1)
deb=$(ls qemu_*.debian.tar.* | head -n 1)
log "unpacking $orig"
mkdir src
tar -xf "$orig" -C src --strip-components=1
tar -xf "$deb" -C src
cd src
if [ -f debian/patches/series ]; then
  n=0
  while IFS= read -r p; do
    p=${p%%#*}; p=${p## }; p=${p%% }
    [ -n "$p" ] || continue
    patch -p1 -s --forward < "debian/patches/$p" || die "Debian patch $p does not apply"
    n=$((n + 1))
  done < debian/patches/series
  log "applied $n Debian patches"
fi
for p in "$TANDEM_QEMU_PATCHES"/*.patch; do
  [ -e "$p" ] || continue
  patch -p1 -s --forward < "$p" || die "Tandem patch $(basename "$p") does not apply"
  log "applied Tandem patch $(basename "$p")"
done

log "python: meson $TANDEM_MESON_VERSION in a private venv"
python3 -m venv "$TANDEM_STEP_WORK/venv"
"$TANDEM_STEP_WORK/venv/bin/pip" install -q "meson==$TANDEM_MESON_VERSION" pycotap

mkdir build && cd build
log "configure: $TANDEM_QEMU_CONFIGURE"
# shellcheck disable=SC2086 # the options are a word list on purpose
../configure --prefix="$TANDEM_STEP_OUT" --python="$TANDEM_STEP_WORK/venv/bin/python" \
  $TANDEM_QEMU_CONFIGURE 2>&1
log "building qemu-system-x86_64 ($(nproc) jobs)"
ninja -j"$(nproc)" qemu-system-x86_64 2>&1
mkdir -p "$TANDEM_STEP_OUT/bin"
cp qemu-system-x86_64 "$TANDEM_STEP_OUT/bin/"
"$TANDEM_STEP_OUT/bin/qemu-system-x86_64" -device help | grep -q vfio-user-pci \
  || die "the engine was built without the vfio-user client"
"$TANDEM_STEP_OUT/bin/qemu-system-x86_64" --version | head -n 1
