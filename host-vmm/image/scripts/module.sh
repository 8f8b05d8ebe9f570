#!/usr/bin/env bash
# Step: tandem.ko, built out of tree against the guest kernel.
# Inputs:
#   TANDEM_KERNEL_TREE   the kernel step's built tree
#   TANDEM_MODULE_SRC    a directory holding guest-linux/ and shared-abi/
#                        side by side (the module includes shared-abi files)
#   TANDEM_BINDGEN_DIR, TANDEM_LLVM_SUFFIX
# Output: $TANDEM_STEP_OUT/tandem.ko
source "$(dirname "$0")/lib.sh"
export PATH="$TANDEM_BINDGEN_DIR/bin:$PATH"
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm${TANDEM_LLVM_SUFFIX}/lib}"
cp -r "$TANDEM_MODULE_SRC/." "$TANDEM_STEP_WORK/"
cd "$TANDEM_STEP_WORK/guest-linux"
log "building tandem.ko against $(cat "$TANDEM_KERNEL_TREE/include/config/kernel.release")"
make -C "$TANDEM_KERNEL_TREE" M="$PWD" LLVM="$TANDEM_LLVM_SUFFIX" modules 2>&1
test -f tandem.ko || die "the module build produced no tandem.ko"
cp tandem.ko "$TANDEM_STEP_OUT/"
log "tandem.ko: $(stat -c %s tandem.ko) bytes"
