#!/usr/bin/env bash
# nbd-clients.sh: rawblockd against real NBD clients that nobody here wrote.
#
#   hack/nbd-clients.sh [DEVICE]
#
# DEVICE is what rawblockd stores its objects on (it is FORMATTED); by
# default a 1 GiB regular file in a temporary directory. The checks:
#   1. nbdinfo --list shows every export with its size;
#   2. fio --ioengine=nbd randwrite + verify=crc32c, 4k and 1M, several jobs;
#   3. qemu-img convert of an image into an export and back: byte-identical;
#   4. (root only) nbdfuse + loop device + mkfs.ext4 + mount, a tree of
#      files, umount, fsck.ext4 -fn clean; restart rawblockd, mount again,
#      every file intact;
#   5. kill -9 rawblockd in the middle of a fio write+verify run; restart;
#      data the client had flushed before is intact.
# Needs fio (with the nbd engine), nbdinfo/nbdfuse (libnbd-bin), qemu-img
# (qemu-utils), fusermount3 (fuse3): hack/install-deps.sh installs them.
# Environment: RAWBLOCKD (a prebuilt binary; default: go build it).
set -euo pipefail
cd "$(dirname "$0")/.."

prog=${0##*/}
say() { printf '%s: %s\n' "$prog" "$*"; }
die() {
	printf '%s: FAIL: %s\n' "$prog" "$*" >&2
	exit 1
}
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found (run hack/install-deps.sh)"; }
for c in fio nbdinfo qemu-img python3 cmp; do need "$c"; done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"

work=$(mktemp -d "${TMPDIR:-/tmp}/rawblock-nbd.XXXXXX")
sock=$work/nbd.sock
log=$work/rawblockd.log
daemon=""
fusepid=""
fusedir=""
loopdev=""
mnt=""

stop_fuse() {
	[ -n "$fusedir" ] || return 0
	if mountpoint -q "$fusedir"; then fusermount3 -u "$fusedir" 2>/dev/null || umount -l "$fusedir"; fi
	if [ -n "$fusepid" ]; then wait "$fusepid" 2>/dev/null || true; fi
	fusepid=""
}
cleanup() {
	local rc=$?
	set +e
	if [ -n "$mnt" ] && mountpoint -q "$mnt"; then umount "$mnt"; fi
	if [ -n "$loopdev" ]; then losetup -d "$loopdev"; fi
	stop_fuse
	stop_daemon TERM
	if [ $rc -ne 0 ] && [ -f "$log" ]; then
		echo "--- rawblockd log (last 40 lines)" >&2
		tail -n 40 "$log" >&2
	fi
	rm -rf "$work"
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${RAWBLOCKD:-}" ]; then
	bin=$RAWBLOCKD
else
	bin=$work/rawblockd
	go build -o "$bin" ./cmd/rawblockd
fi

dev=${1:-$work/device.img}
sizeargs=()
[ -n "${1:-}" ] || sizeargs=(--size 1G)

# The exports and their sizes.
declare -A exports=([fio]=256M [img]=64M [fs]=256M [crash]=128M)
export_args=()
for e in "${!exports[@]}"; do export_args+=(--export "$e=${exports[$e]}"); done

start_daemon() {
	"$bin" --device "$dev" --socket "$sock" --cache 256M "$@" >>"$log" 2>&1 &
	daemon=$!
	local i
	for i in $(seq 1 200); do
		if nbdinfo --list "nbd+unix://?socket=$sock" >/dev/null 2>&1; then return 0; fi
		kill -0 "$daemon" 2>/dev/null || die "rawblockd exited at start (see its log)"
		sleep 0.05
	done
	die "rawblockd did not answer within 10 s"
}

stop_daemon() {
	local sig=${1:-TERM}
	[ -n "$daemon" ] || return 0
	kill "-$sig" "$daemon" 2>/dev/null || true
	local rc=0
	wait "$daemon" || rc=$?
	daemon=""
	if [ "$sig" = TERM ] && [ $rc -ne 0 ]; then
		die "rawblockd exited with status $rc after SIGTERM"
	fi
	return 0
}

uri() { echo "nbd+unix:///$1?socket=$sock"; }

t0=$SECONDS
start_daemon --format "${sizeargs[@]}" "${export_args[@]}"
say "rawblockd up on $dev ($(stat -c %s "$dev" 2>/dev/null || echo '?') bytes)"

# 1. nbdinfo --list: every export, with its size.
nbdinfo --list --json "nbd+unix://?socket=$sock" >"$work/list.json"
python3 - "$work/list.json" "$(for e in "${!exports[@]}"; do echo "$e=${exports[$e]}"; done)" <<'EOF' || die "nbdinfo --list does not match the exports"
import json, sys
units = {"K": 10, "M": 20, "G": 30}
want = {}
for line in sys.argv[2].split():
    name, size = line.split("=")
    want[name] = int(size[:-1]) << units[size[-1]]
got = {e["export-name"]: e["export-size"] for e in json.load(open(sys.argv[1]))["exports"]}
if got != want:
    print(f"nbdinfo --list: got {got}, want {want}", file=sys.stderr)
    sys.exit(1)
EOF
say "1. nbdinfo --list: ${#exports[@]} exports with the right sizes"

# 2. fio randwrite + verify, 4k and 1M, several jobs on disjoint regions.
fio_verify() {
	local bs=$1 jobs=$2 region=$3
	fio --name="verify-$bs" --ioengine=nbd --verify_state_save=0 --uri="$(uri fio)" \
		--rw=randwrite --bs="$bs" --iodepth=16 --numjobs="$jobs" \
		--size="$region" --offset_increment="$region" \
		--verify=crc32c --do_verify=1 --verify_fatal=1 \
		--group_reporting --output-format=terse --terse-version=3 >"$work/fio-$bs.out" 2>&1 ||
		{ cat "$work/fio-$bs.out" >&2; die "fio randwrite+verify $bs failed"; }
	# Terse v3 lines start with "3;"; field 5 is the error number.
	grep -q '^3;' "$work/fio-$bs.out" || die "fio $bs printed no result"
	awk -F';' '/^3;/ && $5 != 0 { bad = 1 } END { exit bad }' "$work/fio-$bs.out" || die "fio $bs reported errors"
}
fio_verify 4k 4 32M
fio_verify 1M 2 64M
say "2. fio randwrite + crc32c verify: 4k x4 jobs, 1M x2 jobs, no error"

# 3. qemu-img convert into an export and back: byte-identical.
python3 - "$work/src.img" <<'EOF'
import os, random, sys
random.seed(42)
size = 64 << 20
with open(sys.argv[1], "wb") as f:
    f.truncate(size)
    # Data runs separated by holes, some unaligned.
    off = 0
    while off < size:
        off += random.randrange(0, 1 << 20) // 512 * 512 + random.randrange(0, 3) * 100
        n = min(random.randrange(1, 2 << 20), size - off)
        if n <= 0:
            break
        f.seek(off)
        f.write(os.urandom(n))
        off += n
EOF
qemu-img convert -n -f raw -O raw "$work/src.img" "$(uri img)" || die "qemu-img convert into the export failed"
qemu-img convert -f raw -O raw "$(uri img)" "$work/back.img" || die "qemu-img convert out of the export failed"
cmp "$work/src.img" "$work/back.img" || die "qemu-img round trip differs"
rm -f "$work/back.img"
say "3. qemu-img convert in and out: byte-identical (64 MiB)"

# 4. ext4 on nbdfuse on a loop device, across a daemon restart.
start_fuse() {
	rm -f "$work/fuse.pid"
	nbdfuse -P "$work/fuse.pid" "$fusedir" "$(uri fs)" &
	fusepid=$!
	local i
	for i in $(seq 1 200); do
		[ -s "$work/fuse.pid" ] && [ -e "$fusedir/nbd" ] && return 0
		kill -0 "$fusepid" 2>/dev/null || die "nbdfuse exited"
		sleep 0.05
	done
	die "nbdfuse did not come up"
}
mount_fs() {
	start_fuse
	loopdev=$(losetup --find --show "$fusedir/nbd")
	[ -z "${1:-}" ] || mkfs.ext4 -q -F "$loopdev"
	mount "$loopdev" "$mnt"
}
umount_fs() {
	umount "$mnt"
	fsck.ext4 -fn "$loopdev" >"$work/fsck.out" 2>&1 || { cat "$work/fsck.out" >&2; die "fsck.ext4 -fn found problems"; }
	losetup -d "$loopdev"
	loopdev=""
	stop_fuse
}

if [ "$(id -u)" -ne 0 ]; then
	say "4. skipped: the nbdfuse + loop + ext4 check needs root"
elif ! command -v nbdfuse >/dev/null || ! command -v fusermount3 >/dev/null || [ ! -e /dev/fuse ]; then
	say "4. skipped: nbdfuse, fusermount3 or /dev/fuse missing"
else
	need mkfs.ext4
	fusedir=$work/fuse
	mnt=$work/mnt
	mkdir -p "$fusedir" "$mnt"
	mount_fs mkfs
	python3 - "$mnt" <<'EOF'
import os, random, sys
random.seed(7)
root = sys.argv[1]
for d in range(8):
    for s in range(4):
        p = os.path.join(root, f"d{d}", f"s{s}")
        os.makedirs(p, exist_ok=True)
        for f in range(6):
            n = random.choice([0, 1, 100, 4095, 4096, 70000, 1 << 20, 3 << 20])
            with open(os.path.join(p, f"f{f}"), "wb") as fh:
                fh.write(os.urandom(n))
os.symlink("d0/s0/f1", os.path.join(root, "link"))
EOF
	(cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$work/tree.sum"
	nfiles=$(wc -l <"$work/tree.sum")
	umount_fs
	stop_daemon TERM
	start_daemon
	mount_fs
	(cd "$mnt" && sha256sum --quiet -c "$work/tree.sum") || die "files differ after the restart"
	[ "$(readlink "$mnt/link")" = d0/s0/f1 ] || die "symlink lost"
	umount_fs
	say "4. ext4 on nbdfuse: $nfiles files, fsck clean, intact after a rawblockd restart"
fi

# 5. kill -9 in the middle of a fio write+verify run.
crash_job=(--ioengine=nbd --verify_state_save=0 --uri="$(uri crash)" --bs=64k --iodepth=8 --verify=crc32c --verify_fatal=1 --randrepeat=1)
# Region A [0, 32M): written and flushed (fio's end_fsync is NBD_CMD_FLUSH).
fio --name=flushed "${crash_job[@]}" --rw=randwrite --size=32M --end_fsync=1 --do_verify=0 \
	>"$work/fio-a.out" 2>&1 || { cat "$work/fio-a.out" >&2; die "fio write of the flushed region failed"; }
# Region B [32M, 128M): a write+verify run, killed with rawblockd.
fio --name=killed --ioengine=nbd --verify_state_save=0 --uri="$(uri crash)" --bs=4k --iodepth=16 --rw=randwrite \
	--offset=32M --size=96M --verify=crc32c --time_based --runtime=60 >"$work/fio-b.out" 2>&1 &
fiopid=$!
sleep 2
kill -0 "$fiopid" 2>/dev/null || { cat "$work/fio-b.out" >&2; die "fio stopped before the kill"; }
stop_daemon KILL
wait "$fiopid" 2>/dev/null || true
start_daemon
fio --name=flushed "${crash_job[@]}" --rw=randwrite --size=32M --verify_only \
	>"$work/fio-v.out" 2>&1 || { cat "$work/fio-v.out" >&2; die "flushed data damaged by kill -9"; }
# The killed region is readable and writable again.
fio --name=after --ioengine=nbd --verify_state_save=0 --uri="$(uri crash)" --bs=1M --iodepth=4 --rw=write \
	--offset=32M --size=96M --verify=crc32c --verify_fatal=1 >"$work/fio-c.out" 2>&1 ||
	{ cat "$work/fio-c.out" >&2; die "write+verify after the crash failed"; }
say "5. kill -9 mid fio run: flushed data intact after restart; the export works"

stop_daemon TERM
say "all real-client checks passed in $((SECONDS - t0)) s"
