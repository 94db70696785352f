#!/usr/bin/env bash
# loopdev.sh: create and remove loop devices to benchmark and test rawblock
# on a real block device without spare hardware.
#
#   hack/loopdev.sh up [SIZE]   create a preallocated backing file (default
#                               4G) under ${RAWBLOCK_LOOP_DIR:-/var/tmp},
#                               attach it with direct I/O, print the device
#   hack/loopdev.sh down DEV    detach DEV and remove its backing file
#
# Environment: RAWBLOCK_LOOP_DIR (backing file directory), SECTOR_SIZE
# (logical block size of the loop device, e.g. 512 or 4096).
set -euo pipefail

prog=${0##*/}

die() {
	echo "$prog: $*" >&2
	exit 1
}

usage() {
	echo "usage: $prog up [SIZE] | down DEV" >&2
	exit 2
}

need() {
	command -v "$1" >/dev/null 2>&1 || die "$1 not found (run hack/install-deps.sh)"
}

up() {
	local size=${1:-4G}
	local dir=${RAWBLOCK_LOOP_DIR:-/var/tmp}
	need losetup
	need fallocate
	[ "$(id -u)" -eq 0 ] || die "attaching a loop device needs root"
	[[ $size =~ ^[0-9]+[KMGTkmgt]?$ ]] || die "bad size '$size' (want e.g. 512M, 4G)"
	[ -d "$dir" ] || die "backing directory $dir does not exist"
	local args=(--find --show --direct-io=on)
	if [ -n "${SECTOR_SIZE:-}" ]; then
		[[ $SECTOR_SIZE =~ ^(512|1024|2048|4096)$ ]] || die "bad SECTOR_SIZE '$SECTOR_SIZE' (want 512, 1024, 2048 or 4096)"
		args+=(--sector-size "$SECTOR_SIZE")
	fi

	local file
	file=$(mktemp "$dir/rawblock-loop.XXXXXX.img") || die "cannot create a backing file in $dir"
	if ! fallocate -l "$size" "$file"; then
		rm -f "$file"
		die "fallocate -l $size $file failed (does $dir have room, and support fallocate?)"
	fi
	local dev
	if ! dev=$(losetup "${args[@]}" "$file"); then
		rm -f "$file"
		die "losetup ${args[*]} $file failed"
	fi
	# Direct I/O needs the backing file system to support O_DIRECT at the
	# loop device's sector size; losetup silently falls back to buffered
	# I/O when it cannot, which would benchmark the page cache.
	local dio
	dio=$(cat "/sys/block/${dev#/dev/}/loop/dio" 2>/dev/null || echo "?")
	if [ "$dio" != 1 ]; then
		echo "$prog: warning: $dev does not use direct I/O (loop/dio=$dio); results include the backing file's page cache" >&2
	fi
	echo "$dev"
}

down() {
	local dev=${1:-}
	[ -n "$dev" ] || usage
	need losetup
	[ -b "$dev" ] || die "$dev is not a block device"
	local name=${dev#/dev/}
	[[ $name =~ ^loop[0-9]+$ ]] || die "$dev is not a loop device"
	local file
	file=$(cat "/sys/block/$name/loop/backing_file" 2>/dev/null) || die "$dev is not attached"
	losetup --detach "$dev" || die "losetup --detach $dev failed"
	# Remove only the files this script creates.
	case "${file##*/}" in
	rawblock-loop.*.img)
		rm -f -- "$file" || die "could not remove $file"
		;;
	*)
		echo "$prog: detached $dev; left its backing file $file in place (not created by $prog)" >&2
		;;
	esac
}

case "${1:-}" in
up)
	shift
	[ $# -le 1 ] || usage
	up "$@"
	;;
down)
	shift
	[ $# -eq 1 ] || usage
	down "$1"
	;;
*) usage ;;
esac
