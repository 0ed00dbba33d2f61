#!/usr/bin/env bash
# Regenerates the Gateway API types in this folder from the upstream standard-channel CRDs
# with kopium, then formats them with rustfmt. Every .rs file here, mod.rs included, is
# written by this script; edit the script, not its output.
#
# Usage: src/k8s/gateway_api/generate.sh PATH
#   PATH: a checkout of https://github.com/kubernetes-sigs/gateway-api at $GATEWAY_API_TAG,
#         or its config/crd/standard folder.
#
# It downloads nothing (CI machines cannot reach GitHub): fetch the CRDs first, e.g.
#   git clone --depth 1 --branch v1.6.1 https://github.com/kubernetes-sigs/gateway-api
# It needs kopium at exactly $KOPIUM_VERSION:
#   cargo install kopium --version 0.24.1 --locked
# It is not part of CI and not a test; tests/gateway_api_types.rs checks its output.
set -euo pipefail

GATEWAY_API_TAG=v1.6.1
GATEWAY_API_COMMIT=8bb74df00e56ec8f944d48c25e6c1c9c2f6848e3
KOPIUM_VERSION=0.24.1
# No JSON schema (no schemars derives): we read these objects, we never install the CRDs
# from Rust. Default and PartialEq where every field allows it (--smart-derive-elision
# leaves Default off structs with a required enum field).
KOPIUM_FLAGS=(--schema=disabled --docs --derive Default --derive PartialEq --smart-derive-elision)

# module  CRD file (in config/crd/standard)  API version
KINDS=(
  "gatewayclasses          gateway.networking.k8s.io_gatewayclasses.yaml     v1"
  "gateways                gateway.networking.k8s.io_gateways.yaml           v1"
  "httproutes              gateway.networking.k8s.io_httproutes.yaml         v1"
  "grpcroutes              gateway.networking.k8s.io_grpcroutes.yaml         v1"
  "referencegrants         gateway.networking.k8s.io_referencegrants.yaml    v1beta1"
  "referencegrants_v1      gateway.networking.k8s.io_referencegrants.yaml    v1"
  "backendtlspolicies      gateway.networking.k8s.io_backendtlspolicies.yaml v1"
)

die() {
  echo "generate.sh: $*" >&2
  exit 1
}

[ $# -eq 1 ] || die "usage: $0 PATH (a gateway-api checkout at $GATEWAY_API_TAG, or its config/crd/standard folder)"
if [ -d "$1/config/crd/standard" ]; then
  crd_dir=$(cd "$1/config/crd/standard" && pwd)
elif [ -d "$1" ]; then
  crd_dir=$(cd "$1" && pwd)
else
  die "$1: not a folder"
fi
out_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

have=$(kopium --version 2>/dev/null || true)
[ "$have" = "kopium $KOPIUM_VERSION" ] ||
  die "need kopium $KOPIUM_VERSION, found '${have:-none}': cargo install kopium --version $KOPIUM_VERSION --locked"
command -v rustfmt >/dev/null || die "rustfmt not found"

# The CRDs say which release and channel they are; refuse anything else.
for entry in "${KINDS[@]}"; do
  read -r _ file _ <<<"$entry"
  [ -f "$crd_dir/$file" ] || die "$crd_dir/$file: missing"
  grep -q "gateway.networking.k8s.io/bundle-version: $GATEWAY_API_TAG\$" "$crd_dir/$file" ||
    die "$file: not bundle-version $GATEWAY_API_TAG"
  grep -q 'gateway.networking.k8s.io/channel: standard$' "$crd_dir/$file" ||
    die "$file: not the standard channel"
done

modules=()
for entry in "${KINDS[@]}"; do
  read -r module file version <<<"$entry"
  echo "generating $module.rs from $file ($version)"
  # Run from the CRD folder so the command kopium records in the file does not depend
  # on where the checkout lives.
  (cd "$crd_dir" && kopium -f "$file" --api-version "$version" "${KOPIUM_FLAGS[@]}") >"$out_dir/$module.rs.tmp"
  mv "$out_dir/$module.rs.tmp" "$out_dir/$module.rs"
  modules+=("$module")
done

{
  cat <<EOF
//! Gateway API types, generated: do not edit. \`generate.sh\` in this folder rewrites
//! every file here.
//!
//! Source: the standard-channel CRDs of Gateway API $GATEWAY_API_TAG
//! (<https://github.com/kubernetes-sigs/gateway-api>, commit
//! \`$GATEWAY_API_COMMIT\`, \`config/crd/standard/\`).
//! Generator: kopium $KOPIUM_VERSION, per kind
//! \`kopium -f gateway.networking.k8s.io_<kind>.yaml --api-version <version> ${KOPIUM_FLAGS[*]}\`,
//! then rustfmt.
//!
//! One module per kind, at version \`v1\`, except ReferenceGrant: \`v1beta1\` in
//! [\`referencegrants\`] (served by the standard channel since Gateway API v0.6) and
//! \`v1\` in [\`referencegrants_v1\`] (since v1.5).
//! kopium names the types after the CRD's field paths (\`HttpRouteRulesMatches\`).
//! Clippy is off for these modules: the CRD descriptions trip its doc lints
//! (\`doc_lazy_continuation\`, \`tabs_in_doc_comments\`), and generated code is fixed in
//! the generator, not by hand.

EOF
  for module in "${modules[@]}"; do
    cat <<EOF
#[allow(clippy::all)]
pub mod $module;
EOF
  done
} >"$out_dir/mod.rs"

files=("$out_dir/mod.rs")
for module in "${modules[@]}"; do files+=("$out_dir/$module.rs"); done
rustfmt --edition 2024 "${files[@]}"
echo "done: $out_dir"
