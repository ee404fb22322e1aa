// The mini-program client against the real voxpoll server (embedded engine, real speech), through
// the wx shim over real HTTP and WebSocket. Run: node --experimental-websocket --test
'use strict'

const test = require('node:test')
const assert = require('node:assert/strict')
const { createClient } = require('../voxpoll')
const { createWx } = require('./wx-shim')
const { startServer, twoSentences, cer } = require('./server')

const speech = twoSentences()
let server
let clean // transcript of the clean long-poll run: every other run must equal it

test.before(async () => { server = await startServer(['--decode-workers', '2']) })
test.after(async () => { await server.stop() })

function withTimeout (p, ms, what) {
  let t
  return Promise.race([p, new Promise((resolve, reject) => { t = setTimeout(() => reject(new Error(what + ' timed out')), ms) })])
    .finally(() => clearTimeout(t))
}

/** Records the speech fixture into a new session and collects everything the handlers saw. */
async function record ({ transport, speed = 2, shim, during, clientOptions, baseUrl } = {}) {
  shim = shim || createWx({ pcm: speech.pcm, speed })
  const client = createClient(Object.assign({ baseUrl: baseUrl || server.url, wx: shim.wx, transport, retryBaseMs: 50, retryMaxMs: 1000 }, clientOptions))
  const seen = []
  const errors = []
  const transports = []
  const session = await client.record({ engine: '16k_zh' }, {
    onPartial: (ev) => seen.push(ev),
    onFinal: (ev) => seen.push(ev),
    onWarning: (ev) => seen.push(ev),
    onError: (e) => errors.push(e),
    onEnd: (ev) => seen.push(ev),
    onTransport: (t) => transports.push(t)
  })
  if (during) await during(session, shim)
  const end = await withTimeout(session.ended, 90000, 'session end')
  return { session, seen, errors, end, transports, shim }
}

/** Every event once, in seq order, and the transcript equal to the finals. */
function checkStream ({ seen, end }) {
  const seqs = seen.filter((e) => e.seq !== undefined).map((e) => e.seq)
  for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1], `seq order at ${i}: ${seqs.slice(Math.max(0, i - 3), i + 3)}`)
  assert.equal(end.type, 'end')
  assert.equal(end.reason, 'finished')
  const finals = seen.filter((e) => e.type === 'final').map((e) => e.text).join('')
  assert.equal(end.transcript, finals)
  for (const p of seen.filter((e) => e.type === 'partial')) {
    assert.equal(typeof p.stable, 'string', `partial ${p.seq} has its stable prefix`)
    assert.ok(p.text.startsWith(p.stable), `partial ${p.seq}: ${p.stable} / ${p.text}`)
  }
  const finalIdx = seen.filter((e) => e.type === 'final').map((e) => e.sentence)
  assert.equal(new Set(finalIdx).size, finalIdx.length, 'one final per sentence')
}

test('long-poll: full transcript of real speech, every event once and in order', async () => {
  // Real-time pace, as a recorder delivers: partial decodes keep up even on a loaded machine.
  const r = await record({ transport: 'poll', speed: 1 })
  clean = r.end.transcript
  checkStream(r)
  assert.deepEqual(r.transports, ['poll'])
  assert.deepEqual(r.errors, [])
  assert.ok(r.seen.some((e) => e.type === 'partial'), 'partials while speaking')
  assert.ok(cer(speech.text, r.end.transcript) <= 0.2, `CER of ${r.end.transcript}`)
  assert.equal(r.session.stableText(), r.session.text(), 'once final, the settled text is the text')
  assert.equal(r.shim.log.sockets.length, 0, 'no socket in poll mode')
})

test('RecorderManager gets PCM 16 kHz mono and frameSize from the advertised chunk size', async () => {
  const shim = createWx({ pcm: speech.pcm, speed: 4 })
  const real = shim.wx.getRecorderManager
  let rm
  shim.wx.getRecorderManager = () => { rm = real(); return rm }
  const r = await record({ transport: 'poll', shim })
  checkStream(r)
  assert.deepEqual({ format: rm.options.format, sampleRate: rm.options.sampleRate, numberOfChannels: rm.options.numberOfChannels, frameSize: rm.options.frameSize },
    { format: 'PCM', sampleRate: 16000, numberOfChannels: 1, frameSize: 8 })
  assert.ok(r.shim.log.maxActiveAudio <= 2, `max_inflight 2, saw ${r.shim.log.maxActiveAudio}`)
  assert.ok(r.shim.log.maxActiveAudio >= 1)
})

test('WebSocket transport: same session model, same transcript', async () => {
  const r = await record({ transport: 'ws' })
  checkStream(r)
  assert.deepEqual(r.transports, ['ws'])
  assert.equal(r.end.transcript, clean)
  assert.equal(r.shim.log.requests.filter((q) => /\/audio\?|\/events\?/.test(q.url)).length, 0, 'no audio or poll requests over HTTP')
})

test('auto: WebSocket chosen where upgrades pass, and remembered per host', async () => {
  const r = await record({ transport: 'auto' })
  checkStream(r)
  assert.deepEqual(r.transports, ['ws'])
  const key = 'voxpoll.transport.' + server.url.replace('http://', '')
  assert.equal(r.shim.storage.get(key).transport, 'ws')
})

test('auto: a host remembered as poll-only is not probed again', async () => {
  const shim = createWx({ pcm: speech.pcm, speed: 2 })
  shim.storage.set('voxpoll.transport.' + server.url.replace('http://', ''), { transport: 'poll', at: Date.now() })
  const r = await record({ transport: 'auto', shim })
  checkStream(r)
  assert.deepEqual(r.transports, ['poll'])
  assert.equal(shim.log.sockets.length, 0)
  assert.equal(r.end.transcript, clean)
})

test('auto: a refused upgrade falls back to long-polling and is remembered', async () => {
  // Upgrades to a closed port fail at once, the way a host answering 404 does.
  const shim = createWx({ pcm: speech.pcm, speed: 2 })
  const real = shim.wx.connectSocket
  shim.wx.connectSocket = (o) => real(Object.assign({}, o, { url: o.url.replace(/\/ws\?/, '/no-such-route?') }))
  const r = await record({ transport: 'auto', shim })
  checkStream(r)
  assert.deepEqual(r.transports, ['poll'])
  assert.equal(r.end.transcript, clean)
  assert.equal(shim.storage.get('voxpoll.transport.' + server.url.replace('http://', '')).transport, 'poll')
})

test('injected network failures, lost answers, 503 and 429 are retried without loss or duplicates', async () => {
  const shim = createWx({ pcm: speech.pcm, speed: 2 })
  const audio = (o) => /\/audio\?/.test(o.url)
  const events = (o) => /\/events\?/.test(o.url)
  shim.faults.push(
    { match: audio, times: 2, action: 'fail-before' },
    { match: (o) => audio(o) && /seq=(5|9|13)&?/.test(o.url), times: 3, action: 'fail-after' },
    { match: audio, times: 1, action: { status: 503, body: '{"error":{"code":"unavailable","message":"injected"}}' } },
    { match: audio, times: 1, action: { status: 429, body: '{"error":{"code":"backpressure","message":"injected"}}', headers: { 'retry-after': '1' } } },
    { match: events, times: 2, action: 'fail-after' },
    { match: events, times: 1, action: { status: 504, body: 'gateway timeout' } }
  )
  const r = await record({ transport: 'poll', shim })
  checkStream(r)
  assert.deepEqual(r.errors, [])
  for (const f of shim.faults) assert.ok(f.hits >= 1, 'every fault fired')
  assert.ok(r.session.stats.duplicates >= 1, 'a chunk whose answer was lost came back as a duplicate')
  assert.ok(r.session.stats.uploadRetries >= 4)
  assert.equal(r.end.transcript, clean)
})

test('a transport switch mid-stream loses and duplicates nothing', async () => {
  const r = await record({
    transport: 'ws',
    speed: 1.5,
    during: async (session) => {
      await new Promise((resolve) => setTimeout(resolve, 1500))
      await session.usePoll('test: switch to poll')
      await new Promise((resolve) => setTimeout(resolve, 2000))
      await session.useSocket()
    }
  })
  checkStream(r)
  assert.deepEqual(r.transports, ['ws', 'poll', 'ws'])
  assert.equal(r.session.stats.switches, 2)
  assert.equal(r.end.transcript, clean)
})

test('app hide pauses recording and requests; show resumes the same session', async () => {
  const r = await record({
    transport: 'poll',
    during: async (session, shim) => {
      await new Promise((resolve) => setTimeout(resolve, 1200))
      shim.triggerHide()
      const before = shim.log.requests.length
      await new Promise((resolve) => setTimeout(resolve, 2500))
      assert.equal(session.paused, true)
      assert.equal(shim.log.requests.length, before, 'no requests while hidden')
      shim.triggerShow()
    }
  })
  checkStream(r)
  assert.equal(r.end.transcript, clean)
})

test('finalize ends the sentence at once and the session goes on', async () => {
  // The first sentence's speech without its closing silence: only the finalize can end it.
  const first = speech.pcm.subarray(0, 2 * 16000 * 2.6)
  const shim = createWx()
  const client = createClient({ baseUrl: server.url, wx: shim.wx, transport: 'poll', retryBaseMs: 50, retryMaxMs: 1000 })
  const finals = []
  let starts = 0
  let gotFinal
  const firstFinal = new Promise((resolve) => { gotFinal = resolve })
  const session = await client.open({ engine: '16k_zh' }, {
    onSpeechStart: () => { starts++ },
    onFinal: (ev) => { finals.push(ev); gotFinal(ev) }
  })
  assert.deepEqual(await session.finalize(), { after_seq: null }, 'nothing pushed: nothing to end')
  for (let off = 0; off < first.length; off += 6400) {
    session.push(first.buffer.slice(first.byteOffset + off, first.byteOffset + Math.min(off + 6400, first.length)))
  }
  const r = await session.finalize()
  assert.equal(r.after_seq, Math.ceil(first.length / 6400) - 1)
  const f = await withTimeout(firstFinal, 30000, 'final after finalize')
  assert.equal(f.sentence, 0)
  assert.ok(f.text.length > 0, JSON.stringify(f))
  assert.ok(starts >= 1, 'speech_start before it')
  session.finish()
  const end = await withTimeout(session.ended, 60000, 'session end')
  assert.equal(end.reason, 'finished')
  assert.ok(end.usage && end.usage.audio_ms >= 2500, JSON.stringify(end))
})

test('cancel ends the session as cancelled on the server', async () => {
  const r = await record({
    transport: 'poll',
    during: async (session) => {
      await new Promise((resolve) => setTimeout(resolve, 800))
      await session.cancel()
    }
  })
  assert.equal(r.end.reason, 'cancelled')
  const shim = createWx()
  const state = await new Promise((resolve, reject) => shim.wx.request({
    url: `${server.url}/v1/sessions/${r.session.id}`,
    header: { 'X-Session-Token': r.session.token },
    success: resolve,
    fail: reject
  }))
  assert.equal(state.data.status, 'cancelled')
})

test('WeChat Cloud Hosting: every call through callContainer, long-polling under its 15 s cap', async () => {
  const shim = createWx({ pcm: speech.pcm, speed: 2, containerBase: server.url })
  const r = await record({ shim, clientOptions: { baseUrl: 'https://unused.example', container: { env: 'prod-1', service: 'voxpoll' } } })
  checkStream(r)
  assert.deepEqual(r.transports, ['poll'])
  assert.ok(r.session.holdMs <= 10000)
  assert.equal(shim.log.sockets.length, 0)
  assert.equal(shim.wx.cloud.calls, shim.log.requests.length, 'no direct wx.request')
  assert.equal(r.end.transcript, clean)
})

test('a refused session option surfaces as the server error code', async () => {
  const shim = createWx()
  const client = createClient({ baseUrl: server.url, wx: shim.wx, transport: 'poll' })
  await assert.rejects(client.open({ engine: 'nope' }, {}), (e) => e.code === 'invalid_option' && e.status === 400)
})
