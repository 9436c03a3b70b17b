#!/usr/bin/env bash
# Real photos for the tests: the sample images of Debian's darknet package, extracted without installing it.
set -euo pipefail
dest="${1:-$(cd "$(dirname "$0")" && pwd)/photos}"
photos="dog eagle giraffe horses kite person scream"
[ -f "$dest/scream.jpg" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"  # apt drops to its own user to download
(cd "$tmp" && apt-get download darknet >/dev/null)
dpkg-deb -x "$tmp"/darknet_*.deb "$tmp/root"
mkdir -p "$dest"
for name in $photos; do cp "$tmp/root/usr/share/darknet/data/$name.jpg" "$dest/"; done
echo "photos in $dest"
