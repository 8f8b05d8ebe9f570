# Shared helpers for the image build steps. Sourced, never executed.
#
# The steps run under `tandem image build`, which sets:
#   TANDEM_STEP_OUT   the directory the step must fill (renamed into the cache
#                     only when the step succeeds, so a failed step leaves nothing)
#   TANDEM_STEP_WORK  a scratch directory, removed afterwards
#   TANDEM_CACHE_DIR  the cache root (for the private apt state)
# and the step's own inputs as TANDEM_* variables (see the step scripts).
set -euo pipefail

log() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The Debian mirror this machine already uses, so the project names no host:
# the first URI in the system's apt sources that serves a non-security suite.
# TANDEM_DEBIAN_MIRROR overrides it.
debian_mirror() {
  if [ -n "${TANDEM_DEBIAN_MIRROR:-}" ]; then printf '%s\n' "$TANDEM_DEBIAN_MIRROR"; return; fi
  local uri=""
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    uri=$(awk '
      /^URIs:/ { u=$2 }
      /^Suites:/ { if ($0 !~ /security/) { print u; exit } }
    ' "$f")
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $0 !~ /security/ { for (i=2;i<=NF;i++) if ($i ~ /:\/\//) { print $i; exit } }' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || die "cannot find a Debian mirror in the system's apt sources; set TANDEM_DEBIAN_MIRROR"
  printf '%s\n' "$uri"
}

# private_apt <args...>: apt-get with its own sources list and state, so the
# system's apt configuration is never touched. Suites come from
# TANDEM_APT_SUITES (space separated) and include deb-src lines.
# `private_apt --cache ...` runs apt-cache instead of apt-get.
private_apt() {
  local state="$TANDEM_CACHE_DIR/apt"
  mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
  local list="$state/sources.list"
  local mirror keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  mirror=$(debian_mirror)
  : > "$list.tmp"
  local s
  for s in ${TANDEM_APT_SUITES:-trixie-backports sid}; do
    printf 'deb [signed-by=%s] %s %s main\ndeb-src [signed-by=%s] %s %s main\n' \
      "$keyring" "$mirror" "$s" "$keyring" "$mirror" "$s" >> "$list.tmp"
  done
  mv "$list.tmp" "$list"
  local tool=apt-get
  if [ "${1:-}" = --cache ]; then tool=apt-cache; shift; fi
  "$tool" -q \
    -o Dir::Etc::SourceList="$list" \
    -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$state/lists" \
    -o Dir::Cache="$state/cache" \
    -o Debug::NoLocking=1 \
    -o APT::Sandbox::User=root \
    "$@"
}

private_apt_update() {
  # One update per build is enough; later steps reuse the lists.
  local stamp="$TANDEM_CACHE_DIR/apt/updated-$(date +%Y%m%d)"
  if [ ! -e "$stamp" ]; then
    log "apt: updating private package lists"
    private_apt update >/dev/null
    touch "$stamp"
  fi
}

# require_cmd <command> <debian package>
require_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "missing '$1' (install the Debian package '$2'; ci/deps installs everything)"
}
