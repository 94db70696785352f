#!/usr/bin/env bash
# install-deps.sh: install the tools rawblock's tests and benchmarks use
# (fio, mkfs.xfs, mkfs.ext4, losetup/fallocate, python3, and the NBD clients
# and peer server rawblockd is tested and measured with: nbdinfo/nbdfuse,
# nbdkit, qemu-img, fusermount3) from Debian packages.
# Idempotent: a package is installed only when its command is missing, and
# apt-get update runs at most once per invocation.
set -euo pipefail

# command -> Debian package that provides it
declare -A want=(
	[fio]=fio
	[mkfs.xfs]=xfsprogs
	[mkfs.ext4]=e2fsprogs
	[losetup]=util-linux
	[fallocate]=util-linux
	[python3]=python3
	[nbdinfo]=libnbd-bin
	[nbdfuse]=libnbd-bin
	[nbdkit]=nbdkit
	[qemu-img]=qemu-utils
	[fusermount3]=fuse3
)

missing=()
for cmd in "${!want[@]}"; do
	if ! command -v "$cmd" >/dev/null 2>&1; then
		pkg=${want[$cmd]}
		# de-duplicate (losetup and fallocate share util-linux)
		case " ${missing[*]-} " in
		*" $pkg "*) ;;
		*) missing+=("$pkg") ;;
		esac
	fi
done

if [ ${#missing[@]} -eq 0 ]; then
	echo "install-deps: all tools present"
	exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
	echo "install-deps: missing packages ${missing[*]} and apt-get is not available; install them by hand" >&2
	exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
	if command -v sudo >/dev/null 2>&1; then
		sudo=(sudo)
	else
		echo "install-deps: need root (or sudo) to install ${missing[*]}" >&2
		exit 1
	fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# Verify: a package that installed but did not provide the command is an error.
for cmd in "${!want[@]}"; do
	if ! command -v "$cmd" >/dev/null 2>&1; then
		echo "install-deps: $cmd still missing after installing ${want[$cmd]}" >&2
		exit 1
	fi
done
echo "install-deps: done"
