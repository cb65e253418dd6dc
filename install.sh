#!/bin/sh
# Installs ratelimit-policyd: binary, configuration, system user, directories,
# systemd unit or init.d script, logrotate file. Idempotent: run it again to
# upgrade; an existing configuration file is never overwritten.
#
#   ./install.sh [--prefix DIR] [--binary PATH] [--init systemd|sysv|none] [--uninstall]
#   DESTDIR=/tmp/pkg ./install.sh ...     # stage into a directory (packagers)
#
# Without --binary it builds with `cargo build --release`.
set -eu

NAME=ratelimit-policyd
PREFIX=/usr/local
BINARY=""
INIT=auto
UNINSTALL=0
DESTDIR=${DESTDIR:-}

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --binary) BINARY=$2; shift 2 ;;
        --binary=*) BINARY=${1#*=}; shift ;;
        --init) INIT=$2; shift 2 ;;
        --init=*) INIT=${1#*=}; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
done

SRC=$(cd "$(dirname "$0")" && pwd)
SBINDIR=$PREFIX/sbin
DOCDIR=$PREFIX/share/doc/$NAME
SYSCONFDIR=/etc
CONFDIR=$SYSCONFDIR/$NAME
CONFIG=$CONFDIR/$NAME.toml
STATEDIR=/var/lib/$NAME
LOGDIR=/var/log/$NAME
# The policy socket: in Postfix's queue directory (smtpd reaches it as
# unix:ratelimit/policy, chrooted or not), in a directory of ours whose group
# is postfix and setgid, so that the socket (mode 0660) is group postfix:
# Postfix may connect, other local users may not.
SPOOLDIR=/var/spool/postfix/ratelimit
UNITDIR=/etc/systemd/system
INITDIR=/etc/init.d
LOGROTATEDIR=/etc/logrotate.d

if [ "$INIT" = auto ]; then
    if [ -d /run/systemd/system ]; then INIT=systemd; else INIT=sysv; fi
fi
case "$INIT" in systemd|sysv|none) ;; *) echo "install.sh: --init must be systemd, sysv or none" >&2; exit 2 ;; esac

# The real system is changed (users, ownership) only without DESTDIR.
on_target() { [ -z "$DESTDIR" ] && [ "$(id -u)" = 0 ]; }

say() { echo "install.sh: $*"; }

if [ "$UNINSTALL" = 1 ]; then
    if on_target && [ "$INIT" = systemd ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now "$NAME.service" >/dev/null 2>&1 || true
    fi
    if on_target && [ "$INIT" = sysv ] && [ -x "$INITDIR/$NAME" ]; then
        "$INITDIR/$NAME" stop || true
        if command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d "$NAME" remove >/dev/null 2>&1 || true
        fi
    fi
    rm -f "$DESTDIR$SBINDIR/$NAME" "$DESTDIR$UNITDIR/$NAME.service" "$DESTDIR$INITDIR/$NAME" \
        "$DESTDIR$LOGROTATEDIR/$NAME"
    rmdir "$DESTDIR$SPOOLDIR" 2>/dev/null || true
    rm -rf "$DESTDIR$DOCDIR"
    say "removed the program files; kept $CONFIG, $STATEDIR (counters), $LOGDIR and the user $NAME"
    exit 0
fi

# The Perl ratelimit-policyd has the same name: its init script is
# /etc/init.d/ratelimit-policyd, which this would replace, and then nothing
# could stop the Perl daemon. It must be stopped and its script moved aside
# first (README, "Migrating from the Perl daemon").
perl_script=""
if [ -f "$DESTDIR$INITDIR/$NAME" ] && grep -q -e 'daemon\.pl' -e 'printshm' "$DESTDIR$INITDIR/$NAME"; then
    perl_script=$INITDIR/$NAME
fi
perl_pid=""
for pidfile in /var/run/$NAME.pid /run/$NAME.pid /var/run/$NAME/$NAME.pid; do
    [ -f "$DESTDIR$pidfile" ] || continue
    pid=$(tr -dc '0-9' < "$DESTDIR$pidfile")
    if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -e perl -e 'daemon\.pl' -e "$NAME\.pl"; then
        perl_pid=$pid
    fi
done
if [ -n "$perl_script$perl_pid" ]; then
    {
        echo "install.sh: the Perl ratelimit-policyd is installed here; nothing was changed."
        [ -n "$perl_pid" ] && echo "  It is running (pid $perl_pid)."
        [ -n "$perl_script" ] && echo "  $perl_script is its init script, which this install would replace."
        echo "  Stop it first (it writes its counts on SIGTERM) and move its script aside:"
        echo "    $INITDIR/$NAME stop"
        echo "    update-rc.d $NAME remove"
        echo "    mv $INITDIR/$NAME $INITDIR/$NAME.perl"
        echo "  then run install.sh again. See README, \"Migrating from the Perl daemon\"."
    } >&2
    exit 1
fi

if [ -z "$BINARY" ]; then
    say "building with cargo"
    (cd "$SRC" && cargo build --release --locked)
    BINARY=$SRC/target/release/$NAME
fi
[ -x "$BINARY" ] || { echo "install.sh: $BINARY is not an executable" >&2; exit 1; }

if on_target; then
    if ! getent group "$NAME" >/dev/null; then
        groupadd --system "$NAME"
        say "created group $NAME"
    fi
    if ! getent passwd "$NAME" >/dev/null; then
        useradd --system --gid "$NAME" --home-dir "$STATEDIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "ratelimit-policyd" "$NAME"
        say "created user $NAME"
    fi
fi

subst() {
    sed -e "s|@SBINDIR@|$SBINDIR|g" -e "s|@SYSCONFDIR@|$SYSCONFDIR|g" -e "s|@DOCDIR@|$DOCDIR|g" "$1"
}

install -d -m 0755 "$DESTDIR$SBINDIR" "$DESTDIR$DOCDIR" "$DESTDIR$CONFDIR" "$DESTDIR$LOGROTATEDIR"
install -m 0755 "$BINARY" "$DESTDIR$SBINDIR/$NAME"
install -m 0644 "$SRC/README.md" "$DESTDIR$DOCDIR/"
for sql in schema.sql schema-migrate.sql; do
    install -m 0644 "$SRC/$sql" "$DESTDIR$DOCDIR/"
done
install -m 0644 "$SRC/logrotate/$NAME" "$DESTDIR$LOGROTATEDIR/$NAME"

if [ -e "$DESTDIR$CONFIG" ]; then
    say "kept the existing $CONFIG"
else
    # The installed defaults: syslog on, SQLite under /var/lib, control socket
    # under /run (see the README's configuration reference).
    sed -e 's|^listen = .*|listen = "unix:/var/spool/postfix/ratelimit/policy"   # README: Postfix setup|' \
        -e 's|^control_socket = .*|control_socket = "/run/ratelimit-policyd/control.sock"|' \
        -e 's|^url = "sqlite://./ratelimit.db".*|url = "sqlite:///var/lib/ratelimit-policyd/ratelimit.db"|' \
        -e 's|^syslog = false.*|syslog = true|' \
        -e 's|^# The SQLite file and the control socket live in the current directory.|# Installed by install.sh.|' \
        -e '/cargo run --release/d' \
        "$SRC/examples/$NAME.toml" > "$DESTDIR$CONFIG.new"
    chmod 0644 "$DESTDIR$CONFIG.new"
    mv "$DESTDIR$CONFIG.new" "$DESTDIR$CONFIG"
    say "wrote $CONFIG"
fi

install -d -m 0750 "$DESTDIR$STATEDIR" "$DESTDIR$LOGDIR"
install -d -m 2750 "$DESTDIR$SPOOLDIR"
if on_target; then
    chown "$NAME:$NAME" "$STATEDIR" "$LOGDIR"
    if getent group postfix >/dev/null; then
        chown "$NAME:postfix" "$SPOOLDIR"
        chmod 2750 "$SPOOLDIR"
    else
        say "no group postfix (Postfix not installed?): $SPOOLDIR must be group postfix, mode 2750"
    fi
fi

case "$INIT" in
    systemd)
        install -d -m 0755 "$DESTDIR$UNITDIR"
        subst "$SRC/init/$NAME.service" > "$DESTDIR$UNITDIR/$NAME.service"
        chmod 0644 "$DESTDIR$UNITDIR/$NAME.service"
        if on_target && command -v systemctl >/dev/null 2>&1; then
            systemctl daemon-reload || true
        fi
        start="systemctl enable --now $NAME"
        ;;
    sysv)
        install -d -m 0755 "$DESTDIR$INITDIR"
        subst "$SRC/init/$NAME" > "$DESTDIR$INITDIR/$NAME"
        chmod 0755 "$DESTDIR$INITDIR/$NAME"
        start="update-rc.d $NAME defaults && service $NAME start"
        ;;
    none)
        start="$SBINDIR/$NAME run --config $CONFIG"
        ;;
esac

cat <<MSG

ratelimit-policyd is installed. Next steps:

  1. Review $CONFIG
     ($SBINDIR/$NAME check-config --config $CONFIG prints what is in force).
  2. Start it:  $start
  3. In /etc/postfix/main.cf, before your other sender restrictions:
       smtpd_sender_restrictions =
           check_policy_service { unix:ratelimit/policy, default_action=DUNNO }
           ...
     then: postfix reload
  4. Watch it:  $SBINDIR/$NAME status --config $CONFIG
  MySQL/MariaDB instead of SQLite: create the tables from $DOCDIR/schema.sql
  (mysql policyd < $DOCDIR/schema.sql; on a Perl daemon's database
  $DOCDIR/schema-migrate.sql instead) and set database.url in $CONFIG.
MSG
