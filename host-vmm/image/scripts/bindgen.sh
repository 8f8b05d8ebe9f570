#!/usr/bin/env bash
# Step: bindgen-cli, which the kernel's Rust support needs (>= 0.71.1;
# Debian 12 ships none new enough). Inputs:
#   TANDEM_BINDGEN_VERSION
source "$(dirname "$0")/lib.sh"
require_cmd cargo "rustup (the Rust toolchain)"
log "cargo: installing bindgen-cli $TANDEM_BINDGEN_VERSION"
cargo install bindgen-cli --version "$TANDEM_BINDGEN_VERSION" --locked \
  --root "$TANDEM_STEP_OUT" --target-dir "$TANDEM_STEP_WORK/target" 2>&1
test -x "$TANDEM_STEP_OUT/bin/bindgen" || die "bindgen was not installed"
"$TANDEM_STEP_OUT/bin/bindgen" --version
