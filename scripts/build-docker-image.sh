#!/usr/bin/env bash
# Build the CPU image (docker/Dockerfile) without a Docker engine or a container registry, then
# check inside it, as the image's user and outside /app, that lorafit finds everything it ships.
#
#   scripts/build-docker-image.sh [--worktree] [--no-demo] [--rebuild] [--save FILE]
#
#   --worktree   build the working tree as it is (tracked and untracked, non-ignored files);
#                the default builds the committed tree (git archive HEAD)
#   --no-demo    skip the end-to-end check (`lorafit demo` with 2 training steps, ~8 min)
#   --rebuild    run the build even when the image was built from the same context
#   --save FILE  also write the image as a docker-archive tarball (`docker load -i FILE`)
#
# Needs root on Debian 12 (x86_64), python3 with pip, a Debian mirror and PyPI; installs buildah
# and debootstrap with apt-get when they are missing.
# How: `buildah bud --isolation chroot --storage-driver vfs`, in a storage of its own under $WORK.
# `FROM python:3.11-slim` cannot be pulled here, so a stand-in is made once with
# `debootstrap --variant=minbase bookworm`: Debian's python3.11 in a venv at /usr/local, so that
# python and pip are in /usr/local/bin and `pip install` works system-wide as in the official
# image. It is tagged docker.io/library/python:3.11-slim (where the short name resolves) and the
# build never pulls. torch: the Dockerfile's TORCH_INDEX build arg (default: the PyTorch CPU index)
# points at a local copy of that index on 127.0.0.1, made of the torch 2.13.0+cpu wheel found in
# $TORCH_WHEELS and its dependencies downloaded from PyPI; set TORCH_INDEX to use a reachable index.
# Re-runs reuse the base image, the local index, the layer cache, and the image itself when its
# build context is unchanged. Start over: rm -rf "$WORK".
#
# Environment (all optional):
#   WORK             storage, local torch index, build context, logs (default /var/tmp/lorafit-docker)
#   IMAGE            tag of the built image (default localhost/lorafit:cpu)
#   DEBIAN_MIRROR    mirror for debootstrap (default: this machine's apt mirror, else deb.debian.org)
#   TORCH_WHEELS     folder holding torch-2.13.0+cpu-cp311-cp311-*.whl (default /opt/wheels)
#   TORCH_INDEX      a reachable torch index to use instead of the local copy
#   TORCH_INDEX_PORT port of the local copy on 127.0.0.1 (default 8765)
#   CA_BUNDLE        CA bundle bind-mounted over the image's during the build's RUN steps, for pip
#                    behind a TLS-inspecting proxy (default /etc/ssl/certs/ca-certificates.crt;
#                    CA_BUNDLE= mounts none). Nothing of it stays in the image.
#   DEMO_ARGS        arguments of the demo check
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

worktree=0 demo=1 rebuild=0 save=""
while (($#)); do
  case $1 in
    --worktree) worktree=1 ;;
    --no-demo) demo=0 ;;
    --rebuild) rebuild=1 ;;
    --save) save=$(realpath -m "${2:?--save needs a file}"); shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(realpath -m "${WORK:-/var/tmp/lorafit-docker}")
IMAGE=${IMAGE:-localhost/lorafit:cpu}
BASE=docker.io/library/python:3.11-slim
TORCH_VERSION=2.13.0 # as pinned in docker/Dockerfile and pyproject.toml
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
TORCH_INDEX_PORT=${TORCH_INDEX_PORT:-8765}
CA_BUNDLE=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
DEMO_ARGS=${DEMO_ARGS:---set train.max_steps=2 --set eval.limit=2 --set eval.max_new_tokens=4 --output /tmp/demo}
BUILDAH=(buildah --root "$WORK/storage" --runroot "$WORK/runroot" --storage-driver vfs)
LOGS=$WORK/logs

[[ $(id -u) == 0 ]] || die "run as root (debootstrap and buildah's chroot isolation need it)"
[[ $(uname -m) == x86_64 ]] || die "x86_64 only (the torch CPU wheel it serves is x86_64)"
[[ -z $CA_BUNDLE || -f $CA_BUNDLE ]] || die "CA_BUNDLE=$CA_BUNDLE is not a file"
mkdir -p "$WORK" "$LOGS"
t_start=$(date +%s)

# the local index server and the working containers this run made go when it ends, however
server_pid="" containers=()
stop_server() {
  [[ -n $server_pid ]] || return 0
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}
cleanup() {
  local c
  for c in "${containers[@]}"; do
    "${BUILDAH[@]}" umount "$c" >/dev/null 2>&1 || true
    "${BUILDAH[@]}" rm "$c" >/dev/null 2>&1 || true
  done
  stop_server
}
trap cleanup EXIT

# --- tools ----------------------------------------------------------------------------------
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  say "installing ${missing[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" uidmap >"$LOGS/apt.log" 2>&1 ||
    { tail -20 "$LOGS/apt.log"; die "apt-get install failed (log: $LOGS/apt.log)"; }
fi
echo "buildah $(buildah --version | awk '{print $3}'), storage $WORK/storage (vfs)"

# --- the base image: a stand-in for python:3.11-slim ------------------------------------------
debian_mirror() { # the first non-security Debian mirror apt uses here
  local m
  m=$(grep -hsoE '^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources |
    grep -v security | head -1 | grep -oE 'https?://[^[:space:]]+' || true)
  echo "${m:-http://deb.debian.org/debian}"
}

if "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  say "base $BASE: reusing the local stand-in"
else
  MIRROR=${DEBIAN_MIRROR:-$(debian_mirror)}
  say "base $BASE: debootstrap --variant=minbase bookworm from $MIRROR (~1 min)"
  t0=$(date +%s)
  "${BUILDAH[@]}" rm python-base-work >/dev/null 2>&1 || true
  ctr=$("${BUILDAH[@]}" from --name python-base-work scratch)
  containers+=("$ctr")
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,netbase \
    bookworm "$mnt" "$MIRROR" >"$LOGS/debootstrap.log" 2>&1 ||
    { tail -20 "$LOGS/debootstrap.log"; die "debootstrap failed (log: $LOGS/debootstrap.log)"; }
  # python and pip in /usr/local/bin, packages in /usr/local/lib/python3.11/site-packages, and
  # `pip install` allowed system-wide (Debian's own /usr/bin/python3 stays EXTERNALLY-MANAGED)
  chroot "$mnt" /usr/bin/python3 -m venv /usr/local
  py_version=$(chroot "$mnt" /usr/local/bin/python -c 'import platform; print(platform.python_version())')
  # no apt lists, logs or this machine's network files in the image
  rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/archives/*.deb "$mnt"/var/log/*.log
  : >"$mnt/etc/resolv.conf"
  : >"$mnt/etc/hostname"
  printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$mnt/etc/hosts"
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  "${BUILDAH[@]}" config \
    --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --env PYTHON_VERSION="$py_version" --cmd python3 \
    --label org.opencontainers.image.description="local stand-in for python:3.11-slim (debootstrap bookworm minbase)" \
    "$ctr"
  "${BUILDAH[@]}" commit --quiet --rm --format docker "$ctr" "$BASE" >/dev/null
  containers=()
  echo "made $BASE (Python $py_version) in $(($(date +%s) - t0)) s"
fi

# --- the build context ------------------------------------------------------------------------
ctx=$WORK/context
rm -rf "$ctx" && mkdir -p "$ctx"
if ((worktree)); then
  say "context: the working tree of $REPO"
  git -C "$REPO" ls-files -z --cached --others --exclude-standard |
    tar -c -C "$REPO" --null -T - --ignore-failed-read 2>/dev/null | tar -x -C "$ctx"
else
  say "context: the committed tree of $REPO ($(git -C "$REPO" rev-parse --short HEAD))"
  git -C "$REPO" archive HEAD | tar -x -C "$ctx"
  [[ -z $(git -C "$REPO" status --porcelain -- docker pyproject.toml README.md src) ]] ||
    echo "note: docker/, pyproject.toml, README.md or src/ have uncommitted changes, not built (--worktree builds them)"
fi
grep -q '^ARG TORCH_INDEX' "$ctx/docker/Dockerfile" ||
  die "docker/Dockerfile has no 'ARG TORCH_INDEX': its torch would come from download.pytorch.org"

if [[ -n ${TORCH_INDEX:-} ]]; then torch_index=$TORCH_INDEX; else
  torch_index=http://127.0.0.1:$TORCH_INDEX_PORT/simple/
fi
# what the image is built from: the Dockerfile and what its COPY/ADD lines name (the whole
# context for a line in JSON form, continued or with a wildcard), by content; the base; torch
mapfile -t used < <(awk 'toupper($1) ~ /^(COPY|ADD)$/ {
  if ($0 ~ /[][*?]/ || $NF == "\\") { print "."; next }
  for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' "$ctx/docker/Dockerfile")
build_key=$({
  tar -c -C "$ctx" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    docker/Dockerfile "${used[@]}" | sha256sum
  "${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$BASE"
  echo "$torch_index $CA_BUNDLE"
} | sha256sum | cut -c1-16)
stamp=$WORK/built.${IMAGE//[^A-Za-z0-9._-]/_}
image_id=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)
if ((!rebuild)) && [[ -n $image_id && "$(cat "$stamp" 2>/dev/null)" == "$build_key $image_id" ]]; then
  say "$IMAGE is up to date with this context (--rebuild builds it anyway)"
  t_build=0
else
  # --- the torch index ------------------------------------------------------------------------
  if [[ -n ${TORCH_INDEX:-} ]]; then
    say "torch from TORCH_INDEX=$TORCH_INDEX"
  else
    idx=$WORK/torch-index
    if [[ -e $idx/.complete ]]; then
      say "local torch index: reusing $idx"
    else
      wheel=$(compgen -G "$TORCH_WHEELS/torch-$TORCH_VERSION+cpu-cp311-cp311-*x86_64.whl" | head -1 || true)
      [[ -n $wheel ]] || die "no torch-$TORCH_VERSION+cpu cp311 wheel in $TORCH_WHEELS: set TORCH_WHEELS to its folder, or TORCH_INDEX to a reachable index (https://download.pytorch.org/whl/cpu)"
      say "local torch index: $(basename "$wheel") and its dependencies from PyPI"
      rm -rf "$idx" && mkdir -p "$idx/files"
      cp "$wheel" "$idx/files/"
      # torch's dependencies, as wheels for the image's Python (the CPU index carries them too)
      python3 -m pip download --disable-pip-version-check --no-cache-dir \
        --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --dest "$idx/files" --find-links "$idx/files" \
        "torch==$TORCH_VERSION+cpu" >"$LOGS/pip-download.log" 2>&1 ||
        { tail -20 "$LOGS/pip-download.log"; die "pip download failed (log: $LOGS/pip-download.log)"; }
      # a PEP 503 simple index over those files
      python3 - "$idx" <<'EOF'
import hashlib, html, re, sys
from pathlib import Path

idx = Path(sys.argv[1])
projects = {}
for f in sorted((idx / "files").glob("*.whl")):
    projects.setdefault(re.sub(r"[-_.]+", "-", f.name.split("-")[0]).lower(), []).append(f)
for name, files in projects.items():
    (idx / "simple" / name).mkdir(parents=True, exist_ok=True)
    links = "".join(
        f'<a href="../../files/{html.escape(f.name)}#sha256='
        f'{hashlib.sha256(f.read_bytes()).hexdigest()}">{html.escape(f.name)}</a><br>\n'
        for f in files
    )
    (idx / "simple" / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
root = "".join(f'<a href="{n}/">{n}</a><br>\n' for n in sorted(projects))
(idx / "simple" / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{root}</body></html>\n")
print(f"{len(projects)} projects: {', '.join(sorted(projects))}")
EOF
      touch "$idx/.complete"
    fi
    python3 -m http.server "$TORCH_INDEX_PORT" --bind 127.0.0.1 --directory "$idx" \
      >"$LOGS/torch-index.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 50); do
      python3 -c "import urllib.request as u; u.urlopen('${torch_index}torch/', timeout=1)" 2>/dev/null && break
      kill -0 "$server_pid" 2>/dev/null ||
        die "the local index did not start (port $TORCH_INDEX_PORT taken? set TORCH_INDEX_PORT); log: $LOGS/torch-index.log"
      sleep 0.2
    done
    echo "serving $torch_index (pid $server_pid, until the build ends)"
  fi

  # --- build --------------------------------------------------------------------------------
  say "buildah bud -f docker/Dockerfile -t $IMAGE (first time ~8 min, mostly pip; log: $LOGS/build.log)"
  t0=$(date +%s)
  # chroot isolation runs RUN steps in this machine's network, so they reach 127.0.0.1
  bud_args=(--isolation chroot --network host --pull=never --layers --force-rm --format docker)
  bud_args+=(--build-arg "TORCH_INDEX=$torch_index")
  # the stand-in's pip (Debian's) trusts /etc/ssl/certs/ca-certificates.crt: this machine's
  # bundle there, for the RUN steps only, gets it through a TLS-inspecting proxy
  [[ -z $CA_BUNDLE ]] || bud_args+=(--volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
  if ! "${BUILDAH[@]}" bud "${bud_args[@]}" -f docker/Dockerfile -t "$IMAGE" "$ctx" \
    >"$LOGS/build.log" 2>&1; then
    tail -30 "$LOGS/build.log"
    die "the build failed (log: $LOGS/build.log)"
  fi
  stop_server
  t_build=$(($(date +%s) - t0))
  grep -E '^STEP [0-9]+/[0-9]+' "$LOGS/build.log" | cut -c1-100 || true
  echo "$build_key $("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$IMAGE")" >"$stamp"
  echo "built $IMAGE in $t_build s ($(grep -c -- '--> Using cache' "$LOGS/build.log" || true) steps from the layer cache)"
fi
size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE" | head -1)
echo "image size: $size"

# --- checks inside the image --------------------------------------------------------------------
say "checks in a container of $IMAGE: its user, in /tmp, HF_HUB_OFFLINE=1 (logs: $LOGS/check-*.log)"
"${BUILDAH[@]}" rm lorafit-check >/dev/null 2>&1 || true
ctr=$("${BUILDAH[@]}" from --pull=never --name lorafit-check "$IMAGE")
containers+=("$ctr")
failed=() summary=()
check() { # check NAME N CMD...: run CMD in the container, show its last N lines (+N: first N)
  local name=$1 lines=$2 t0 rc=0 log=$LOGS/check-$1.log
  shift 2
  printf '\n--- %s: %s\n' "$name" "${*%%$'\n'*}"
  t0=$(date +%s)
  # chroot isolation cannot take the network away (--network none); the hub is offline at least
  "${BUILDAH[@]}" run --isolation chroot --workingdir /tmp --env HF_HUB_OFFLINE=1 "$ctr" -- "$@" \
    >"$log" 2>&1 || rc=$?
  if [[ $lines == +* ]]; then head -n "${lines#+}" "$log"; else tail -n "$lines" "$log"; fi
  summary+=("$(printf '%-8s %-4s %4d s' "$name" "$( ((rc)) && echo FAIL || echo ok)" $(($(date +%s) - t0)))")
  ((rc == 0)) || failed+=("$name (exit $rc)")
}
# shellcheck disable=SC2016 # expanded in the container
check user 2 sh -c 'id; echo "cwd $PWD, LORAFIT_HOME=$LORAFIT_HOME"; [ "$(id -u)" != 0 ]'
check package 12 python -c 'import lorafit  # installed, with the data it ships
import importlib.resources as r
print("lorafit", lorafit.__file__)
res = r.files("lorafit") / "resources"
for d in sorted(res.iterdir(), key=lambda p: p.name):
    print(" ", d.name, sorted(p.name for p in d.iterdir()) if d.is_dir() else "")
assert not lorafit.__file__.startswith("/app/"), "lorafit imported from the source tree"
for f in ("presets/demo.yaml", "glossaries/aviation.yaml", "probes/general.jsonl", "replay/general.jsonl"):
    assert (res / f).is_file(), f"not shipped: {f}"'
check help +12 lorafit --help
check doctor 20 lorafit doctor
check init 8 sh -c 'lorafit init /tmp/p && ls -l /tmp/p'
check data 6 sh -c 'lorafit data generate lorafit:glossaries/aviation.yaml --out /tmp/d && wc -l /tmp/d/*'
if ((demo)); then
  # shellcheck disable=SC2086 # DEMO_ARGS is a list of words
  check demo 20 lorafit demo $DEMO_ARGS
  grep -E '^[0-9]/[0-9] |took [0-9]' "$LOGS/check-demo.log" || true
fi

if [[ -n $save ]]; then
  say "saving $IMAGE to $save (docker-archive)"
  "${BUILDAH[@]}" push --quiet "$IMAGE" "docker-archive:$save:${IMAGE#localhost/}"
  ls -lh "$save"
fi

say "summary"
printf '%s\n' "${summary[@]}"
echo "image $IMAGE: $size; build $t_build s; total $(($(date +%s) - t_start)) s"
echo "it is in buildah's storage $WORK/storage: buildah --root $WORK/storage --storage-driver vfs images"
if ((${#failed[@]})); then die "failed checks: ${failed[*]}"; fi
echo "all checks passed"
