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
