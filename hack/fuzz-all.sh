#!/usr/bin/env bash
# fuzz-all.sh: run every fuzz target of the module, one after the other, and
# print a table of what each did.
#
#   hack/fuzz-all.sh [DURATION]
#
# DURATION is a -fuzztime value per target (default 60s): 30s, 10m, 8h, or
# an exec count such as 100000x. Targets are found as .ci/run finds them:
# every `func FuzzXxx` in the _test.go files of each package of the module.
# New interesting inputs go to Go's fuzz cache ($(go env GOCACHE)/fuzz) and
# are reused by the next run; a failing input is written to the package's
# testdata/fuzz/<target>/ and replayed by plain `go test` from then on.
#
# Environment:
#   FUZZ_PARALLEL  fuzzing workers per target (go test -parallel; default
#                  GOMAXPROCS)
#   FUZZ_MINIMIZE  -fuzzminimizetime: how long each new interesting input
#                  is minimized (default 10s). Go's own default, 60s, can
#                  spend a short run minimizing: executions stop counting
#                  meanwhile (seen: 21,686 execs in 30 s, against 331,884
#                  in 20 s with 2s).
#   FUZZ_MATCH     only targets whose name matches this extended regexp
#   FUZZ_LOG_DIR   where each target's output is kept (default: a new
#                  directory under ${TMPDIR:-/tmp})
#
# The table columns: package, target, duration (fuzzing time go test
# reported), execs (inputs executed), new interesting (inputs that reached
# new coverage, and the corpus size after), result (ok, or FAIL and the
# failing input). The exit status is 1 if any target failed.
set -euo pipefail
cd "$(dirname "$0")/.."

prog=${0##*/}
duration=${1:-60s}
if [ $# -gt 1 ] || [[ ! $duration =~ ^[0-9]+(ns|us|ms|s|m|h|x)$ ]]; then
	echo "usage: $prog [DURATION]   (a -fuzztime value: 30s, 10m, 8h, 100000x)" >&2
	exit 2
fi
logdir=${FUZZ_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/rawblock-fuzz.XXXXXX")}
mkdir -p "$logdir"
module=$(go list -m)

flags=(-fuzzminimizetime "${FUZZ_MINIMIZE:-10s}")
if [ -n "${FUZZ_PARALLEL:-}" ]; then
	flags+=(-parallel "$FUZZ_PARALLEL")
fi

# One row per target: package target duration execs interesting result.
rows=()
failed=0

table() {
	local fmt='%-12s  %-24s  %9s  %14s  %-18s  %s\n'
	echo
	# shellcheck disable=SC2059
	printf "$fmt" package target duration execs "new interesting" result
	# shellcheck disable=SC2059
	printf "$fmt" ------- ------ -------- ----- --------------- ------
	local r
	for r in "${rows[@]}"; do
		IFS=$'\t' read -r -a f <<<"$r"
		# shellcheck disable=SC2059
		printf "$fmt" "${f[@]}"
	done
	echo
	echo "logs: $logdir"
}

interrupted() {
	echo "$prog: interrupted" >&2
	table
	exit 130
}
trap interrupted INT TERM

targets=0
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	short=${pkg#"$module"/}
	[ "$pkg" = "$module" ] && short=.
	for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
		if [ -n "${FUZZ_MATCH:-}" ] && [[ ! $target =~ $FUZZ_MATCH ]]; then
			continue
		fi
		targets=$((targets + 1))
		log="$logdir/${short//\//_}.$target.log"
		echo "== $short $target ($duration)"
		status=0
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$duration" "${flags[@]}" "$pkg" >"$log" 2>&1 || status=$?
		# The last progress line holds the totals:
		# fuzz: elapsed: 31s, execs: 123456 (3982/sec), new interesting: 3 (total: 12)
		last=$(grep -E '^fuzz: elapsed: .*execs: ' "$log" | tail -n 1 || true)
		elapsed=$(sed -nE 's/^fuzz: elapsed: ([^,]+),.*/\1/p' <<<"$last")
		execs=$(sed -nE 's/.*execs: ([0-9]+).*/\1/p' <<<"$last")
		newi=$(sed -nE 's/.*new interesting: ([0-9]+) \(total: ([0-9]+)\).*/\1 (total \2)/p' <<<"$last")
		if [ "$status" -eq 0 ]; then
			result=ok
		else
			failed=$((failed + 1))
			input=$(sed -nE 's/.*Failing input written to (.*)$/\1/p' "$log" | tail -n 1)
			result="FAIL${input:+ ($short/$input)}; see $log"
		fi
		rows+=("$(printf '%s\t%s\t%s\t%s\t%s\t%s' "$short" "$target" "${elapsed:--}" "${execs:--}" "${newi:--}" "$result")")
		tail -n 3 "$log" | sed 's/^/   /'
	done
done

if [ "$targets" -eq 0 ]; then
	echo "$prog: no fuzz targets found${FUZZ_MATCH:+ matching $FUZZ_MATCH}" >&2
	exit 1
fi
table
if [ "$failed" -gt 0 ]; then
	echo "$prog: $failed of $targets targets failed" >&2
	exit 1
fi
