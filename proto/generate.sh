#!/usr/bin/env bash
# Regenerates Sources/FerryWire/Generated from proto/ferry/v1/*.proto.
#
# Pinned tools, so the output is byte-identical wherever it runs:
#   protoc            3.21.12 (Debian bookworm's protobuf-compiler)
#   protoc-gen-swift  from apple/swift-protobuf 1.39.0, the version Package.swift pins
# The Swift plugin is built once into proto/.tools (git-ignored). The SwiftPM build plugin is
# deliberately not used: it compiles protoc from source on every clean build.
set -euo pipefail

PROTOC_VERSION="3.21.12"
SWIFT_PROTOBUF_VERSION="1.39.0"

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
tools="$here/.tools"
out="$root/Sources/FerryWire/Generated"

if ! command -v protoc >/dev/null; then
  echo "protoc not found: apt-get install -y protobuf-compiler" >&2
  exit 1
fi
have="$(protoc --version | awk '{print $2}')"
if [ "$have" != "$PROTOC_VERSION" ]; then
  echo "protoc $have found, $PROTOC_VERSION required for byte-identical output" >&2
  exit 1
fi

plugin="$tools/swift-protobuf-$SWIFT_PROTOBUF_VERSION/.build/release/protoc-gen-swift"
if [ ! -x "$plugin" ]; then
  mkdir -p "$tools"
  src="$tools/swift-protobuf-$SWIFT_PROTOBUF_VERSION"
  rm -rf "$src"
  git -c advice.detachedHead=false clone --quiet --depth 1 --branch "$SWIFT_PROTOBUF_VERSION" \
    https://github.com/apple/swift-protobuf.git "$src"
  swift build --package-path "$src" -c release --product protoc-gen-swift >/dev/null
fi

rm -rf "$out"
mkdir -p "$out"
cd "$here"
protoc \
  --plugin=protoc-gen-swift="$plugin" \
  --swift_out="$out" \
  --swift_opt=Visibility=Public \
  --swift_opt=FileNaming=PathToUnderscores \
  ferry/v1/*.proto
echo "generated: $(ls "$out" | tr '\n' ' ')"
