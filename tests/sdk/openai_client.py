"""The official `openai` Python package (PyPI) as the client of voxpoll's
POST /v1/audio/transcriptions, against a real `voxpoll serve` on loopback with the embedded
engine and real speech (pocketsphinx-testdata). Run by scripts/test through scripts/test-sdk.

Usage: python3 tests/sdk/openai_client.py target/debug/voxpoll
"""
import os
import re
import subprocess
import sys
import tempfile
import threading

import openai

BIN = sys.argv[1]
CLIP = "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav"
REFERENCE = "and mr john dashwood had then leisure to consider how much there might be prudently in his power to do for them"
KEY = "sk-voxpoll-sdk-test-0001"
tmp = tempfile.mkdtemp(prefix="voxpoll-sdk-")
proc = subprocess.Popen(
    [BIN, "serve", "--host", "127.0.0.1", "--port", "0", "--db", os.path.join(tmp, "db.sqlite"),
     ],
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    env=dict(os.environ, RUST_LOG="voxpoll=info", NO_COLOR="1", VOXPOLL_API_KEYS="sdk-user:" + KEY))
addr = None
for line in proc.stderr:
    m = re.search(r"addr=(\S+)", line)
    if m:
        addr = m.group(1)
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        break
assert addr, "server did not start"


def words(s):
    return re.sub(r"[^a-z ]", "", s.lower().replace("mr.", "mr")).split()


failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + (f": {detail}" if detail and not cond else ""))
    if not cond:
        failures.append(name)


try:
    client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key=KEY, max_retries=0, timeout=120)
    with open(CLIP, "rb") as f:
        audio = f.read()

    r = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", audio), language="en")
    check("json: the transcript", words(r.text) == words(REFERENCE), r.text)

    text = client.audio.transcriptions.create(model="embedded/16k_en", file=("clip.wav", audio),
                                              response_format="text")
    check("text: plain text", isinstance(text, str) and words(text) == words(REFERENCE), repr(text))

    v = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", audio), language="en",
                                           response_format="verbose_json", temperature=0.0,
                                           prompt="Dashwood, Norland")
    segs = v.segments or []
    check("verbose_json: duration and segments", abs(v.duration - 7.1) < 0.2 and len(segs) >= 1
          and segs[0].start < segs[-1].end <= v.duration + 0.01, str(v))

    srt = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", audio), language="en",
                                             response_format="srt")
    check("srt: numbered cues", re.match(r"1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\n\S", srt) is not None, repr(srt))

    vtt = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", audio), language="en",
                                             response_format="vtt")
    check("vtt: header and cues", vtt.startswith("WEBVTT\n\n00:00:") and "-->" in vtt, repr(vtt))

    events = list(client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", audio),
                                                     language="en", stream=True))
    kinds = [e.type for e in events]
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    done = [e for e in events if e.type == "transcript.text.done"]
    check("stream: deltas then done", len(done) == 1 and kinds[-1] == "transcript.text.done"
          and "transcript.text.delta" in kinds, str(kinds))
    check("stream: the deltas make the done text, the transcript", done and deltas == done[0].text
          and words(deltas) == words(REFERENCE), repr(deltas))

    try:
        client.audio.transcriptions.create(model="no-such-model", file=("clip.wav", audio))
        check("unknown model: 400", False, "accepted")
    except openai.BadRequestError as e:
        body = e.body if isinstance(e.body, dict) else {}
        check("unknown model: 400 with OpenAI's error shape",
              e.status_code == 400 and body.get("type") == "invalid_request_error" and body.get("param") == "model"
              and "no-such-model" in body.get("message", ""), str(body))

    try:
        openai.OpenAI(base_url=f"http://{addr}/v1", api_key="sk-wrong", max_retries=0).audio.transcriptions.create(
            model="whisper-1", file=("clip.wav", audio))
        check("wrong API key: 401", False, "accepted")
    except openai.AuthenticationError as e:
        check("wrong API key: 401", e.status_code == 401)

    import urllib.request
    req = urllib.request.Request(f"http://{addr}/v1/history", headers={"Authorization": "Bearer " + KEY})
    items = __import__("json").load(urllib.request.urlopen(req))["items"]
    check("recorded in the caller's history", sum(i["kind"] == "recognition" for i in items) >= 5, str(items)[:200])
finally:
    proc.kill()

sys.exit(1 if failures else 0)
