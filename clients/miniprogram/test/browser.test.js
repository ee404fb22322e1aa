// The demo page at GET / in a real browser: headless Chromium (Debian package `chromium`)
// driven over the Chrome DevTools protocol, with a fake microphone that plays a LibriVox clip
// (`--use-file-for-fake-audio-capture`). The page records it with its AudioWorklet, streams it
// through voxpoll.js (browser wx) and must show the clip's words; partials must appear while
// recording, and the transport in use is reported. A screenshot is saved as
// target/browser-test/<transport>.png. Skipped (not passed) when no Chromium is installed, unless
// VOXPOLL_REQUIRE_BROWSER=1 (scripts/test) makes that a failure.
// Run: node --experimental-websocket --test test/browser.test.js
'use strict'

const test = require('node:test')
const assert = require('node:assert/strict')
const { spawn, execFileSync } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { startServer } = require('./server')

const ROOT = path.resolve(__dirname, '..', '..', '..')
const CLIP = '/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav'
const REFERENCE = 'and mister john dashwood had then leisure to consider how much there might be prudently in his power to do for them'
const OUT = path.join(ROOT, 'target', 'browser-test')

function chromiumPath () {
  for (const name of [process.env.CHROMIUM, 'chromium', 'chromium-browser', 'google-chrome']) {
    if (!name) continue
    try { return execFileSync('sh', ['-c', `command -v ${name}`]).toString().trim() } catch (e) {}
  }
  return null
}

/** Word error rate of `hyp` against `ref` (lower-case words, punctuation dropped). */
function wer (ref, hyp) {
  const words = (s) => s.toLowerCase().replace(/[^a-z' ]+/g, ' ').split(/\s+/).filter(Boolean)
  const r = words(ref)
  const h = words(hyp)
  let prev = Array.from({ length: h.length + 1 }, (_, j) => j)
  for (let i = 1; i <= r.length; i++) {
    const cur = [i]
    for (let j = 1; j <= h.length; j++) {
      cur[j] = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r[i - 1] === h[j - 1] ? 0 : 1))
    }
    prev = cur
  }
  return prev[h.length] / r.length
}

/** A headless Chromium with a fake microphone; resolves a minimal CDP client for one page. */
async function launch (bin, wav) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'voxpoll-chromium-'))
  const proc = spawn(bin, [
    '--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-extensions',
    '--remote-debugging-port=0', `--user-data-dir=${profile}`,
    '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
    `--use-file-for-fake-audio-capture=${wav}%noloop`,
    '--autoplay-policy=no-user-gesture-required', 'about:blank'
  ], { stdio: ['ignore', 'ignore', 'pipe'] })
  let err = ''
  const wsUrl = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('chromium did not start:\n' + err)), 30000)
    proc.stderr.on('data', (d) => {
      err += d.toString()
      const m = /DevTools listening on (ws:\/\/\S+)/.exec(err)
      if (m) { clearTimeout(timer); resolve(m[1]) }
    })
    proc.once('exit', (code) => reject(new Error(`chromium exited (${code}):\n${err}`)))
  })
  const ws = new WebSocket(wsUrl)
  await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = () => reject(new Error('CDP socket failed')) })
  let nextId = 1
  const waiting = new Map()
  ws.onmessage = (e) => {
    const msg = JSON.parse(e.data)
    const w = msg.id && waiting.get(msg.id)
    if (!w) return
    waiting.delete(msg.id)
    if (msg.error) w.reject(new Error(JSON.stringify(msg.error)))
    else w.resolve(msg.result)
  }
  const send = (method, params = {}, sessionId) => new Promise((resolve, reject) => {
    const id = nextId++
    waiting.set(id, { resolve, reject })
    ws.send(JSON.stringify({ id, method, params, sessionId }))
  })
  const { targetId } = await send('Target.createTarget', { url: 'about:blank' })
  const { sessionId } = await send('Target.attachToTarget', { targetId, flatten: true })
  const page = (method, params) => send(method, params, sessionId)
  const evaluate = async (expression) => {
    const r = await page('Runtime.evaluate', { expression, awaitPromise: true, returnByValue: true })
    if (r.exceptionDetails) throw new Error(expression + ': ' + JSON.stringify(r.exceptionDetails))
    return r.result.value
  }
  return {
    page,
    evaluate,
    close: () => new Promise((resolve) => {
      proc.once('exit', () => {
        // Chromium's helper processes may still write into the profile after the main one
        // exits (ENOTEMPTY was seen once): retry, and never fail a test over a temp directory.
        try { fs.rmSync(profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 }) } catch (e) {}
        resolve()
      })
      try { ws.close() } catch (e) {}
      proc.kill('SIGKILL')
    }),
    log: () => err
  }
}

const bin = chromiumPath()
let server

test.before(async () => {
  if (!bin) return
  server = await startServer()
  fs.mkdirSync(OUT, { recursive: true })
})
test.after(async () => { if (server) await server.stop() })

for (const transport of ['poll', 'ws']) {
  // scripts/test sets VOXPOLL_REQUIRE_BROWSER=1: there a missing Chromium fails instead of skipping.
  const skip = !bin && !process.env.VOXPOLL_REQUIRE_BROWSER && 'no chromium installed (scripts/setup installs it)'
  test(`the page at / transcribes a microphone in Chromium (${transport})`, { skip, timeout: 180000 }, async () => {
    assert.ok(bin, 'chromium is required (VOXPOLL_REQUIRE_BROWSER=1): run scripts/setup')
    const b = await launch(bin, CLIP)
    try {
      await b.page('Page.enable')
      await b.page('Page.navigate', { url: server.url + '/' })
      // The page is served by the binary: wait for its script, then its provider list.
      for (let i = 0; i < 100 && !(await b.evaluate('typeof window.voxpollDemo === "object"')); i++) {
        await new Promise((resolve) => setTimeout(resolve, 100))
      }
      await b.evaluate('voxpollDemo.ready')
      const providers = await b.evaluate('Array.from(document.querySelectorAll("#provider option")).map(o => o.value)')
      assert.ok(providers.includes('embedded'), JSON.stringify(providers))
      await b.evaluate(`document.getElementById('engine').value = '16k_en'; document.getElementById('transport').value = '${transport}'`)
      await b.evaluate('voxpollDemo.start()')
      // The clip is about 7.6 s; the fake microphone plays it once, then silence.
      await new Promise((resolve) => setTimeout(resolve, 9000))
      const during = await b.evaluate('voxpollDemo.state()')
      assert.equal(during.phase, 'recording', JSON.stringify(during))
      assert.equal(during.transport, transport)
      assert.ok(during.firstPartialMs !== null, 'a partial appeared while recording: ' + JSON.stringify(during))
      await b.evaluate('voxpollDemo.stop()')
      let state = during
      for (let i = 0; i < 300 && state.phase !== 'ended'; i++) {
        await new Promise((resolve) => setTimeout(resolve, 200))
        state = await b.evaluate('voxpollDemo.state()')
      }
      assert.equal(state.phase, 'ended', JSON.stringify(state))
      assert.equal(state.error, null)
      const shown = await b.evaluate('document.getElementById("transcript").textContent')
      const finals = await b.evaluate('document.querySelectorAll("#transcript .partial").length')
      assert.equal(finals, 0, 'no grey partial left after the end')
      const e = wer(REFERENCE, shown)
      assert.ok(e <= 0.2, `WER ${e.toFixed(2)}: ${shown}`)
      const status = await b.evaluate('document.getElementById("status").textContent')
      assert.match(status, new RegExp('transport: ' + transport))
      assert.match(status, /first partial after \d+ ms/)
      const shot = await b.page('Page.captureScreenshot', { format: 'png' })
      fs.writeFileSync(path.join(OUT, `${transport}.png`), Buffer.from(shot.data, 'base64'))
      // The session is in the page's history list.
      await new Promise((resolve) => setTimeout(resolve, 300))
      const rows = await b.evaluate('document.querySelectorAll("#history tr").length')
      assert.ok(rows >= 1, 'history shows the session')
    } finally {
      await b.close()
    }
  })
}
