#!/usr/bin/env bash
# Throwaway PostgreSQL cluster: own data directory, port and socket
# directory, never the system service.
#   scripts/pg.sh start DIR [PORT]   prints the owner's DATABASE_URL; the
#                                    serving role `weft` exists too
#   scripts/pg.sh stop DIR           stops it and removes DIR
#   scripts/pg.sh halt DIR           stops it, keeping its data (an outage)
#   scripts/pg.sh resume DIR         starts a halted cluster again
set -euo pipefail

# shellcheck source=scripts/pg-lib.sh
. "$(dirname "$0")/pg-lib.sh"

cmd=${1:?usage: pg.sh start|stop DIR [PORT]}
dir=${2:?usage: pg.sh start|stop DIR [PORT]}

case "$cmd" in
start)
    ensure_installed
    bin=$(pg_bin)
    port=${3:-55432}
    mkdir -p "$dir/data" "$dir/sock"
    # initdb refuses to run as root.
    chown -R postgres:postgres "$dir"
    chmod 700 "$dir"
    runuser -u postgres -- "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    echo "-p $port -k $dir/sock -c listen_addresses='' -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >"$dir/opts"
    runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
        -o "$(cat "$dir/opts")" start >&2 || { cat "$dir/postgres.log" >&2; exit 1; }
    # The two-role set-up (docs/security.md): postgres owns the schema and
    # migrates; weft-server serves as `weft`, which may only read and
    # append to the audit log.
    create_roles "$dir/sock" "$port"
    echo "postgres://postgres@localhost:$port/postgres?host=$dir/sock"
    ;;
stop)
    if [ -d "$dir/data" ]; then
        bin=$(pg_bin)
        runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 || true
    fi
    rm -rf "$dir"
    ;;
halt)
    runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >&2
    ;;
resume)
    runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
        -o "$(cat "$dir/opts")" start >&2
    ;;
*)
    echo "usage: pg.sh start|stop|halt|resume DIR [PORT]" >&2
    exit 2
    ;;
esac
