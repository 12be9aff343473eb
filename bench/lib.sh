# lib.sh — what the bench scripts share. Source it: `. "$(dirname "$0")/lib.sh"`.

# load_dev_env: exports the KEY=value lines of .dev/env (written by ./dev up; values
# shell-quoted) whose key isn't set already, so what the caller set wins.
load_dev_env() {
    [[ -f .dev/env ]] || return 0
    local line key
    while IFS= read -r line; do
        key=${line%%=*}
        [[ $key =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
        [[ -n ${!key:-} ]] && continue
        eval "export $line"
    done < .dev/env
}

# redis_args URL: sets REDIS_ARGS to redis-cli's and redis-benchmark's -h, -p (and -a) for
# redis://[user:password@]host[:port][/db] or host:port (the port defaults to 6379).
redis_args() {
    local url=${1#redis://} auth password=
    url=${url%%/*}
    if [[ $url == *@* ]]; then
        auth=${url%@*}
        url=${url##*@}
        [[ $auth == *:* ]] && password=${auth#*:}
    fi
    if [[ $url == *:* ]]; then
        REDIS_ARGS=(-h "${url%:*}" -p "${url##*:}")
    else
        REDIS_ARGS=(-h "${url:-127.0.0.1}" -p 6379)
    fi
    if [[ -n $password ]]; then
        REDIS_ARGS+=(-a "$password" --no-auth-warning)
    fi
}
