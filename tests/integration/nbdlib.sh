# Shell helpers of the NBD integration tests, sourced by them:
#   . "$(dirname "$0")/nbdlib.sh"
# Servers listen on Unix sockets in the test's temp dir or on 127.0.0.1,
# never another address. The waits are bounded (60 s) so that a server
# that never listens fails the test instead of hanging it; they assert
# no timing.

fail=0
# bad MESSAGE: the test fails at the end, after the other checks ran.
bad() {
	echo "FAIL: $*"
	fail=1
}

# nbd_wait_unix SOCK PID LOG: until the server PID listens on SOCK; exits
# the test (printing LOG) if it exits first or never listens.
nbd_wait_unix() {
	i=0
	while [ ! -S "$1" ]; do
		if ! kill -0 "$2" 2>/dev/null; then
			echo "server for $1 exited:"
			cat "$3"
			exit 1
		fi
		i=$((i + 1))
		if [ $i -gt 600 ]; then
			echo "server for $1: no socket after 60 s"
			exit 1
		fi
		sleep 0.1
	done
}

# nbd_free_port: a TCP port of 127.0.0.1 nobody listens on right now.
nbd_free_port() {
	python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# nbd_wait_tcp PORT PID: 0 once 127.0.0.1:PORT accepts, 1 if PID exited
# first (another program may have taken the port), 2 after 60 s.
nbd_wait_tcp() {
	python3 - "$1" "$2" <<'EOF'
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
for _ in range(600):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        sys.exit(0)
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(1)
    time.sleep(0.1)
sys.exit(2)
EOF
}
