// The nginx matrix: real nginx in front of the real server, one config per hostile host. Every
// client mode (long-poll, WebSocket, negotiation) must get the full transcript behind every
// config, and `voxpoll doctor` must name each config's problem.
// Run: node --experimental-websocket --test test/hostile.test.js
'use strict'

const test = require('node:test')
const assert = require('node:assert/strict')
const { execFile } = require('node:child_process')
const { createClient } = require('../voxpoll')
const { createWx } = require('./wx-shim')
const { startServer, twoSentences, BIN } = require('./server')
const { startNginx, CONFIGS } = require('./nginx')

const speech = twoSentences()
const MODES = ['poll', 'ws', 'auto']
/** Configs whose read timeout the client must outlast: it idles this long before speaking. */
const IDLE_MS = { timeout15: 17000, timeout30: 32000 }

let server
let nginx
let doctors // name → Promise of doctor's JSON report, started early: its hold probe takes 65 s

test.before(async () => {
  server = await startServer(['--decode-workers', '2'])
  nginx = await startNginx(server.port)
  doctors = Object.fromEntries(Object.entries(nginx.urls).map(([name, url]) => [name, doctor(url)]))
  for (const p of Object.values(doctors)) p.catch(() => {})
})
test.after(async () => {
  if (nginx) await nginx.stop()
  if (server) await server.stop()
})

function doctor (url) {
  return new Promise((resolve, reject) => {
    execFile(BIN, ['doctor', url, '--json', '--max-hold-s', '65'], { timeout: 120000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`doctor ${url}: ${err.message}\n${stderr}`))
      resolve(JSON.parse(stdout))
    })
  })
}

/** One session through `baseUrl` in `mode`: idles `idleMs` with its poll/socket open, then speaks. */
async function run (baseUrl, mode, idleMs) {
  const shim = createWx({ pcm: speech.pcm, speed: 1.5 })
  const client = createClient({ baseUrl, wx: shim.wx, transport: mode, retryBaseMs: 100, retryMaxMs: 2000 })
  const transports = []
  const errors = []
  const seqs = []
  const session = await client.open({ engine: '16k_zh', format: 'pcm', sample_rate: 16000 }, {
    onPartial: (ev) => seqs.push(ev.seq),
    onFinal: (ev) => seqs.push(ev.seq),
    onEnd: (ev) => { if (ev.seq !== undefined) seqs.push(ev.seq) },
    onError: (e) => errors.push(e),
    onTransport: (t) => transports.push(t)
  })
  if (idleMs) await new Promise((resolve) => setTimeout(resolve, idleMs))
  session.attachRecorder({})
  let timer
  const end = await Promise.race([session.ended, new Promise((resolve, reject) => { timer = setTimeout(() => reject(new Error(`${baseUrl} ${mode}: no end within 180 s`)), 180000) })])
  clearTimeout(timer)
  return { end, transports, errors, seqs, session, shim }
}

test('nginx matrix: every client mode gets the full transcript behind every config', async () => {
  const clean = (await run(server.url, 'poll', 0)).end.transcript
  assert.ok(clean.length > 10, `baseline transcript: ${clean}`)
  // One client mode at a time, every config at once: 8 concurrent sessions is what this test
  // checks (proxy behaviour), not how many the decode pool of 2 small cores can finish at once
  // (24 sessions of 9 s each queue 24 finals: on a slow 2-core machine the last ones pass the
  // 60 s wait for a provider's last results).
  const results = []
  for (const mode of MODES) {
    const batch = Object.keys(CONFIGS).map((name) => ({ name, mode }))
    results.push(...await Promise.all(batch.map(async (c) => Object.assign(c, await run(nginx.urls[c.name], c.mode, IDLE_MS[c.name] || 0)))))
  }
  const failures = []
  for (const r of results) {
    const where = `${r.name}/${r.mode}`
    try {
      assert.equal(r.end.reason, 'finished', `${where}: ${JSON.stringify(r.end)} ${JSON.stringify(r.errors)}`)
      assert.equal(r.end.transcript, clean, `${where}: transcript`)
      for (let i = 1; i < r.seqs.length; i++) assert.ok(r.seqs[i] > r.seqs[i - 1], `${where}: seq order ${r.seqs}`)
      const blocked = r.name === 'upgrade404' || r.name === 'http10'
      if (r.mode === 'poll') assert.deepEqual(r.transports, ['poll'], where)
      else if (blocked) assert.deepEqual(r.transports, ['poll'], `${where}: falls back to long-polling`)
      else assert.deepEqual(r.transports, ['ws'], `${where}: the socket held (server pings beat the read timeout)`)
      if (r.mode === 'auto') {
        const remembered = r.shim.storage.get('voxpoll.transport.' + nginx.urls[r.name].replace('http://', ''))
        assert.equal(remembered.transport, blocked ? 'poll' : 'ws', `${where}: choice remembered`)
      }
      // Only a read timeout under the server's 25 s hold cuts polls; 30 s and 60 s let them be.
      if (r.name === 'timeout15' && r.transports[0] === 'poll') {
        assert.ok(r.session.stats.pollRetries >= 1, `${where}: the proxy cut a held poll`)
        assert.ok(r.session.holdMs < Number(r.name.slice(7)) * 1000, `${where}: hold shortened below the cut (${r.session.holdMs})`)
      }
    } catch (e) {
      failures.push(e.message)
    }
  }
  assert.deepEqual(failures, [])
})

test("doctor's verdict names each config's problem", async () => {
  const reports = {}
  for (const [name, p] of Object.entries(doctors)) reports[name] = await p
  const codes = (name) => reports[name].verdict.problems.map((p) => p.code).sort()
  const near = (ms, s) => ms >= (s - 1) * 1000 && ms <= (s + 3) * 1000

  assert.deepEqual(codes('direct'), [], JSON.stringify(reports.direct.verdict))
  assert.equal(reports.direct.verdict.transport, 'websocket')
  assert.equal(reports.direct.hold.survived, true)

  assert.deepEqual(codes('upgrade404'), ['websocket_refused'])
  assert.equal(reports.upgrade404.websocket.status, 404)
  assert.equal(reports.upgrade404.verdict.transport, 'long-poll')

  for (const [name, s, hold] of [['timeout15', 15, 10000], ['timeout30', 30, 25000], ['timeout60', 60, 25000]]) {
    assert.deepEqual(codes(name), ['hold_cut'], name)
    assert.equal(reports[name].hold.status, 504, name)
    assert.ok(near(reports[name].hold.cut_at_ms, s), `${name}: cut at ${reports[name].hold.cut_at_ms}`)
    assert.equal(reports[name].verdict.hold_ms, hold, name)
    assert.equal(reports[name].verdict.transport, 'websocket', name)
  }

  assert.deepEqual(codes('buffering'), ['responses_buffered'])
  assert.equal(reports.buffering.buffering.buffered, true)
  assert.equal(reports.direct.buffering.buffered, false)

  assert.deepEqual(codes('bodycap'), ['body_cap'])
  assert.equal(reports.bodycap.body.largest_ok, 100 * 1024)
  assert.equal(reports.bodycap.body.refused_status, 413)
  assert.equal(reports.bodycap.verdict.max_chunk_bytes, 96 * 1024)

  assert.deepEqual(codes('http10'), ['websocket_upgrade_dropped'])
  assert.equal(reports.http10.websocket.status, 426)
  assert.equal(reports.http10.verdict.transport, 'long-poll')
})
