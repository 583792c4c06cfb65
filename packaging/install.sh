#!/usr/bin/env bash
# Install or upgrade syncagent as a systemd service, from a source checkout. Run as root.
#
#   packaging/install.sh [--prefix /opt/syncagent] [--python python3.11] [--dry-run]
#
# Idempotent: a second run upgrades the package in the venv and refreshes the unit and the
# sysusers/tmpfiles snippets, and never overwrites /etc/syncagent/config.toml or credentials.
# It does not enable or start the service: the steps printed at the end do.
set -euo pipefail

PREFIX=/opt/syncagent
PYTHON=${PYTHON:-python3}
DRY_RUN=0
EXTRAS=fast
SOURCE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

UNIT_DIR=/etc/systemd/system
SYSUSERS_DIR=/etc/sysusers.d
TMPFILES_DIR=/etc/tmpfiles.d
ETC_DIR=/etc/syncagent
STATE_DIR=/var/lib/syncagent
SERVICE_USER=syncagent

usage() {
    cat <<EOF
Usage: $0 [options]

Install syncagent from $SOURCE into a dedicated venv and set up the systemd service.

Options:
  --prefix DIR     where the venv and docs go (default: $PREFIX)
  --python PYTHON  interpreter for the venv, 3.11 or newer (default: $PYTHON)
  --extras LIST    pip extras to install (default: $EXTRAS; empty for none)
  --dry-run        print every step, change nothing
  -h, --help       this text
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a folder}; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --extras) EXTRAS=${2-}; shift 2 ;;
        --extras=*) EXTRAS=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

case "$PREFIX" in
    /*) ;;
    *) echo "install.sh: --prefix must be an absolute path" >&2; exit 2 ;;
esac
PREFIX=${PREFIX%/}
VENV=$PREFIX/venv

# Every change to the system goes through run(), so --dry-run shows it and does nothing.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '+ %s\n' "$*"
    else
        "$@"
    fi
}

say() { printf '==> %s\n' "$*"; }

have() { command -v "$1" >/dev/null 2>&1; }

if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or with --dry-run to see the steps)" >&2
    exit 1
fi
for f in pyproject.toml config.example.toml packaging/syncagent.service \
         packaging/syncagent.sysusers packaging/syncagent.tmpfiles; do
    if [ ! -f "$SOURCE/$f" ]; then
        echo "install.sh: $SOURCE is not a syncagent checkout (no $f)" >&2
        exit 1
    fi
done
if ! have "$PYTHON"; then
    echo "install.sh: $PYTHON not found; pass --python" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install.sh: $PYTHON is older than 3.11" >&2
    exit 1
fi

# 1. The service user, and the state and credentials folders.
say "service user $SERVICE_USER and folders"
run install -d -m 0755 "$SYSUSERS_DIR" "$TMPFILES_DIR"
run install -m 0644 "$SOURCE/packaging/syncagent.sysusers" "$SYSUSERS_DIR/syncagent.conf"
run install -m 0644 "$SOURCE/packaging/syncagent.tmpfiles" "$TMPFILES_DIR/syncagent.conf"
if have systemd-sysusers; then
    run systemd-sysusers "$SYSUSERS_DIR/syncagent.conf"
elif ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "syncagent CRM/ERP sync" "$SERVICE_USER"
fi
if have systemd-tmpfiles; then
    run systemd-tmpfiles --create "$TMPFILES_DIR/syncagent.conf"
else
    run install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
    run install -d -m 0700 -o root -g root "$ETC_DIR/credentials"
fi

# 2. A dedicated venv: the top-level packages agent/, state/ and connectors/ have generic
#    names that would collide with other software in a shared site-packages.
say "venv $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    run install -d -m 0755 "$PREFIX"
    run "$PYTHON" -m venv "$VENV"
fi
run "$VENV/bin/python" -m pip install --quiet --upgrade pip
spec=$SOURCE
if [ -n "$EXTRAS" ]; then
    spec="$SOURCE[$EXTRAS]"
fi
run "$VENV/bin/python" -m pip install --quiet --upgrade "$spec"
run install -d -m 0755 "$PREFIX/share/doc"
for doc in docs/operations.md packaging/README.md; do
    if [ -f "$SOURCE/$doc" ]; then
        run install -m 0644 "$SOURCE/$doc" "$PREFIX/share/doc/$(basename "$doc")"
    fi
done

# 3. The config: the example, only if there is none yet (never overwrite an operator's file).
say "config $ETC_DIR/config.toml"
run install -d -m 0755 "$ETC_DIR"
if [ -e "$ETC_DIR/config.toml" ]; then
    say "kept the existing $ETC_DIR/config.toml"
else
    run install -m 0640 -o root -g "$SERVICE_USER" "$SOURCE/config.example.toml" "$ETC_DIR/config.toml"
fi

# 4. The unit, pointed at this prefix.
say "unit $UNIT_DIR/syncagent.service"
if [ "$DRY_RUN" = 1 ]; then
    printf '+ sed s#/opt/syncagent#%s#g %s > %s\n' "$PREFIX" \
        "$SOURCE/packaging/syncagent.service" "$UNIT_DIR/syncagent.service"
else
    tmp=$(mktemp)
    trap 'rm -f "$tmp"' EXIT
    sed "s#/opt/syncagent#$PREFIX#g" "$SOURCE/packaging/syncagent.service" >"$tmp"
    install -m 0644 "$tmp" "$UNIT_DIR/syncagent.service"
fi
if have systemctl && [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
    running=0
    if systemctl is-active --quiet syncagent 2>/dev/null; then
        running=1
    fi
else
    say "systemd is not running here: skipped systemctl daemon-reload"
    running=0
fi

cat <<EOF

Installed syncagent into $VENV.

Next steps:
  1. Edit $ETC_DIR/config.toml (systems, entities, field owners). Non-secret values the
     config reads with {env = "NAME"} go in $ETC_DIR/syncagent.env (NAME=value lines).
  2. Put each secret the config names as {credential = "NAME"} in $ETC_DIR/credentials/NAME
     (root-owned, mode 0600), e.g.
       install -m 0600 /dev/stdin $ETC_DIR/credentials/erp_password   (type it, then Ctrl-D)
     and keep the unit's LoadCredential= lines equal to that list: systemctl edit syncagent
  3. On the ERP, create the least-privilege role: psql -f $SOURCE/packaging/postgres-setup.sql
     (its header explains the variables).
  4. Run the CLI as the service runs (its user, credentials and env file), with the shell
     function "sa" from $PREFIX/share/doc/operations.md ("Running commands by hand"):
       sa check             config, connectivity, privileges, each problem with its fix
       sa init --dry-run    prints the SQL; the ERP table owner runs its PUBLICATION lines
       sa init              then creates slot and origin, and the state file as $SERVICE_USER
  5. Start it:  systemctl enable --now syncagent
     Watch it:  journalctl -u syncagent -f     and     $VENV/bin/syncagent status
EOF
if [ "$running" = 1 ]; then
    echo
    echo "syncagent is running the previous version: systemctl restart syncagent"
fi
