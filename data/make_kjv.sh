#!/usr/bin/env bash
# How data/kjv.tar.xz was made (needs Debian/Ubuntu apt sources; no root).
# The King James Version text is public domain; the Debian packages `bible-kjv`
# (the `bible` reader) and `bible-kjv-text` (its compressed data) are GPL-2+.
# Output: kjv/NN_Book.txt, one file per book (66), one verse per line "chapter:verse text".
set -euo pipefail
out_dir=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download bible-kjv bible-kjv-text
for deb in *.deb; do dpkg-deb -x "$deb" root; done
# -f toggles pretty-printing off: one line per verse, "Ge1:1 In the beginning ..."
./root/usr/bin/bible -f -p root/usr/lib gen1:1-rev22:21 > all.txt
mkdir kjv
awk '
  match($1, /^[0-9]?[A-Za-z]+/) {
    book = substr($1, 1, RLENGTH); ref = substr($1, RLENGTH + 1)
    if (book != last) { n++; last = book; file = sprintf("kjv/%02d_%s.txt", n, book) }
    $1 = ref; print > file
  }' all.txt
test "$(ls kjv | wc -l)" -eq 66
LC_ALL=C tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - kjv \
  | xz -9e > "$out_dir/kjv.tar.xz"
echo "wrote $out_dir/kjv.tar.xz"
