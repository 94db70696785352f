#!/usr/bin/env bash
# vs-nbdkit.sh: rawblockd against nbdkit's file plugin on the same device,
# with the same NBD clients, alternating, and print one markdown table.
#
#   hack/vs-nbdkit.sh DEV [ROUNDS]
#
# DEV (a block device, e.g. from hack/loopdev.sh, or a regular file) is
# OVERWRITTEN: rawblockd formats it, nbdkit serves it raw. Each of ROUNDS
# rounds (default 3) runs every workload on both servers, alternating which
# goes first; the table shows medians and rawblockd/nbdkit ratios.
#
# Before the workloads, the region is written once (fio write 1M, then a
# flush) and read once in random 64k blocks, through the server measured: nbdkit's
# page cache holds the region after the write already, while rawblockd's
# cache keeps no pages of large writebacks and admits pages on random, not
# sequential, reads (engine policy). Without that pass the random reads
# would compare rawblockd's device reads with nbdkit's page cache.
#
# Workloads (fio --ioengine=nbd over a Unix socket, one job):
#   randread 4k iodepth 16           IOPS
#   randwrite 4k iodepth 16 + flush  IOPS   (fio's end_fsync is NBD_CMD_FLUSH,
#                                            and fio counts it in the runtime)
#   write 1M iodepth 8               MiB/s
#   ext4 round trip (root only): nbdfuse + loop + mkfs.ext4 + mount, copy a
#     tree of files, umount, fsck.ext4 -fn, restart the server, mount,
#     compare every file, umount: wall seconds.
#
# Environment:
#   RUNTIME         seconds per fio run (default 10)
#   SIZE            region the fio runs use (default 512M); rawblockd serves
#                   it as one export
#   FS_SIZE         ext4 size (default 1G); TREE_MB: data copied (default 256)
#   RAWBLOCKD_OPTS  rawblockd options for the fio runs (default "--cache 4G":
#                   the 512 MiB region stays under the engine's background
#                   writeback threshold, half the dirty limit, as it stays
#                   under the kernel's for nbdkit, whose page cache may use
#                   all free memory (dirty_background_ratio 10 % of 24 GiB
#                   here); with 2G the threshold, about 508 MiB, sits just
#                   under the region and every rewrite is written back)
#   RAWBLOCKD_FS_OPTS  rawblockd options for the ext4 round trip (default
#                   "--cache 256M": the engine pins its whole cache at open,
#                   and the round trip includes a restart)
#   NBDKIT_OPTS     nbdkit server options (default "--threads 16")
#   NBDKIT_PLUGIN   file plugin parameters (default "cache=default")
#   DROP_CACHES     1: drop the kernel's page cache at the restart of the
#                   ext4 round trip (default 0). nbdkit's page cache survives
#                   a restart of nbdkit, rawblockd's cache does not; with 1
#                   both servers restart cold.
#   RAWBLOCKD_ENV   environment for rawblockd (default "GOMAXPROCS=1"; "" for
#                   Go's default of one P per CPU). On this 2-CPU machine the
#                   server shares the CPUs with its client, fio, which is the
#                   bottleneck of the small-request runs; with one P the Go
#                   scheduler stops spinning idle Ps and handing goroutines
#                   between threads, and fio keeps a CPU (randwrite 4k,
#                   alternating: 144k / 152k / 155k IOPS with one P against
#                   117k / 150k / 125k with two). The flag is shown in the
#                   table's header.
#   RAWBLOCKD       a prebuilt rawblockd (default: go build it)
set -euo pipefail

prog=${0##*/}
die() {
	echo "$prog: $*" >&2
	exit 1
}
[ $# -ge 1 ] && [ $# -le 2 ] || {
	echo "usage: $prog DEV [ROUNDS]" >&2
	exit 2
}
dev=$1
rounds=${2:-3}
runtime=${RUNTIME:-10}
size=${SIZE:-512M}
fs_size=${FS_SIZE:-1G}
tree_mb=${TREE_MB:-256}
drop_caches=${DROP_CACHES:-0}
rawblockd_env=${RAWBLOCKD_ENV-GOMAXPROCS=1}
rawblockd_opts=${RAWBLOCKD_OPTS:---cache 4G}
rawblockd_fs_opts=${RAWBLOCKD_FS_OPTS:---cache 256M}
nbdkit_opts=${NBDKIT_OPTS:---threads 16}
nbdkit_plugin=${NBDKIT_PLUGIN:-cache=default}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, not '$rounds'"
[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive number of seconds"
[[ $size =~ ^[1-9][0-9]*[MG]$ ]] || die "SIZE must look like 512M or 1G"
[[ $fs_size =~ ^[1-9][0-9]*[MG]$ ]] || die "FS_SIZE must look like 512M or 1G"
[[ $tree_mb =~ ^[1-9][0-9]*$ ]] || die "TREE_MB must be a positive number"
[ -b "$dev" ] || [ -f "$dev" ] || die "$dev is neither a block device nor a regular file"

root=$(cd "$(dirname "$0")/.." && pwd)
for c in fio nbdkit nbdinfo python3; do
	command -v "$c" >/dev/null 2>&1 || "$root/hack/install-deps.sh"
	command -v "$c" >/dev/null 2>&1 || die "$c not found"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/vs-nbdkit.XXXXXX")
sock=$tmp/nbd.sock
server=""
server_kind=""
phase=fio
fusedir=$tmp/fuse
mnt=$tmp/mnt
loopdev=""
fusepid=""

stop_fuse() {
	if mountpoint -q "$fusedir" 2>/dev/null; then fusermount3 -u "$fusedir" 2>/dev/null || umount -l "$fusedir"; fi
	if [ -n "$fusepid" ]; then wait "$fusepid" 2>/dev/null || true; fi
	fusepid=""
}
stop_server() {
	[ -n "$server" ] || return 0
	kill -TERM "$server" 2>/dev/null || true
	wait "$server" 2>/dev/null || true
	server=""
}
cleanup() {
	set +e
	if mountpoint -q "$mnt" 2>/dev/null; then umount "$mnt"; fi
	if [ -n "$loopdev" ]; then losetup -d "$loopdev"; fi
	stop_fuse
	stop_server
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${RAWBLOCKD:-}" ]; then
	bin=$RAWBLOCKD
else
	bin=$tmp/rawblockd
	(cd "$root" && go build -o "$bin" ./cmd/rawblockd) || die "building rawblockd failed"
fi

# start_server KIND [first]: rawblockd formats DEV on its first start of a
# round; nbdkit serves DEV itself.
start_server() {
	local kind=$1 first=${2:-}
	rm -f "$sock"
	case $kind in
	rawblockd)
		local fmt=() opts=$rawblockd_opts
		[ -z "$first" ] || fmt=(--format --export "fio=$size" --export "fs=$fs_size")
		[ "$phase" != fs ] || opts=$rawblockd_fs_opts
		# shellcheck disable=SC2086 # the options are lists
		env $rawblockd_env "$bin" --device "$dev" --socket "$sock" --log-level warn "${fmt[@]}" $opts >>"$tmp/rawblockd.log" 2>&1 &
		;;
	nbdkit)
		# shellcheck disable=SC2086 # NBDKIT_OPTS/NBDKIT_PLUGIN are lists
		nbdkit --foreground --unix "$sock" $nbdkit_opts file "file=$dev" $nbdkit_plugin >>"$tmp/nbdkit.log" 2>&1 &
		;;
	esac
	server=$!
	server_kind=$kind
	local i
	for i in $(seq 1 400); do
		if nbdinfo --size "$(uri fio)" >/dev/null 2>&1; then return 0; fi
		kill -0 "$server" 2>/dev/null || die "$kind exited at start (log in $tmp)"
		sleep 0.05
	done
	die "$kind did not answer"
}

# uri EXPORT: rawblockd serves named exports, nbdkit the device under any name.
uri() {
	if [ "$server_kind" = rawblockd ]; then echo "nbd+unix:///$1?socket=$sock"; else echo "nbd+unix:///?socket=$sock"; fi
}

fio_run() { # out rw bs iodepth [extra...]
	local out=$1 rw=$2 bs=$3 qd=$4
	shift 4
	fio --name=vs --ioengine=nbd --uri="$(uri fio)" --rw="$rw" --bs="$bs" --iodepth="$qd" \
		--numjobs=1 --size="$size" --runtime="$runtime" --time_based \
		--norandommap --randrepeat=0 --output-format=json "$@" >"$out" 2>"$out.err" ||
		die "fio $rw $bs on $server_kind failed: $(cat "$out.err")"
}

# The tree the ext4 round trip copies: made once, the same for both.
make_tree() {
	python3 - "$tmp/tree" "$tree_mb" <<'EOF'
import os, random, sys
root, mb = sys.argv[1], int(sys.argv[2])
random.seed(1)
total, i = 0, 0
while total < mb << 20:
    d = os.path.join(root, f"d{i % 16}", f"s{i % 5}")
    os.makedirs(d, exist_ok=True)
    n = random.choice([0, 100, 4096, 20000, 65536, 300000, 1 << 20, 4 << 20])
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(random.randbytes(n))
    total += n
    i += 1
print(i)
EOF
}

start_fuse() {
	rm -f "$tmp/fuse.pid"
	nbdfuse -P "$tmp/fuse.pid" "$fusedir" "$(uri fs)" &
	fusepid=$!
	local i
	for i in $(seq 1 200); do
		[ -s "$tmp/fuse.pid" ] && [ -e "$fusedir/nbd" ] && return 0
		sleep 0.05
	done
	die "nbdfuse did not come up"
}
down_fs() {
	umount "$mnt"
	fsck.ext4 -fn "$loopdev" >"$tmp/fsck.out" 2>&1 || die "fsck.ext4 -fn failed on $server_kind: $(cat "$tmp/fsck.out")"
	losetup -d "$loopdev"
	loopdev=""
	stop_fuse
}

# ext4_round_trip KIND: prints wall seconds.
ext4_round_trip() {
	local kind=$1 t0 t1
	t0=$(date +%s.%N)
	start_fuse
	loopdev=$(losetup --find --show "$fusedir/nbd")
	mkfs.ext4 -q -F "$loopdev" "$fs_size" >/dev/null
	mount "$loopdev" "$mnt"
	cp -a "$tmp/tree/." "$mnt/"
	down_fs
	stop_server
	if [ "$drop_caches" = 1 ]; then
		sync
		echo 3 >/proc/sys/vm/drop_caches
	fi
	start_server "$kind"
	start_fuse
	loopdev=$(losetup --find --show "$fusedir/nbd")
	mount "$loopdev" "$mnt"
	diff -r -x lost+found "$tmp/tree" "$mnt" >/dev/null || die "ext4 round trip on $kind: files differ after the restart"
	down_fs
	t1=$(date +%s.%N)
	python3 -c "print($t1 - $t0)"
}

do_ext4=0
if [ "$(id -u)" -eq 0 ] && command -v nbdfuse >/dev/null && command -v fusermount3 >/dev/null && [ -e /dev/fuse ]; then
	do_ext4=1
	mkdir -p "$fusedir" "$mnt"
	echo "making a ${tree_mb} MiB tree for the ext4 round trip ..." >&2
	files=$(make_tree)
else
	echo "$prog: not root or no nbdfuse: the ext4 round trip is skipped" >&2
fi

run_server() { # kind round
	local kind=$1 r=$2
	echo "round $r: $kind ..." >&2
	phase=fio
	start_server "$kind" first
	fio --name=prefill --ioengine=nbd --uri="$(uri fio)" --rw=write --bs=1M --iodepth=8 \
		--size="$size" --end_fsync=1 --output-format=terse >/dev/null 2>&1 || die "prefill on $kind failed"
	fio --name=warm --ioengine=nbd --uri="$(uri fio)" --rw=randread --bs=64k --iodepth=16 \
		--size="$size" --output-format=terse >/dev/null 2>&1 || die "read pass on $kind failed"

	fio_run "$tmp/$kind.randread.$r.json" randread 4k 16
	fio_run "$tmp/$kind.randwrite.$r.json" randwrite 4k 16 --end_fsync=1
	fio_run "$tmp/$kind.write.$r.json" write 1M 8
	stop_server
	if [ $do_ext4 = 1 ]; then
		phase=fs
		start_server "$kind"
		ext4_round_trip "$kind" >"$tmp/$kind.ext4.$r"
		stop_server
	fi
}

for ((r = 1; r <= rounds; r++)); do
	if ((r % 2)); then
		run_server rawblockd "$r"
		run_server nbdkit "$r"
	else
		run_server nbdkit "$r"
		run_server rawblockd "$r"
	fi
done

cpu=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
echo
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), kernel $(uname -r), ${cpu:-unknown cpu} ($(nproc) CPUs), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "device: $dev; fio region $size, ${runtime}s per run, $rounds rounds alternating (medians); $(fio --version), $(nbdkit --version)"
echo "rawblockd ${rawblockd_env:+$rawblockd_env }$rawblockd_opts (ext4: $rawblockd_fs_opts) | nbdkit $nbdkit_opts file $nbdkit_plugin"
[ $do_ext4 = 0 ] || echo "ext4 round trip: $fs_size file system, ${files} files / ${tree_mb} MiB copied; page cache dropped at the restart: $([ "$drop_caches" = 1 ] && echo yes || echo no)"
echo
python3 - "$tmp" "$rounds" "$do_ext4" <<'PY'
import json, statistics, sys
tmp, rounds, ext4 = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

def load(path):
    with open(path) as f:
        t = f.read()
    return json.loads(t[t.index("{"):])

def metric(kind, name, r):
    if name == "ext4":
        return float(open(f"{tmp}/{kind}.ext4.{r}").read())
    job = load(f"{tmp}/{kind}.{name}.{r}.json")["jobs"][0]
    side = job["read" if name == "randread" else "write"]
    return side["bw_bytes"] / (1 << 20) if name == "write" else side["iops"]

rows = [("randread 4k, iodepth 16", "randread", "IOPS", "≥ 1.0", 1.0, True),
        ("randwrite 4k, iodepth 16, then flush", "randwrite", "IOPS", "≥ 1.0", 1.0, True),
        ("write 1M, iodepth 8", "write", "MiB/s", "≥ 1.0", 1.0, True)]
if ext4:
    rows.append(("ext4-on-nbdfuse round trip", "ext4", "wall s", "≤ 1.2", 1.2, False))
print("| workload | unit | rawblockd | nbdkit | rawblockd/nbdkit | target | met |")
print("|---|---|---:|---:|---:|---|---|")
detail = []
for label, name, unit, target, bound, higher in rows:
    rb = [metric("rawblockd", name, r) for r in range(1, rounds + 1)]
    nk = [metric("nbdkit", name, r) for r in range(1, rounds + 1)]
    a, b = statistics.median(rb), statistics.median(nk)
    ratio = a / b if b else float("nan")
    ok = ratio >= bound if higher else ratio <= bound
    fmt = (lambda x: f"{x:.0f}") if unit == "IOPS" else (lambda x: f"{x:.1f}")
    print(f"| {label} | {unit} | {fmt(a)} | {fmt(b)} | {ratio:.2f} | {target} | {'yes' if ok else 'NO'} |")
    detail.append(f"{name} per round: rawblockd {' '.join(fmt(x) for x in rb)} | nbdkit {' '.join(fmt(x) for x in nk)}")
print()
for d in detail:
    print(d)
PY
