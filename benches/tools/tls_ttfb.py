#!/usr/bin/env python3
"""Time to first byte on new TLS connections (used by benches/run.sh).

  tls_ttfb.py ttfb HOST PORT PATH --ca CERT --count N [--warmup W] [--deadline SECS]
  tls_ttfb.py rate HOST PORT PATH --ca CERT --secs S --concurrency C

Every request is made on a NEW TCP connection with a full TLS 1.3 handshake: the client
keeps no session (no ticket or PSK is ever offered, so nothing is resumed), offers only
`http/1.1` in ALPN, sends no SNI (the host is an IP address) and checks the server's
certificate against --ca (the run's self-signed certificate, whose name is 127.0.0.1).
The request is `GET PATH HTTP/1.1` with `Connection: close`; the answer must be a 200
with its whole Content-Length body.

ttfb: N sequential connections (after W uncounted warm-up ones). For each, the clock
(time.perf_counter) starts just before the TCP connect; "handshake" is when the client's
side of the handshake is done (TCP connect included), "ttfb" when the first byte of the
response has been read. Prints one line:
  TLSRESULT count=N ok=N errors=N secs=S hs_p50_us=.. hs_p99_us=.. ttfb_p50_us=..
            ttfb_p90_us=.. ttfb_p99_us=.. ttfb_max_us=.. version=.. cipher=.. alpn=..
            resumed=N
and up to 3 `ERROR n x what` lines. Stops at --deadline seconds whatever is left.

rate: C client processes, each doing the same in a loop for S seconds. Prints
  TLSRATE conns=N errors=N secs=S rate=R
(connections completed per second, all processes together).

Loopback addresses only; every step has a timeout.
"""
import argparse
import math
import os
import socket
import ssl
import sys
import time


def context(ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca)
    ctx.set_alpn_protocols(["http/1.1"])
    # No resumption: wrap_socket is never given a `session`, so each connection makes a
    # full handshake (the servers still send their usual TLS 1.3 tickets; they go unused).
    return ctx


class Failure(Exception):
    pass


def one(ctx, host, port, request, timeout):
    """One new connection, one request: (handshake s, first byte s, (version, cipher, alpn,
    resumed))."""
    t0 = time.perf_counter()
    raw = socket.create_connection((host, port), timeout=timeout)
    tls = None
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = ctx.wrap_socket(raw, server_hostname=host)  # the handshake, blocking
        t_hs = time.perf_counter()
        tls.sendall(request)
        data = tls.recv(65536)
        t_fb = time.perf_counter()
        if not data:
            raise Failure("closed before any response byte")
        # The rest of the answer: the head, then Content-Length bytes.
        while b"\r\n\r\n" not in data:
            more = tls.recv(65536)
            if not more:
                raise Failure("closed inside the response head")
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "200":
            raise Failure(f"status line {lines[0][:40]!r}")
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length is None:
            raise Failure("no Content-Length")
        while len(body) < length:
            more = tls.recv(65536)
            if not more:
                raise Failure("closed inside the body")
            body += more
        info = (tls.version(), tls.cipher()[0], tls.selected_alpn_protocol(), tls.session_reused)
        return t_hs - t0, t_fb - t0, info
    finally:
        # wrap_socket takes the descriptor over: close whichever object holds it.
        (tls if tls is not None else raw).close()


def pct(sorted_values, p):
    """Nearest-rank percentile."""
    if not sorted_values:
        return 0.0
    k = max(0, math.ceil(p / 100.0 * len(sorted_values)) - 1)
    return sorted_values[k]


def describe(e):
    return type(e).__name__ + (f": {e}" if str(e) else "")


def run_ttfb(a, ctx, request):
    errors = {}
    for _ in range(a.warmup):
        try:
            one(ctx, a.host, a.port, request, a.timeout)
        except Exception:  # noqa: BLE001 - warm-up failures show again in the counted part
            pass
    hs, fb = [], []
    info = ("?", "?", "?", False)
    resumed = 0
    start = time.perf_counter()
    done = 0
    for _ in range(a.count):
        if time.perf_counter() - start > a.deadline:
            errors["deadline reached"] = a.count - done
            break
        done += 1
        try:
            h, f, info = one(ctx, a.host, a.port, request, a.timeout)
        except Exception as e:  # noqa: BLE001 - any failure counts, its kind is reported
            errors[describe(e)] = errors.get(describe(e), 0) + 1
            continue
        hs.append(h)
        fb.append(f)
        resumed += bool(info[3])
    secs = time.perf_counter() - start
    hs.sort()
    fb.sort()
    us = (lambda v: int(round(v * 1e6)))
    version, cipher, alpn, _ = info
    n_err = sum(errors.values())
    print(f"TLSRESULT count={a.count} ok={len(fb)} errors={n_err} secs={secs:.3f} "
          f"hs_p50_us={us(pct(hs, 50))} hs_p99_us={us(pct(hs, 99))} "
          f"ttfb_p50_us={us(pct(fb, 50))} ttfb_p90_us={us(pct(fb, 90))} "
          f"ttfb_p99_us={us(pct(fb, 99))} ttfb_max_us={us(fb[-1] if fb else 0)} "
          f"version={version} cipher={cipher} alpn={alpn} resumed={resumed}", flush=True)
    for what, n in sorted(errors.items(), key=lambda kv: -kv[1])[:3]:
        print(f"ERROR {n} x {what}", flush=True)


def rate_worker(a, ctx, request, end, out_fd):
    conns = errors = 0
    while time.perf_counter() < end:
        try:
            one(ctx, a.host, a.port, request, a.timeout)
            conns += 1
        except Exception:  # noqa: BLE001 - counted
            errors += 1
    os.write(out_fd, f"{conns} {errors}\n".encode())


def run_rate(a, ctx, request):
    start = time.perf_counter()
    end = start + a.secs
    children = []
    for _ in range(a.concurrency):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                rate_worker(a, ctx, request, end, w)
            except BaseException:  # noqa: BLE001 - the parent counts a silent child as failed
                code = 1
            os._exit(code)
        os.close(w)
        children.append((pid, r))
    conns = errors = 0
    for pid, r in children:
        with os.fdopen(r) as f:
            line = f.read().split()
        os.waitpid(pid, 0)
        if len(line) == 2:
            conns += int(line[0])
            errors += int(line[1])
        else:
            errors += 1
    secs = time.perf_counter() - start
    print(f"TLSRATE conns={conns} errors={errors} secs={secs:.3f} rate={conns / secs:.1f}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["ttfb", "rate"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("path")
    p.add_argument("--ca", required=True, help="PEM certificate the server must present")
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--deadline", type=float, default=30.0, help="seconds, for the counted part")
    p.add_argument("--secs", type=float, default=3.0, help="rate: how long")
    p.add_argument("--concurrency", type=int, default=4, help="rate: client processes")
    p.add_argument("--timeout", type=float, default=5.0, help="per socket operation")
    a = p.parse_args()
    if not a.host.startswith("127.") and a.host not in ("localhost", "::1"):
        sys.exit("loopback addresses only")
    ctx = context(a.ca)
    request = (f"GET {a.path} HTTP/1.1\r\nHost: {a.host}:{a.port}\r\n"
               f"User-Agent: tls-ttfb\r\nConnection: close\r\n\r\n").encode()
    if a.mode == "ttfb":
        run_ttfb(a, ctx, request)
    else:
        run_rate(a, ctx, request)


if __name__ == "__main__":
    main()
