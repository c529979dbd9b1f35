#!/usr/bin/env python3
"""benches/pull_many.py — many pulls through blobstage's daemon, end to end.

Used by benches/run.sh (part 4). Talks HTTP/1.1 to `blobstage serve` over its Unix socket,
like `blobstage pull` does (a new connection per request, `Connection: close`):

    POST /v1/pulls {"artifact_id": ID}            -> the pull, with its "id" and "state"
    GET  /v1/pulls/<pull id>?wait=30s  (repeated) -> until "state" is "staged"

CLIENTS workers take artifact ids from a shared queue, one pull at a time each, so at most
CLIENTS pulls are in flight. Prints one JSON object: pulls, errors, wall seconds from the first
request to the last pull staged, pulls per second, and per-pull latency percentiles (POST to
staged). Standard library only. Exits 1 if any pull failed.

usage: pull_many.py SOCKET IDS_FILE CLIENTS [TIMEOUT_SECONDS]
"""

import asyncio
import json
import sys
import time

MAX_POLLS = 100  # GETs with wait=30s per pull at most: the loop is bounded


async def call(socket_path, method, path, body=None):
    reader, writer = await asyncio.open_unix_connection(socket_path)
    try:
        data = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        writer.write(head.encode() + data)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = b"", payload
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            n = int(size_line.split(b";")[0], 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2 :]
        payload = out
    return status, (json.loads(payload) if payload.strip() else None)


async def pull(socket_path, artifact_id):
    status, p = await call(socket_path, "POST", "/v1/pulls", {"artifact_id": artifact_id})
    if status not in (200, 201, 202):
        raise RuntimeError(f"POST {artifact_id}: HTTP {status}: {p}")
    for _ in range(MAX_POLLS):
        state = p.get("state")
        if state == "staged":
            return
        if state in ("failed", "cancelled"):
            raise RuntimeError(f"{artifact_id}: {state}: {p}")
        status, p = await call(socket_path, "GET", f"/v1/pulls/{p['id']}?wait=30s")
        if status != 200:
            raise RuntimeError(f"GET pull of {artifact_id}: HTTP {status}: {p}")
    raise RuntimeError(f"{artifact_id}: not staged after {MAX_POLLS} waits")


async def main():
    socket_path, ids_file, clients = sys.argv[1], sys.argv[2], int(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 600.0
    ids = [line.strip() for line in open(ids_file) if line.strip()]
    queue = asyncio.Queue()
    for i in ids:
        queue.put_nowait(i)
    latencies, errors = [], []

    async def worker():
        while True:
            try:
                artifact_id = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.monotonic()
            try:
                await pull(socket_path, artifact_id)
                latencies.append(time.monotonic() - t0)
            except Exception as e:  # counted, the first one printed
                errors.append(f"{artifact_id}: {e}")

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout)
    wall = time.monotonic() - t0
    latencies.sort()

    def pct(q):
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)

    print(json.dumps({
        "pulls": len(ids), "staged": len(latencies), "errors": len(errors),
        "first_error": errors[0] if errors else None, "wall_s": round(wall, 3),
        "per_s": round(len(latencies) / wall, 1) if wall > 0 else None,
        "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": pct(1.0),
    }))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
