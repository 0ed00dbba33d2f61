#!/usr/bin/env python3
"""Full TLS handshakes against one HTTPS listener, for benches/compare.sh (tls-full).

Each of PROCS processes loops for SECONDS: TCP connect to 127.0.0.1:PORT, TLS handshake
with SNI `bench.local` and no session offered (Python's ssl module never resumes unless
given a session, so every handshake is a full one), one `GET /` with `Connection:
close`, read to EOF, close. Certificates are not verified: the client's own cost per
handshake is kept small, since the figure of interest is the server's CPU per
handshake. Loopback only; bounded by SECONDS and by MAX_PER_PROC handshakes per process.

Prints one line: `handshakes N seconds S non200 M errors E`.

Usage: tls_full_client.py PORT SECONDS PROCS
"""

import multiprocessing
import socket
import ssl
import sys
import time

MAX_PER_PROC = 200_000


def worker(port: int, seconds: float, out) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    request = b"GET / HTTP/1.1\r\nHost: bench.local\r\nConnection: close\r\n\r\n"
    done = non200 = errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and done + errors < MAX_PER_PROC:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with ctx.wrap_socket(raw, server_hostname="bench.local") as tls:
                    tls.sendall(request)
                    head = b""
                    while True:
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        head += chunk if len(head) < 64 else b""
            done += 1
            if not head.startswith(b"HTTP/1.1 200"):
                non200 += 1
        except (OSError, ssl.SSLError):
            errors += 1
    out.put((done, non200, errors))


def main() -> None:
    port, seconds, procs = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    out = multiprocessing.Queue()
    started = time.monotonic()
    workers = [
        multiprocessing.Process(target=worker, args=(port, seconds, out)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    totals = [0, 0, 0]
    for _ in workers:
        for i, v in enumerate(out.get()):
            totals[i] += v
    for w in workers:
        w.join()
    elapsed = time.monotonic() - started
    print(f"handshakes {totals[0]} seconds {elapsed:.3f} non200 {totals[1]} errors {totals[2]}")


if __name__ == "__main__":
    main()
