# Shared by scripts/pg.sh and scripts/pg-ha.sh (sourced, not run): finding
# or installing PostgreSQL's binaries, and the two-role set-up
# (docs/security.md).

pg_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return; }
    done
    return 1
}

ensure_installed() {
    if ! pg_bin >/dev/null; then
        echo "installing PostgreSQL (apt)..." >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq postgresql >&2
    fi
}

# create_roles SOCKET_DIR PORT: postgres owns and migrates the schema;
# weft-server serves as `weft`, which may only read and append to the
# audit log.
create_roles() {
    runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -h "$1" -p "$2" -U postgres -d postgres \
        -c "CREATE ROLE weft_server NOLOGIN" -c "CREATE ROLE weft LOGIN IN ROLE weft_server" >&2
}
