"""Replays hostile-client classes against a running voxpoll binary on loopback and prints a
table: class, status, JSON shape, server alive, peak RSS. Exit 1 when any row fails.

Usage: python3 scripts/hostile.py path/to/voxpoll   (scripts/hostile builds and runs it)
Standard library only; every class is bounded in time.
"""

import base64
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

BIN = sys.argv[1]
TMP = tempfile.mkdtemp(prefix="voxpoll-hostile-")
DB = os.path.join(TMP, "hostile.db")


def start_server(db, *extra):
    env = dict(os.environ, RUST_LOG="voxpoll=info", NO_COLOR="1")
    p = subprocess.Popen(
        [BIN, "serve", "--host", "127.0.0.1", "--port", "0", "--db", db,
         "--header-read-timeout-ms", "2000", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + 120
    for line in p.stderr:
        m = re.search(r"addr=(\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, m.group(1)
        if time.time() > deadline:
            break
    raise SystemExit("server did not start")


# Creation rate high here (the burst class runs against a server of its own).
PROC, ADDR = start_server(DB, "--max-creates-per-s", "1000")
HOST, PORT = ADDR.rsplit(":", 1)
PORT = int(PORT)


def req(method, path, body=None, headers=None, timeout=30, port=None):
    c = http.client.HTTPConnection(HOST, port or PORT, timeout=timeout)
    h = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        h.setdefault("content-type", "application/json")
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    try:
        j = json.loads(data) if data else None
    except ValueError:
        j = None
    return r.status, j, dict(r.getheaders())


def shape_ok(j):
    return isinstance(j, dict) and isinstance(j.get("error"), dict) \
        and isinstance(j["error"].get("code"), str) and isinstance(j["error"].get("message"), str)


def alive():
    try:
        return req("GET", "/health", timeout=5)[0] == 200
    except OSError:
        return False


def rss_mb():
    with open(f"/proc/{PROC.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return -1


def create(body=None):
    s, j, _ = req("POST", "/v1/sessions", body or {"engine": "16k_zh"})
    return s, j


# --- classes: each returns (passed, status text, json shape ok or None) -----------------------

def chunked(path, total=1 << 30):
    s = socket.create_connection((HOST, PORT))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
              "Content-Type: application/octet-stream\r\n\r\n".encode())
    piece = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    sent, answer = 0, b""
    s.settimeout(0.0)
    deadline = time.time() + 30
    while sent < total and time.time() < deadline:
        try:
            answer += s.recv(65536)
            if b"\r\n\r\n" in answer:
                break
        except BlockingIOError:
            pass
        except OSError:
            break
        try:
            s.settimeout(1.0)
            s.sendall(piece)
            sent += 65536
            s.settimeout(0.0)
        except OSError:
            break
    s.settimeout(5)
    try:
        while b"}" not in answer:
            d = s.recv(65536)
            if not d:
                break
            answer += d
    except OSError:
        pass
    s.close()
    return answer.decode("latin1"), sent


def c_chunked_upload():
    a, sent = chunked("/v1/sessions/0b9f6d52-3c1e-4f6e-9a57-2f5e8c0d1a11/audio?seq=0")
    ok = a.startswith("HTTP/1.1 413") and "chunk_too_large" in a and sent < 64 << 20
    return ok, f"{a[9:12]} after {sent >> 20} MiB", "chunk_too_large" in a


def c_chunked_json():
    a, sent = chunked("/v1/sessions")
    return a.startswith("HTTP/1.1 413") and sent < 64 << 20, f"{a[9:12]} after {sent >> 20} MiB", "body_too_large" in a


def flac_bomb(frames):
    def crc8(d):
        c = 0
        for b in d:
            c ^= b
            for _ in range(8):
                c = ((c << 1) ^ 0x07) & 0xFF if c & 0x80 else (c << 1) & 0xFF
        return c

    def crc16(d):
        c = 0
        for b in d:
            c ^= b << 8
            for _ in range(8):
                c = ((c << 1) ^ 0x8005) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
        return c
    block = 65535
    out = bytearray(b"fLaC" + bytes([0x80, 0, 0, 34]))
    out += struct.pack(">HH", block, block) + b"\0" * 6
    out += struct.pack(">Q", (16000 << 44) | (15 << 36) | block * frames) + b"\0" * 16
    for n in range(frames):
        f = bytearray([0xFF, 0xF8, 0x75, 0x08])
        if n < 0x80:
            f.append(n)
        elif n < 0x800:
            f += bytes([0xC0 | n >> 6, 0x80 | n & 0x3F])
        else:
            f += bytes([0xE0 | n >> 12, 0x80 | (n >> 6) & 0x3F, 0x80 | n & 0x3F])
        f += struct.pack(">H", block - 1)
        f.append(crc8(f))
        f += b"\0\0\0"
        f += struct.pack(">H", crc16(f))
        out += f
    return bytes(out)


def c_flac_bomb():
    s, j, _ = req("POST", "/v1/recognize", flac_bomb(1800), {"content-type": "audio/flac"}, timeout=60)
    return s == 413 and j["error"]["code"] == "audio_too_long", f"{s} {j and j['error']['code']}", shape_ok(j)


def c_concurrent_creates():
    results = []

    def one():
        try:
            results.append(create({"engine": "16k_zh"}))
        except OSError:
            results.append((0, None))
    ts = [threading.Thread(target=one) for _ in range(150)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    created = sum(st == 201 for st, _ in results)
    refused = sum(st == 429 for st, _ in results)
    for st, j in results:  # free the budget for the classes after this one
        if st == 201:
            req("DELETE", f"/v1/sessions/{j['session_id']}", headers={"x-session-token": j["session_token"]})
    return created <= 64 and created + refused == 150, f"{created} created, {refused} × 429", None


def c_id3():
    s, j = create({"engine": "16k_zh", "format": "mp3"})
    if s != 201:
        return False, f"create {s}", None
    h = {"x-session-token": j["session_token"], "content-type": "application/octet-stream"}
    sid = j["session_id"]
    st, _, _ = req("POST", f"/v1/sessions/{sid}/audio?seq=0", b"ID3\x04\0\0\x7f\x7f\x7f\x7f" + b"\0" * 8192, h)
    after, codes = 0, []
    for _ in range(20):
        _, p, _ = req("GET", f"/v1/sessions/{sid}/events?after={after}&wait_ms=1000", headers=h)
        codes += [e.get("code") for e in p["events"]]
        after = p["next_cursor"]
        if p["done"]:
            break
    return "unsupported_audio" in codes, f"upload {st}, events {codes}", None


def c_huge_engine():
    s, j = create({"engine": "e" * 60000})
    return s == 400 and len(j["error"]["message"]) < 300, f"{s}, message {len(j['error']['message'])} bytes", shape_ok(j)


def c_ack_after_commit():
    # The chunk store fails: a directory stands where the session's chunk file goes.
    s, j = create({"engine": "16k_zh"})
    h = {"x-session-token": j["session_token"], "content-type": "application/octet-stream"}
    path = f"/v1/sessions/{j['session_id']}/audio?seq=0"
    chunk_file = os.path.join(DB + ".chunks", j["session_id"])
    os.makedirs(chunk_file)
    a, ja, _ = req("POST", path, b"\0" * 640, h)
    b, _, _ = req("POST", path, b"\0" * 640, h)
    os.rmdir(chunk_file)
    c, jc, _ = req("POST", path, b"\0" * 640, h)
    # One record: a 17-byte header and the 640 bytes.
    n = os.path.getsize(chunk_file) // (17 + 640) if os.path.exists(chunk_file) else 0
    ok = a == 503 and b == 503 and c == 200 and jc["duplicate"] and n == 1
    return ok, f"{a}, retry {b}, after unblocking {c} duplicate={jc.get('duplicate')}, stored {n}", shape_ok(ja)


def c_create_rate():
    proc, addr = start_server(os.path.join(TMP, "rate.db"), "--max-creates-per-s", "5")
    port = int(addr.rsplit(":", 1)[1])
    try:
        answers = [req("POST", "/v1/sessions", {"engine": "16k_zh"}, port=port) for _ in range(30)]
    finally:
        proc.kill()
    created = sum(a[0] == 201 for a in answers)
    limited = sum(a[0] == 429 and a[1]["error"]["code"] == "rate_limited" for a in answers)
    ok = 10 <= created < 20 and created + limited == 30
    return ok, f"{created} created, {limited} × 429 rate_limited", None


def wav_silence(seconds):
    pcm = b"\0\0" * 16000 * seconds
    return b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16) + b"data" + struct.pack("<I", len(pcm)) + pcm


def c_oneshot_concurrency():
    body = wav_silence(20)
    res = []

    def one():
        try:
            res.append(req("POST", "/v1/recognize", body, {"content-type": "audio/wav"}, timeout=120)[0])
        except OSError:
            res.append(0)
    ts = [threading.Thread(target=one) for _ in range(20)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return 429 in res and all(s in (200, 429) for s in res), f"{res.count(200)} × 200, {res.count(429)} × 429", None


def c_edges():
    s, j = create({"engine": "16k_zh"})
    sid, tok = j["session_id"], j["session_token"]
    h = {"x-session-token": tok, "content-type": "application/octet-stream"}
    checks = [
        (req("POST", f"/v1/sessions/{sid}/audio?seq=-1", b"\0\0", h)[0], 400),
        (req("POST", f"/v1/sessions/{sid}/audio?seq=999", b"\0\0", h)[0], 409),
        (req("GET", f"/v1/sessions/{sid}/events?after=18446744073709551615&wait_ms=0", headers=h)[0], 200),
        (req("GET", f"/v1/sessions/{sid}", headers={"x-session-token": "x" * 48})[0], 403),
        (req("GET", f"/v1/sessions/{sid}")[0], 401),
        (req("GET", "/v1/sessions/..%2F..%2Fetc%2Fpasswd", headers=h)[0], 404),
        (req("PUT", f"/v1/sessions/{sid}", b"", h)[0], 405),
        (req("POST", "/v1/sessions", b"{not json", {"content-type": "application/json"})[0], 400),
    ]
    got = [a for a, _ in checks]
    return got == [b for _, b in checks], " ".join(map(str, got)), None


def ws_frame(payload, opcode=2):
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def c_ws_oversize():
    s, j = create({"engine": "16k_zh"})
    sock = socket.create_connection((HOST, PORT), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /v1/sessions/{j['session_id']}/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"X-Session-Token: {j['session_token']}\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(4096)
    rest = buf.split(b"\r\n\r\n", 1)[1]
    sock.sendall(ws_frame(b"\0\0\0\0\0" + b"\0" * (3 * 96 * 1024)))
    code = None
    deadline = time.time() + 10
    data = rest
    while time.time() < deadline and code is None:
        while len(data) >= 2:
            op, n = data[0] & 0x0F, data[1] & 0x7F
            off = 2
            if n == 126:
                n, off = struct.unpack(">H", data[2:4])[0], 4
            elif n == 127:
                n, off = struct.unpack(">Q", data[2:10])[0], 10
            if len(data) < off + n:
                break
            if op == 8:
                code = struct.unpack(">H", data[off:off + 2])[0] if n >= 2 else 0
                break
            data = data[off + n:]
        if code is None:
            d = sock.recv(65536)
            if not d:
                break
            data += d
    sock.close()
    return code == 1009, f"close {code}", None


def c_idle_sockets():
    socks = [socket.create_connection((HOST, PORT)) for _ in range(160)]
    healthy = alive()
    time.sleep(3)  # past --header-read-timeout-ms 2000
    closed = 0
    for s in socks:
        s.settimeout(0.01)
        try:
            closed += s.recv(1) == b""
        except OSError:
            pass
        s.close()
    return healthy and closed == 160, f"health {'ok' if healthy else 'timed out'}, {closed}/160 closed by the server", None


def c_connection_cap():
    proc, addr = start_server(os.path.join(TMP, "conns.db"), "--max-connections", "100")
    host, port = addr.rsplit(":", 1)
    socks, refused = [], 0
    try:
        for _ in range(130):
            socks.append(socket.create_connection((host, int(port))))
        time.sleep(0.5)
        for s in socks:
            s.settimeout(0.05)
            try:
                refused += b"too_many_connections" in s.recv(512)
            except OSError:
                pass
        for s in socks:
            s.close()
        time.sleep(0.2)
        status = req("GET", "/health", port=int(port))[0]
    finally:
        proc.kill()
    ok = refused == 30 and status == 200
    return ok, f"{refused}/30 past the cap got 503 too_many_connections, then /health {status}", None


def c_h2c():
    s = socket.create_connection((HOST, PORT), timeout=5)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    try:
        a = s.recv(64)
    except OSError:
        a = b""
    s.close()
    h2 = len(a) >= 9 and a[3] == 0x04  # a SETTINGS frame
    return not h2, "HTTP/2 answered" if h2 else "no HTTP/2", None


CLASSES = [
    ("chunked 1 GiB upload, unknown session", c_chunked_upload),
    ("chunked 1 GiB session create", c_chunked_json),
    ("FLAC bomb (25 KB, 2 h) one-shot", c_flac_bomb),
    ("150 concurrent creates, max_sessions 64", c_concurrent_creates),
    ("MP3 ID3 tag declaring 256 MiB", c_id3),
    ("60 KB engine name", c_huge_engine),
    ("ack and duplicate while the chunk store fails", c_ack_after_commit),
    ("30 creates at max_creates_per_s 5", c_create_rate),
    ("20 concurrent one-shot recognitions", c_oneshot_concurrency),
    ("seq, cursor, token, id, method, JSON edges", c_edges),
    ("WebSocket frame over twice max_chunk_bytes", c_ws_oversize),
    ("160 sockets that never send a byte", c_idle_sockets),
    ("130 sockets at max_connections 100", c_connection_cap),
    ("HTTP/2 prior knowledge (h2c)", c_h2c),
]

rows, failed = [], 0
for name, fn in CLASSES:
    t0 = time.time()
    try:
        ok, status, shape = fn()
    except Exception as e:  # a class that crashes the script is a failed row, not a crash
        ok, status, shape = False, f"error: {e!r}"[:80], None
    up = alive()
    ok = ok and up and shape is not False
    failed += not ok
    rows.append((name, "pass" if ok else "FAIL", status, {True: "ok", False: "bad", None: "-"}[shape],
                 "yes" if up else "NO", rss_mb(), time.time() - t0))

w = max(len(r[0]) for r in rows)
print(f"{'class':<{w}}  result  {'status':<44} json  alive  peak RSS  time")
for name, res, status, shape, up, rss, dt in rows:
    print(f"{name:<{w}}  {res:<6}  {status:<44} {shape:<4}  {up:<5}  {rss:>5} MB  {dt:4.1f} s")
PROC.kill()
sys.exit(1 if failed else 0)
