#!/usr/bin/env bash
# End-to-end tests: a private Postfix 3.7 with Cyrus SASL, driven by swaks,
# asking the freshly built ratelimit-policyd. Run as root (Postfix's master
# must start as root):
#
#   cargo build && tests/e2e/run.sh
#
# Everything lives in a temp dir: Postfix's config, queue and data
# directories, a sasldb, the daemon's database and sockets. Postfix listens on
# 127.0.0.1 on a free high port, resolves nothing and delivers nothing (every
# transport is discard:). Everything started here is stopped by PID, and the
# temp dir removed, also when a scenario fails.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${RATELIMIT_POLICYD_BIN:-$ROOT/target/debug/ratelimit-policyd}
MYSQL_ADMIN=${RATELIMIT_TEST_MYSQL:-"--protocol=tcp -h127.0.0.1 -P3306 -uroot"}
export PATH="$PATH:/usr/sbin:/sbin"

say() { printf '\n--- %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

# --- packages --------------------------------------------------------------
missing=()
for pair in postfix:postfix swaks:swaks saslpasswd2:sasl2-bin; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
[ -e /usr/lib/x86_64-linux-gnu/sasl2/libsasldb.so ] || [ -n "$(find /usr/lib -name 'libsasldb.so*' 2>/dev/null | head -1)" ] ||
    missing+=(libsasl2-modules-db)
[ -n "$(find /usr/lib -name 'libplain.so*' 2>/dev/null | head -1)" ] || missing+=(libsasl2-modules)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix swaks sasl2-bin libsasl2-modules libsasl2-modules-db >/dev/null
fi
[ -x "$BIN" ] || fail "no daemon binary at $BIN (cargo build first)"

# --- temp dir and cleanup --------------------------------------------------
WORK=$(mktemp -d /tmp/rl-e2e.XXXXXX)
chmod 755 "$WORK"
CONF=$WORK/postfix
DAEMON_PID=""
POSTFIX_UP=0
cleanup() {
    rc=$?
    if [ -n "$DAEMON_PID" ]; then kill "$DAEMON_PID" 2>/dev/null || true; wait "$DAEMON_PID" 2>/dev/null || true; fi
    if [ "$POSTFIX_UP" = 1 ]; then
        postfix -c "$CONF" stop >/dev/null 2>&1 || true
        # postfix stop returns before master has exited: wait for its PID.
        pid=$(tr -d ' ' < "$WORK/queue/pid/master.pid" 2>/dev/null) || pid=""
        if [ -n "$pid" ]; then
            for _ in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    if [ -n "${MYSQL_DB:-}" ]; then
        # shellcheck disable=SC2086
        mariadb $MYSQL_ADMIN -e "DROP DATABASE IF EXISTS $MYSQL_DB" >/dev/null 2>&1 || true
    fi
    if [ $rc -ne 0 ]; then
        echo "--- postfix log (tail)"; tail -n 30 "$WORK/log/postfix.log" 2>/dev/null || true
        echo "--- daemon log (tail)"; tail -n 30 "$WORK"/*/daemon.log 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
SMTP_PORT=$(free_port)
POLICY_PORT=$(free_port)

# --- private Postfix -------------------------------------------------------
mkdir -p "$CONF/sasl" "$WORK/queue" "$WORK/data" "$WORK/log"
chown postfix "$WORK/data"          # Debian's 3.7 insists
cat > "$CONF/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $WORK/queue
data_directory = $WORK/data
myhostname = e2e.test
mydomain = e2e.test
mydestination =
relayhost =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# No DNS, no delivery.
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
default_transport = discard:e2e
relay_transport = discard:e2e
local_transport = discard:e2e
virtual_transport = discard:e2e
# No syslog daemon here: Postfix's own log file, through postlogd.
maillog_file = $WORK/log/postfix.log
maillog_file_prefixes = $WORK/log
# Cyrus SASL; Debian's Postfix reads \$config_directory/sasl/smtpd.conf.
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
smtpd_sasl_security_options = noanonymous
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_policy_service_retry_delay = 1s
# Set per scenario:
smtpd_sender_restrictions =
smtpd_recipient_restrictions =
smtpd_data_restrictions =
smtpd_end_of_data_restrictions =
EOF
# Only what receiving and discarding needs; no smtp/lmtp/local/pipe agents.
cat > "$CONF/master.cf" <<EOF
127.0.0.1:$SMTP_PORT inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
EOF
cat > "$CONF/sasl/smtpd.conf" <<EOF
pwcheck_method: auxprop
auxprop_plugin: sasldb
sasldb_path: $WORK/sasldb2
mech_list: PLAIN LOGIN
EOF
for user in alice bob; do
    echo "secret-$user" | saslpasswd2 -p -c -f "$WORK/sasldb2" -u e2e.test "$user"
done
chown postfix "$WORK/sasldb2"

postconf() { command postconf -c "$CONF" "$@"; }
postfix -c "$CONF" check
postfix -c "$CONF" start >/dev/null
POSTFIX_UP=1
for _ in $(seq 1 100); do
    swaks --server "127.0.0.1:$SMTP_PORT" --quit-after CONNECT >/dev/null 2>&1 && break
    sleep 0.1
done
swaks --server "127.0.0.1:$SMTP_PORT" --quit-after CONNECT >/dev/null 2>&1 || fail "Postfix does not answer on port $SMTP_PORT"
echo "Postfix $(postconf -h mail_version) on 127.0.0.1:$SMTP_PORT"

# restrictions LIST VALUE: sets one restriction list and reloads Postfix.
restrictions() {
    postconf -e "$1 = $2"
    postfix -c "$CONF" reload >/dev/null 2>&1
}
clear_restrictions() {
    for list in smtpd_sender_restrictions smtpd_recipient_restrictions smtpd_data_restrictions smtpd_end_of_data_restrictions; do
        postconf -e "$list ="
    done
}
POLICY="check_policy_service { inet:127.0.0.1:$POLICY_PORT, default_action=DUNNO }"

# --- the daemon ------------------------------------------------------------
# start_daemon DIR [LIMITS...] [--mysql URL]: writes DIR/config.toml once and
# starts the daemon; waits for its "listening on" line.
start_daemon() {
    local dir=$1; shift
    mkdir -p "$dir"
    if [ ! -f "$dir/config.toml" ]; then
        local url="sqlite://$dir/ratelimit.db"
        local limits=""
        while [ $# -gt 0 ]; do
            case "$1" in
                --mysql) url=$2; shift 2 ;;
                *) limits+="$1"$'\n'; shift ;;
            esac
        done
        cat > "$dir/config.toml" <<EOF
listen = "127.0.0.1:$POLICY_PORT"
control_socket = "$dir/control.sock"
[limits]
timezone = "UTC"
$limits
[database]
url = "$url"
[log]
syslog = false
file = "$dir/daemon.log"
EOF
    fi
    "$BIN" run --config "$dir/config.toml" --quiet &
    DAEMON_PID=$!
    for _ in $(seq 1 100); do
        "$BIN" status --config "$dir/config.toml" --top 0 >/dev/null 2>&1 && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || fail "the daemon exited at start"
        sleep 0.1
    done
    fail "the daemon did not start"
}
stop_daemon() {
    kill -TERM "$DAEMON_PID"
    local rc=0
    wait "$DAEMON_PID" || rc=$?
    DAEMON_PID=""
    [ "$rc" = 0 ] || fail "the daemon exited with $rc"
}
# used DIR KEY: the key's `used` according to the running daemon (0 if unknown).
used() {
    "$BIN" status --config "$1/config.toml" --json "$2" |
        python3 -c 'import json,sys; c=json.load(sys.stdin)["counters"]; print(c[0]["used"] if c else 0)'
}
# decisions DIR KIND: how many requests the running daemon decided as KIND.
decisions() {
    "$BIN" status --config "$1/config.toml" --json --top 0 |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["decisions"][sys.argv[1]])' "$2"
}
# stored DIR KEY: `used` in the daemon's SQLite file.
stored() {
    python3 - "$1/ratelimit.db" "$2" <<'EOF'
import sqlite3, sys
row = sqlite3.connect(sys.argv[1]).execute("SELECT used FROM ratelimit WHERE sender = ?", (sys.argv[2],)).fetchone()
print(row[0] if row else 0)
EOF
}

# --- swaks -----------------------------------------------------------------
# send USER|- TO[,TO...] [swaks options]: one message; prints the transcript.
# USER "-" sends without AUTH.
send() {
    local user=$1 to=$2; shift 2
    local auth=()
    if [ "$user" != - ]; then
        auth=(--auth PLAIN --auth-user "$user@e2e.test" --auth-password "secret-$user")
    fi
    swaks --server "127.0.0.1:$SMTP_PORT" --ehlo client.e2e.test --from "${user/-/anon}@e2e.test" --to "$to" \
        "${auth[@]}" --header "Subject: e2e" --body "hello" "$@" 2>&1 || true
}
# expect TRANSCRIPT PATTERN COUNT WHAT: the transcript has COUNT lines matching PATTERN.
expect() {
    local n
    n=$(grep -cE "$2" <<<"$1" || true)
    [ "$n" = "$3" ] || { echo "$1"; fail "$4: expected $3 lines matching /$2/, got $n"; }
}
expect_eq() { [ "$1" = "$2" ] || fail "$3: expected $2, got $1"; }

RCPT_OK='^ *<- *250 2\.1\.5 Ok'
QUEUED='^ *<- *250 2\.0\.0 Ok: queued'

# --- scenarios -------------------------------------------------------------
scenario1() {  # $1: extra daemon args (e.g. --mysql URL); $2: label
    local dir=$WORK/s1$2
    say "1$2: smtpd_sender_restrictions (delay_reject=yes), quota 4, 2 messages x 3 recipients"
    clear_restrictions
    restrictions smtpd_sender_restrictions "$POLICY"
    # shellcheck disable=SC2086
    start_daemon "$dir" "default_quota = 4" $1
    local t1 t2
    t1=$(send alice r1@example.com,r2@example.com,r3@example.com)
    expect "$t1" "$RCPT_OK" 3 "message 1: all 3 recipients accepted"
    expect "$t1" "$QUEUED" 1 "message 1 queued"
    t2=$(send alice r4@example.com,r5@example.com,r6@example.com)
    [ -z "${E2E_VERBOSE:-}" ] || echo "$t2"
    expect "$t2" "$RCPT_OK" 1 "message 2: 1 recipient accepted (4 in all)"
    expect "$t2" '^ *<\*\* *450 4\.7\.1 ' 2 "message 2: 2 recipients deferred with 450 4.7.1"
    expect "$t2" 'daily sender quota exceeded \(5/4\), resets [0-9]{4}-[0-9]{2}-[0-9]{2} 00:00 UTC' 1 "first refusal text"
    expect "$t2" 'daily sender quota exceeded \(6/4\), resets ' 1 "second refusal text"
    expect "$t2" "$QUEUED" 1 "message 2 queued with its accepted recipient"
    local t3
    t3=$(send bob b1@example.com,b2@example.com,b3@example.com)
    expect "$t3" "$RCPT_OK" 3 "bob is not affected"
    local t4
    t4=$(send - u1@example.com,u2@example.com)
    expect "$t4" "$RCPT_OK" 2 "unauthenticated mail from mynetworks flows"
    expect_eq "$(used "$dir" alice@e2e.test)" 6 "alice: 4 accepted + 2 refused counted"
    expect_eq "$(used "$dir" bob@e2e.test)" 3 "bob"
    expect_eq "$(decisions "$dir" unauthenticated)" 2 "the unauthenticated queries were answered uncharged"
    expect_eq "$(decisions "$dir" over_quota)" 2 "two refusals"
    stop_daemon
    if [ -z "$2" ]; then
        expect_eq "$(stored "$dir" alice@e2e.test)" 6 "alice's count in SQLite"
        expect_eq "$(stored "$dir" bob@e2e.test)" 3 "bob's count in SQLite"
    fi
    echo "ok: 4 of 6 recipients accepted, 2 x 450 4.7.1 with used/quota/reset; bob 3/3; unauthenticated uncharged"
}

scenario2() {
    local dir=$WORK/s2
    say "2: smtpd_data_restrictions, charge_stage = DATA, quota 4"
    clear_restrictions
    restrictions smtpd_data_restrictions "$POLICY"
    start_daemon "$dir" "default_quota = 4" 'charge_stage = "DATA"'
    local t1 t2
    t1=$(send alice r1@example.com,r2@example.com,r3@example.com)
    expect "$t1" "$QUEUED" 1 "message 1 (3 recipients) accepted"
    expect_eq "$(used "$dir" alice@e2e.test)" 3 "charged recipient_count at DATA"
    t2=$(send alice r4@example.com,r5@example.com)
    expect "$t2" '^ *<\*\* *450 4\.7\.1 .*sender quota exceeded \(5/4\)' 1 "message 2 deferred at DATA"
    expect "$t2" "$QUEUED" 0 "message 2 not queued"
    expect_eq "$(used "$dir" alice@e2e.test)" 5 "3 + 2"
    stop_daemon
    echo "ok: charged by recipient_count (3, then 2 refused at DATA)"
}

scenario3() {
    local dir=$WORK/s3
    say "3: smtpd_end_of_data_restrictions, count = messages, quota 2"
    clear_restrictions
    restrictions smtpd_end_of_data_restrictions "$POLICY"
    start_daemon "$dir" "default_quota = 2" 'charge_stage = "END-OF-MESSAGE"' 'count = "messages"'
    local t
    for n in 1 2; do
        t=$(send alice "r1@example.com,r2@example.com,r3@example.com")
        expect "$t" "$QUEUED" 1 "message $n accepted"
    done
    t=$(send alice r1@example.com)
    expect "$t" '^ *<\*\* *450 4\.7\.1 .*sender quota exceeded \(3/2\)' 1 "message 3 deferred after its data"
    expect "$t" "$QUEUED" 0 "message 3 not queued"
    expect_eq "$(used "$dir" alice@e2e.test)" 3 "messages, not recipients"
    stop_daemon
    echo "ok: 2 messages of 3 recipients accepted, the 3rd deferred at end of data"
}

scenario4() {
    local dir=$WORK/s4
    say "4: the same check_policy_service in sender and recipient restrictions"
    clear_restrictions
    postconf -e "smtpd_sender_restrictions = $POLICY"
    restrictions smtpd_recipient_restrictions "$POLICY, permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
    start_daemon "$dir" "default_quota = 10"
    local t
    t=$(send alice r1@example.com,r2@example.com,r3@example.com)
    expect "$t" "$RCPT_OK" 3 "3 recipients accepted"
    expect_eq "$(used "$dir" alice@e2e.test)" 3 "each recipient charged once although asked twice"
    expect_eq "$(decisions "$dir" duplicate)" 3 "three repeats recognised"
    stop_daemon
    echo "ok: 6 queries, 3 charged, 3 recognised as repeats"
}

scenario5() {
    local dir=$WORK/s5
    say "5: the daemon restarts between messages"
    clear_restrictions
    restrictions smtpd_sender_restrictions "$POLICY"
    start_daemon "$dir" "default_quota = 3"
    local t
    t=$(send alice r1@example.com,r2@example.com)
    expect "$t" "$RCPT_OK" 2 "message 1 before the restart"
    stop_daemon
    start_daemon "$dir"
    # smtpd's cached connection to the old daemon is dead: Postfix reconnects.
    t=$(send alice r3@example.com,r4@example.com)
    expect "$t" "$RCPT_OK" 1 "message 2: the count survived the restart (3 of 3)"
    expect "$t" 'sender quota exceeded \(4/3\)' 1 "message 2: the 4th recipient is refused"
    stop_daemon
    expect_eq "$(stored "$dir" alice@e2e.test)" 4 "stored count"
    echo "ok: Postfix carried on across the restart and the count survived"
}

scenario6() {
    say "6: the daemon is stopped"
    clear_restrictions
    restrictions smtpd_sender_restrictions "$POLICY"
    local t
    t=$(send alice r1@example.com)
    expect "$t" "$RCPT_OK" 1 "default_action=DUNNO: mail flows"
    restrictions smtpd_sender_restrictions "check_policy_service inet:127.0.0.1:$POLICY_PORT"
    t=$(send alice r1@example.com)
    expect "$t" '^ *<\*\* *451 4\.3\.5 ' 1 "Postfix's default: 451 4.3.5"
    echo "ok: DUNNO fail-open delivers; the default answers 451 4.3.5"
}

scenario7() {
    say "7: scenario 1 on MySQL/MariaDB"
    # shellcheck disable=SC2086
    if ! mariadb $MYSQL_ADMIN -e "SELECT 1" >/dev/null 2>&1; then
        fail "no MariaDB on 127.0.0.1:3306 (see .ci/run)"
    fi
    MYSQL_DB="rl_e2e_$$"
    # shellcheck disable=SC2086
    mariadb $MYSQL_ADMIN -e "CREATE DATABASE $MYSQL_DB CHARACTER SET utf8"
    # shellcheck disable=SC2086
    mariadb $MYSQL_ADMIN "$MYSQL_DB" < "$ROOT/schema.sql"
    scenario1 "--mysql mysql://root@127.0.0.1:3306/$MYSQL_DB" "-mysql"
    local stored
    # shellcheck disable=SC2086
    stored=$(mariadb $MYSQL_ADMIN -N "$MYSQL_DB" -e "SELECT used FROM ratelimit WHERE sender = 'alice@e2e.test'")
    expect_eq "$stored" 6 "alice's count in MySQL"
    echo "ok: the same on MySQL; 6 stored"
}

scenario8() {
    local dir=$WORK/s8 spool=$WORK/queue/ratelimit
    say "8: the installed recipe: unix:ratelimit/policy, daemon as an unprivileged user"
    # As install.sh makes it: the daemon's user, group postfix, setgid.
    install -d -o nobody -g postfix -m 2750 "$spool"
    install -d -o nobody -m 0750 "$dir"
    cat > "$dir/config.toml" <<EOF
listen = "unix:$spool/policy"
control_socket = "$dir/control.sock"
[limits]
timezone = "UTC"
default_quota = 2
[database]
url = "sqlite://$dir/ratelimit.db"
[log]
syslog = false
file = "$dir/daemon.log"
EOF
    chown nobody "$dir/config.toml"
    # setpriv execs the daemon itself (no parent in between): its exit code is ours.
    setpriv --reuid=nobody --regid=nogroup --clear-groups "$BIN" run --config "$dir/config.toml" --quiet &
    DAEMON_PID=$!
    for _ in $(seq 1 100); do
        [ -S "$spool/policy" ] && break
        kill -0 "$DAEMON_PID" 2>/dev/null || fail "the daemon exited at start"
        sleep 0.1
    done
    [ -S "$spool/policy" ] || fail "no socket at $spool/policy"
    expect_eq "$(stat -c '%a %G' "$spool/policy")" "660 postfix" "the socket's mode and group"
    # Another local user cannot reach it.
    if runuser -u daemon -- python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])" "$spool/policy" 2>/dev/null; then
        fail "user daemon could connect to the policy socket"
    fi
    clear_restrictions
    restrictions smtpd_sender_restrictions "check_policy_service { unix:ratelimit/policy, default_action=DUNNO }"
    local t
    t=$(send alice r1@example.com,r2@example.com,r3@example.com)
    expect "$t" "$RCPT_OK" 2 "2 recipients accepted through the unix socket"
    expect "$t" '^ *<\*\* *450 4\.7\.1 .*sender quota exceeded \(3/2\)' 1 "the third deferred"
    kill -TERM "$DAEMON_PID"
    local rc=0
    wait "$DAEMON_PID" || rc=$?
    DAEMON_PID=""
    [ "$rc" = 0 ] || fail "the daemon exited with $rc"
    expect_eq "$(stored "$dir" alice@e2e.test)" 3 "alice's count, written by the unprivileged daemon"
    echo "ok: Postfix reached the daemon at unix:ratelimit/policy (660, group postfix); user daemon could not"
}

started=$(date +%s)
scenario1 "" ""
scenario2
scenario3
scenario4
scenario5
scenario6
scenario7
scenario8
echo
echo "e2e: 8 passed, 0 failed ($(( $(date +%s) - started )) s)"
