#!/usr/bin/env python3
"""Open N keep-alive client connections, send one request on each, then hold them idle.

  idle_conns.py HOST PORT PATH COUNT --hold SECS [--concurrency C] [--deadline SECS]

Each connection sends `GET PATH HTTP/1.1`, reads the whole response (Content-Length or
chunked) and stays open without sending anything else. Once every connection has been
tried (or the open deadline passed) it prints `READY opened=N failed=N secs=S` and holds
them for --hold seconds, then checks which are still open (a closed one reads EOF) and
prints `DONE held=N closed_by_server=N`. Every step is bounded in time; it only talks to
the address it is given (run.sh gives it a loopback one).
"""
import argparse
import asyncio
import resource
import sys
import time


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, chunked = None, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def open_one(host, port, path, sem, timeout, held):
    async with sem:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: idle-conns\r\n\r\n".encode())
            status = await asyncio.wait_for(read_response(reader), timeout)
            if status != 200:
                raise RuntimeError(f"status {status}")
            held.append((reader, writer))
            return None
        except Exception as e:  # noqa: BLE001 - any failure counts, its kind is reported
            if writer is not None:
                writer.close()
            return type(e).__name__ + (f": {e}" if str(e) else "")


async def still_open(reader):
    try:
        data = await asyncio.wait_for(reader.read(1), 0.05)
    except asyncio.TimeoutError:
        return True  # nothing to read and no EOF: still open
    except OSError:
        return False
    return bool(data)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("path")
    p.add_argument("count", type=int)
    p.add_argument("--hold", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--deadline", type=float, default=60.0, help="for opening them all")
    a = p.parse_args()
    if not a.host.startswith("127.") and a.host not in ("localhost", "::1"):
        sys.exit("loopback addresses only")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    held = []
    sem = asyncio.Semaphore(a.concurrency)
    start = time.monotonic()
    tasks = [asyncio.ensure_future(open_one(a.host, a.port, a.path, sem, a.timeout, held))
             for _ in range(a.count)]
    done, pending = await asyncio.wait(tasks, timeout=a.deadline)
    for t in pending:
        t.cancel()
    errors = {}
    for t in done:
        err = t.result()
        if err:
            errors[err] = errors.get(err, 0) + 1
    failed = a.count - len(held)
    secs = time.monotonic() - start
    print(f"READY opened={len(held)} failed={failed} secs={secs:.1f}", flush=True)
    for err, n in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
        print(f"ERROR {n} x {err}", flush=True)
    await asyncio.sleep(a.hold)
    alive = 0
    for i in range(0, len(held), 500):
        alive += sum(await asyncio.gather(*(still_open(r) for r, _ in held[i:i + 500])))
    print(f"DONE held={alive} closed_by_server={len(held) - alive}", flush=True)
    for _, w in held:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
