#!/usr/bin/env bash
# Services the tests need, started by `.ci/run` (which sources this file) or by hand with
# `. .ci/services.sh`: a throwaway PostgreSQL cluster for the shared profile store's tests.
#
# Installs Debian's `postgresql` when initdb/pg_ctl are missing, keeps one cluster under
# $MPO_PG_DIR (default /tmp/mpo-test-postgres-$USER), owned by an unprivileged user (initdb
# refuses root), listening on 127.0.0.1 and a free port with its unix socket in that folder,
# and exports MPO_TEST_POSTGRES_URL. Sourcing it again reuses a running cluster.
# Safe under `set -euo pipefail`; defines only `_mpo_pg_*` functions.

_mpo_pg_bindir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            echo "$dir"
            return 0
        fi
    done
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"
        return 0
    fi
    return 1
}

_mpo_pg_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "services.sh: PostgreSQL is not installed; run as root or apt-get install postgresql" >&2
        return 1
    fi
    echo "services.sh: installing Debian's postgresql"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postgresql postgresql-client >/dev/null
}

_mpo_pg_as_owner() {  # run a command as the cluster's owner
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$_MPO_PG_USER" -- "$@"
    else
        "$@"
    fi
}

_mpo_pg_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_mpo_pg_start() {
    local bindir="$1" base="$2" port
    if [ ! -f "$base/data/PG_VERSION" ]; then
        rm -rf "$base/data"
        _mpo_pg_as_owner "$bindir/initdb" -D "$base/data" -U postgres -A trust -E UTF8 \
            --locale=C.UTF-8 --no-sync >"$base/initdb.log" 2>&1 \
            || { cat "$base/initdb.log" >&2; return 1; }
    fi
    if _mpo_pg_as_owner "$bindir/pg_ctl" -D "$base/data" status >/dev/null 2>&1 \
        && [ -f "$base/port" ]; then
        return 0  # already running: keep its port
    fi
    port="$(_mpo_pg_free_port)"
    # Throwaway data: no fsync, no synchronous commit (fast on a busy CI machine).
    _mpo_pg_as_owner "$bindir/pg_ctl" -D "$base/data" -l "$base/server.log" -w -t 60 \
        -o "-p $port -h 127.0.0.1 -k $base -c fsync=off -c synchronous_commit=off \
            -c full_page_writes=off -c max_connections=200" start >/dev/null \
        || { tail -n 20 "$base/server.log" >&2; return 1; }
    echo "$port" >"$base/port"
}

_mpo_pg_create_db() {  # the test database, with a non-bytewise collation where ICU is built in
    local bindir="$1" port="$2" psql
    psql=("$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -q -tA -v ON_ERROR_STOP=1)
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'mpo_test'")" != 1 ]; then
        "${psql[@]}" -c "CREATE DATABASE mpo_test TEMPLATE template0 ENCODING 'UTF8'
                         LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'" 2>/dev/null \
            || "${psql[@]}" -c "CREATE DATABASE mpo_test"
    fi
}

_mpo_pg_main() {
    local bindir base port
    if ! bindir="$(_mpo_pg_bindir)"; then
        _mpo_pg_install
        bindir="$(_mpo_pg_bindir)"
    fi
    _MPO_PG_USER="$(id -un)"
    if [ "$(id -u)" = 0 ]; then
        _MPO_PG_USER=postgres
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /bin/false postgres
    fi
    base="${MPO_PG_DIR:-/tmp/mpo-test-postgres-$(id -un)}"
    mkdir -p "$base"
    [ "$(id -u)" = 0 ] && chown "$_MPO_PG_USER" "$base" && chmod 700 "$base"
    _mpo_pg_start "$bindir" "$base"
    port="$(cat "$base/port")"
    _mpo_pg_create_db "$bindir" "$port"
    export MPO_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/mpo_test"
    echo "services.sh: PostgreSQL $("$bindir/pg_ctl" --version | awk '{print $3}') at" \
        "$MPO_TEST_POSTGRES_URL (data in $base)"
}

_mpo_pg_main
