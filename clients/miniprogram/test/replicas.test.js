// Three voxpoll replicas sharing sessions through one real redis-server, behind a real nginx
// upstream that sends every request to the next replica (round-robin, no affinity: how cloud
// hosts route a scaled service). Every client mode must get the transcript one instance gives.
// Run: node --experimental-websocket --test test/replicas.test.js
'use strict'

const test = require('node:test')
const assert = require('node:assert/strict')
const { spawn } = require('node:child_process')
const fs = require('node:fs')
const net = require('node:net')
const os = require('node:os')
const path = require('node:path')
const { createClient } = require('../voxpoll')
const { createWx } = require('./wx-shim')
const { startServer, twoSentences, cer } = require('./server')
const { startNginx, CONFIGS, freePort } = require('./nginx')

const speech = twoSentences()

let redis
let replicas = []
let single
let nginx

/** redis-server on a free port with AOF in a fresh directory; resolves `{url, stop}`. */
async function startRedis () {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'voxpoll-redis-'))
  const port = await freePort()
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--appendonly', 'yes', '--save', ''], { stdio: 'ignore' })
  const deadline = Date.now() + 10000
  for (;;) {
    const ok = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true) })
      s.on('error', () => resolve(false))
    })
    if (ok) break
    if (Date.now() > deadline || proc.exitCode !== null) throw new Error('redis-server did not start (scripts/setup installs it)')
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  return {
    url: `redis://127.0.0.1:${port}`,
    stop: () => new Promise((resolve) => {
      proc.once('exit', () => { fs.rmSync(dir, { recursive: true, force: true }); resolve() })
      proc.kill('SIGKILL')
    })
  }
}

test.before(async () => {
  redis = await startRedis()
  for (let i = 0; i < 3; i++) {
    replicas.push(await startServer(['--decode-workers', '2', '--redis-url', redis.url, '--replica-id', `r${i}`]))
  }
  single = await startServer(['--decode-workers', '2'])
  nginx = await startNginx(replicas.map((r) => r.port), { direct: CONFIGS.direct }, { accessLog: true })
})
test.after(async () => {
  if (nginx) await nginx.stop()
  for (const r of replicas) await r.stop()
  if (single) await single.stop()
  if (redis) await redis.stop()
})

/** One session through `baseUrl` in `mode`, at 1.5x real time. */
async function run (baseUrl, mode) {
  const shim = createWx({ pcm: speech.pcm, speed: 1.5 })
  const client = createClient({ baseUrl, wx: shim.wx, transport: mode, retryBaseMs: 100, retryMaxMs: 2000 })
  const errors = []
  const transports = []
  const seqs = []
  const session = await client.open({ engine: '16k_zh', format: 'pcm', sample_rate: 16000 }, {
    onPartial: (ev) => seqs.push(ev.seq),
    onFinal: (ev) => seqs.push(ev.seq),
    onError: (e) => errors.push(e),
    onTransport: (t) => transports.push(t)
  })
  session.attachRecorder({})
  let timer
  const end = await Promise.race([session.ended, new Promise((resolve, reject) => { timer = setTimeout(() => reject(new Error(`${mode}: no end within 180 s`)), 180000) })])
  clearTimeout(timer)
  return { end, errors, transports, seqs }
}

test('three replicas behind round-robin nginx: every client mode gets the one-instance transcript', async () => {
  const one = await run(single.url, 'poll')
  assert.equal(one.end.reason, 'finished')
  assert.ok(cer(speech.text, one.end.transcript) <= 0.2, one.end.transcript)
  for (const mode of ['poll', 'ws', 'auto']) {
    const r = await run(nginx.urls.direct, mode)
    assert.equal(r.end.reason, 'finished', `${mode}: ${JSON.stringify(r.errors)}`)
    assert.equal(r.end.transcript, one.end.transcript, `${mode}: same transcript as one instance`)
    const sorted = [...r.seqs].sort((a, b) => a - b)
    assert.deepEqual(r.seqs, sorted, `${mode}: events in seq order`)
    assert.equal(new Set(r.seqs).size, r.seqs.length, `${mode}: no event twice`)
  }
  // The routing really spread each poll-mode session's chunks over every replica (dozens of
  // chunks per session: round-robin cannot miss one).
  const log = nginx.accessLog()
  for (const r of replicas) {
    const mine = log.filter((l) => l.startsWith(`127.0.0.1:${r.port} `))
    assert.ok(mine.some((l) => / POST \/v1\/sessions\/[^/]+\/audio$/.test(l)), `replica ${r.port} took chunks:\n${log.join('\n')}`)
  }
})

// A session's polls can be few (one per event), so whether the test above put one on every
// replica is luck. This one makes sure: nginx runs one worker, so three polls sent together are
// three consecutive requests of its round-robin and land on three different replicas; each must
// hold, then wake with the `end` when the finish arrives through a fourth request.
test('a poll held on every replica wakes when the session ends through another', async () => {
  const base = nginx.urls.direct
  const res = await fetch(`${base}/v1/sessions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ engine: '16k_zh', format: 'pcm', sample_rate: 16000 })
  })
  assert.equal(res.status, 201, await res.clone().text())
  const { session_id: id, session_token: token } = await res.json()
  const headers = { 'X-Session-Token': token }
  const before = nginx.accessLog().length
  const polls = [0, 1, 2].map(() => fetch(`${base}/v1/sessions/${id}/events?after=0&wait_ms=20000`, { headers }).then(async (r) => ({ status: r.status, body: await r.json() })))
  // All three are held before the finish: each replica's access log line only appears when its
  // poll ends, so wait on the servers' own gauge instead.
  const deadline = Date.now() + 10000
  for (;;) {
    let held = 0
    for (const r of replicas) {
      const m = (await (await fetch(`${r.url}/metrics`)).text()).match(/^voxpoll_polls_waiting (\d+)/m)
      held += m ? Number(m[1]) : 0
    }
    if (held >= 3) break
    assert.ok(Date.now() < deadline, `only ${held} of 3 polls held`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  const fin = await fetch(`${base}/v1/sessions/${id}/finish`, { method: 'POST', headers })
  assert.equal(fin.status, 200, await fin.text())
  const answers = await Promise.all(polls)
  for (const a of answers) {
    assert.equal(a.status, 200)
    assert.ok(a.body.events.some((e) => e.type === 'end'), JSON.stringify(a.body))
  }
  const gets = nginx.accessLog().slice(before).filter((l) => / GET \/v1\/sessions\/[^/]+\/events$/.test(l))
  const upstreams = new Set(gets.map((l) => l.split(' ')[0]))
  assert.equal(upstreams.size, 3, `the three polls went to three replicas:\n${gets.join('\n')}`)
})
