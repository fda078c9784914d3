#!/usr/bin/env bash
# A PostgreSQL primary and a streaming standby (pg_basebackup -R) on this
# machine, for the failover test and `weft-local up --ha` (docs/ha.md):
#   scripts/pg-ha.sh start DIR PRIMARY_PORT STANDBY_PORT sync|async
#       prints the primary's socket directory; the serving role `weft`
#       exists as with scripts/pg.sh
#   scripts/pg-ha.sh kill-primary DIR    immediate stop: a crash
#   scripts/pg-ha.sh stop-standby DIR    the standby stops receiving
#   scripts/pg-ha.sh start-standby DIR
#   scripts/pg-ha.sh promote DIR         the standby becomes the primary
#   scripts/pg-ha.sh stop DIR            stops both and removes DIR
# Unix sockets only (listen_addresses=''), never the system service.
set -euo pipefail
# shellcheck source=scripts/pg-lib.sh
. "$(dirname "$0")/pg-lib.sh"

ensure_installed
bin=$(pg_bin)
as_pg() { runuser -u postgres -- "$@"; }

cmd=${1:?usage: pg-ha.sh start|kill-primary|stop-standby|start-standby|promote|stop DIR ...}
dir=${2:?missing DIR}

ctl_start() { # name
    as_pg "$bin/pg_ctl" -D "$dir/$1/data" -l "$dir/$1/postgres.log" -w -t 60 \
        -o "$(cat "$dir/$1/opts")" start >&2 || { cat "$dir/$1/postgres.log" >&2; exit 1; }
}

# Waits up to 10 s for one standby row of pg_stat_replication to match
# WHERE (run on the primary), else fails saying WHAT.
replication_is() { # port where what
    local n=
    for _ in $(seq 100); do
        n=$(as_pg psql -At -h "$dir/primary/sock" -p "$1" -U postgres -d postgres \
            -c "SELECT count(*) FROM pg_stat_replication WHERE $2")
        [ "$n" = 1 ] && return 0
        sleep 0.1
    done
    echo "$3" >&2
    exit 1
}

case "$cmd" in
start)
    pport=${3:?PRIMARY_PORT}
    sport=${4:?STANDBY_PORT}
    mode=${5:?sync|async}
    mkdir -p "$dir/primary/sock" "$dir/standby/sock"
    chown -R postgres:postgres "$dir"
    chmod 700 "$dir"
    as_pg "$bin/initdb" -D "$dir/primary/data" -U postgres -A trust -E UTF8 --no-locale \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    # A process crash, not a machine crash, is what the test injects: the
    # OS keeps what PostgreSQL wrote, so fsync stays off for speed. Commits
    # wait for the standby only in sync mode.
    common="-c listen_addresses='' -c max_connections=300 -c fsync=off -c full_page_writes=off \
-c wal_level=replica -c max_wal_senders=5 -c hot_standby=on -c synchronous_commit=on \
-c wal_sender_timeout=5s -c wal_receiver_timeout=5s"
    echo "-p $pport -k $dir/primary/sock $common" >"$dir/primary/opts"
    # The promoted standby has no standby of its own: it must not wait for one.
    echo "-p $sport -k $dir/standby/sock $common" >"$dir/standby/opts"
    ctl_start primary
    create_roles "$dir/primary/sock" "$pport"
    as_pg "$bin/pg_basebackup" -D "$dir/standby/data" -R -X stream \
        -d "host=$dir/primary/sock port=$pport user=postgres application_name=standby" >&2
    ctl_start standby
    # Streaming before anything is written that the test relies on.
    replication_is "$pport" "state = 'streaming'" "the standby does not stream"
    if [ "$mode" = sync ]; then
        # Set on the primary alone, after the base backup: the promoted
        # standby has no standby to wait for.
        as_pg psql -q -v ON_ERROR_STOP=1 -h "$dir/primary/sock" -p "$pport" -U postgres -d postgres \
            -c "ALTER SYSTEM SET synchronous_standby_names = '*'" -c "SELECT pg_reload_conf()" >&2
        replication_is "$pport" "sync_state = 'sync'" "the standby is not synchronous"
    fi
    echo "$dir/primary/sock"
    ;;
kill-primary)
    as_pg "$bin/pg_ctl" -D "$dir/primary/data" -m immediate -w stop >&2
    ;;
stop-standby)
    as_pg "$bin/pg_ctl" -D "$dir/standby/data" -m fast -w stop >&2
    ;;
start-standby)
    ctl_start standby
    ;;
promote)
    as_pg "$bin/pg_ctl" -D "$dir/standby/data" -w promote >&2
    ;;
stop)
    for n in primary standby; do
        [ -d "$dir/$n/data" ] && as_pg "$bin/pg_ctl" -D "$dir/$n/data" -m immediate -w stop >&2 2>/dev/null || true
    done
    rm -rf "$dir"
    ;;
*)
    echo "usage: pg-ha.sh start|kill-primary|stop-standby|start-standby|promote|stop DIR ..." >&2
    exit 2
    ;;
esac
