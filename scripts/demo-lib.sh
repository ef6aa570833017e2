# Shared by the demo scripts (sourced, not run): numbered steps and
# commands echoed before they run.
if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD='' PLAIN=''; fi
step=0

# say TEXT...: print the next numbered step's heading
say() {
    step=$((step + 1))
    printf '\n%s== %d. %s%s\n' "$BOLD" "$step" "$*" "$PLAIN"
}

# show_as NAME CMD ARGS...: print "$ NAME ARGS..." (shell-quoted), then run
# CMD ARGS...
show_as() {
    local name=$1 a
    shift
    printf '$ %s' "$name"
    for a in "${@:2}"; do
        if [[ $a =~ ^[A-Za-z0-9_./=,:+?-]+$ ]]; then
            printf ' %s' "$a"
        else
            printf " '%s'" "${a//\'/\'\\\'\'}"
        fi
    done
    printf '\n'
    "$@"
}

# show CMD ARGS...: print the command as typed, then run it
show() { show_as "$1" "$@"; }

# The daemon demos' common set-up.  Before sourcing this file a script sets
# REPO (the checkout).  demo_init NAME TOOL...: set BUILD (BITBACK_BUILD, or
# build/), BITBACK, BITBACKD, PYTHON and PYTHONPATH (for the tests' QMP
# client, python3 -m bitback_testlib.qmpcli); fail unless bitback,
# bitbackd and every TOOL are there; make the work folder DIR
# ($TMPDIR/NAME.XXXXXX, or DEMO_DIR, then kept: KEEP=1) and cd into it, and
# a short folder SOCKDIR for QMP_SOCK and NBD_SOCK (UNIX paths are
# limited).  On exit the daemon PID (if still set) is stopped, after the
# script's demo_cleanup hook (if it defines one) has run, and the folders
# are removed.
demo_init() {
    local name=$1 b t
    shift
    BUILD=${BITBACK_BUILD:-$REPO/build}
    case $BUILD in /*) ;; *) BUILD=$REPO/$BUILD ;; esac
    BITBACK=$BUILD/bitback
    BITBACKD=$BUILD/bitbackd
    PYTHON=/usr/bin/python3
    export PYTHONPATH=$REPO/tests/lib${PYTHONPATH:+:$PYTHONPATH}
    for b in "$BITBACK" "$BITBACKD"; do
        if [ ! -x "$b" ]; then
            echo "demo: $b not found; build first (make)" >&2
            exit 1
        fi
    done
    for t in "$@"; do
        if ! command -v "$t" >/dev/null; then
            echo "demo: $t is not installed: run scripts/install-deps.sh" >&2
            exit 1
        fi
    done
    if [ -n "${DEMO_DIR:-}" ]; then
        mkdir -p "$DEMO_DIR"
        DIR=$(cd "$DEMO_DIR" && pwd)
        KEEP=1
    else
        DIR=$(mktemp -d "${TMPDIR:-/tmp}/$name.XXXXXX")
        KEEP=
    fi
    SOCKDIR=$(mktemp -d /tmp/bbd-demo.XXXXXX)
    QMP_SOCK=$SOCKDIR/qmp.sock
    NBD_SOCK=$SOCKDIR/nbd.sock
    PID=
    trap demo_exit EXIT
    trap 'exit 130' INT TERM
    cd "$DIR"
}

# demo_exit: the EXIT trap of demo_init.
demo_exit() {
    if declare -F demo_cleanup >/dev/null; then
        demo_cleanup
    fi
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        kill "$PID" 2>/dev/null || true
        wait_gone "$PID" 100 || kill -9 "$PID" 2>/dev/null || true
    fi
    rm -rf "$SOCKDIR"
    [ -n "$KEEP" ] || rm -rf "$DIR"
}

# wait_gone PID TRIES: wait up to TRIES x 50 ms for process PID to exit;
# fails if it is still running.
wait_gone() {
    local _
    for _ in $(seq 1 "$2"); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.05
    done
    ! kill -0 "$1" 2>/dev/null
}

# start_daemon BINARY BLOCKDEV [OPTION...]: show and start BINARY (bitbackd
# or qemu-storage-daemon) with --blockdev BLOCKDEV, its NBD server on
# NBD_SOCK, the OPTIONs, and its QMP monitor on QMP_SOCK, daemonized; sets
# PID.
start_daemon() {
    show "$1" \
        --blockdev "$2" \
        --nbd-server "addr.type=unix,addr.path=$NBD_SOCK" \
        "${@:3}" \
        --chardev "socket,path=$QMP_SOCK,server=on,wait=off,id=m0" \
        --monitor chardev=m0 \
        --pidfile "$DIR/daemon.pid" --daemonize
    PID=$(cat "$DIR/daemon.pid")
}
