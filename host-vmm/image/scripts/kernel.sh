#!/usr/bin/env bash
# Step: the guest kernel, from Debian's linux-source package, with Rust.
# Inputs:
#   TANDEM_KERNEL_PACKAGE, TANDEM_KERNEL_PACKAGE_VERSION  the pinned source package
#   TANDEM_KERNEL_FRAGMENT   the config fragment kept in guest-linux/kconfig
#   TANDEM_BINDGEN_DIR       output of the bindgen step
#   TANDEM_LLVM_SUFFIX       e.g. -19
# Output: $TANDEM_STEP_OUT/linux (a built tree, kept for out-of-tree modules),
#         $TANDEM_STEP_OUT/bzImage
source "$(dirname "$0")/lib.sh"
for c in clang lld llvm-ar; do require_cmd "$c$TANDEM_LLVM_SUFFIX" "${c%-ar}$TANDEM_LLVM_SUFFIX"; done
require_cmd flex flex; require_cmd bison bison; require_cmd bc bc
require_cmd rustc "rustup (the Rust toolchain)"
export PATH="$TANDEM_BINDGEN_DIR/bin:$PATH"
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm${TANDEM_LLVM_SUFFIX}/lib}"

private_apt_update
cd "$TANDEM_STEP_WORK"
log "apt: downloading $TANDEM_KERNEL_PACKAGE=$TANDEM_KERNEL_PACKAGE_VERSION"
private_apt download "$TANDEM_KERNEL_PACKAGE=$TANDEM_KERNEL_PACKAGE_VERSION" \
  || die "cannot download $TANDEM_KERNEL_PACKAGE=$TANDEM_KERNEL_PACKAGE_VERSION (is the pinned version still in the archive?)"
dpkg -x ./*.deb pkg
tarball=$(ls pkg/usr/src/linux-source-*.tar.* | head -n 1)
[ -n "$tarball" ] || die "no kernel tarball in the package"
log "unpacking $(basename "$tarball")"
mkdir -p "$TANDEM_STEP_OUT/linux"
tar -xf "$tarball" -C "$TANDEM_STEP_OUT/linux" --strip-components=1
cd "$TANDEM_STEP_OUT/linux"

mk() { make ARCH=x86_64 LLVM="$TANDEM_LLVM_SUFFIX" "$@"; }
mk rustavailable || die "the kernel does not accept this Rust toolchain (see the message above; is rust-src installed?)"
mk tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$TANDEM_KERNEL_FRAGMENT" >/dev/null
mk olddefconfig >/dev/null
# Every option the fragment asks for must have survived olddefconfig: a
# dependency we forgot would otherwise drop it silently.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qxF "$line" .config || { log "config: $line did not stick"; missing=1; } ;;
    "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}; ! grep -q "^$opt=" .config || { log "config: $opt should be unset"; missing=1; } ;;
  esac
done < "$TANDEM_KERNEL_FRAGMENT"
[ "$missing" = 0 ] || die "the kernel config fragment has options whose dependencies are missing"
log "building the kernel ($(nproc) jobs)"
mk -j"$(nproc)" 2>&1
cp arch/x86/boot/bzImage "$TANDEM_STEP_OUT/bzImage"
cp .config "$TANDEM_STEP_OUT/config"
make -s kernelrelease > "$TANDEM_STEP_OUT/release"
log "kernel $(cat "$TANDEM_STEP_OUT/release") built"
