// `voxpoll doctor` against hosts nginx cannot imitate: a WebSocket upgrade answered 400, a socket
// that upgrades and then stays silent, one closed with 1005 (no status) right after the upgrade,
// and TLS with a certificate the client cannot verify. Each host is a small node server that
// otherwise answers doctor's probes like voxpoll does.
'use strict'

const test = require('node:test')
const assert = require('node:assert/strict')
const http = require('node:http')
const https = require('node:https')
const crypto = require('node:crypto')
const { execFile, execFileSync } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { BIN } = require('./server')

/** A host whose WebSocket upgrade does `upgrade(req, socket)`; other probes answer normally. */
function fakeHost (upgrade, tls) {
  const handler = (req, res) => {
    if (req.url === '/health') return res.end('{"status":"ok"}')
    if (req.url.startsWith('/v1/probe/hold')) return res.end('{"held_ms":0}')
    if (req.url.startsWith('/v1/probe/stream')) {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      let i = 0
      const t = setInterval(() => { res.write(`data:{"i":${i}}\n\n`); if (++i === 5) { clearInterval(t); res.end() } }, 400)
      return
    }
    if (req.url.startsWith('/v1/probe/echo')) {
      let n = 0
      req.on('data', (c) => { n += c.length })
      req.on('end', () => res.end(JSON.stringify({ bytes: n })))
      return
    }
    res.statusCode = 404
    res.end()
  }
  const server = tls ? https.createServer(tls, handler) : http.createServer(handler)
  server.on('upgrade', (req, socket) => upgrade(req, socket))
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)))
}

function accept (req, socket) {
  const key = crypto.createHash('sha1').update(req.headers['sec-websocket-key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64')
  socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${key}\r\n\r\n`)
}

function doctor (url) {
  return new Promise((resolve, reject) => {
    execFile(BIN, ['doctor', url, '--json', '--max-hold-s', '1', '--timeout-s', '3'], { timeout: 60000 }, (err, stdout, stderr) => {
      if (stdout) return resolve({ report: JSON.parse(stdout), code: err ? err.code : 0 })
      reject(new Error(`doctor: ${err && err.message}\n${stderr}`))
    })
  })
}

const hosts = {
  // 400 to the upgrade, as some gateways answer.
  upgrade400: (req, socket) => socket.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'),
  // Upgraded, then nothing: a proxy that swallows frames.
  silent: (req, socket) => { accept(req, socket); socket.on('error', () => {}) },
  // Upgraded, then a close frame with no status code (1005), as some hosts do at once.
  close1005: (req, socket) => { accept(req, socket); socket.end(Buffer.from([0x88, 0x00])) }
}

for (const [name, upgrade] of Object.entries(hosts)) {
  test(`doctor classifies a WebSocket ${name}`, async () => {
    const server = await fakeHost(upgrade)
    try {
      const { report } = await doctor(`http://127.0.0.1:${server.address().port}`)
      const ws = report.websocket
      const codes = report.verdict.problems.map((p) => p.code)
      assert.equal(report.reachable, true)
      assert.equal(report.verdict.transport, 'long-poll')
      if (name === 'upgrade400') {
        assert.deepEqual([ws.outcome, ws.status], ['refused', 400])
        assert.deepEqual(codes, ['websocket_refused'])
      } else if (name === 'silent') {
        assert.equal(ws.outcome, 'silent')
        assert.deepEqual(codes, ['websocket_silent'])
      } else {
        assert.deepEqual([ws.outcome, ws.close_code], ['closed', 1005])
        assert.deepEqual(codes, ['websocket_closed'])
      }
    } finally {
      server.close()
      server.closeAllConnections()
    }
  })
}

test('doctor reports a certificate the client cannot verify as a TLS problem', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'voxpoll-tls-'))
  execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=127.0.0.1', '-days', '1',
    '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem')], { stdio: 'ignore' })
  const server = await fakeHost(hosts.silent, { key: fs.readFileSync(path.join(dir, 'key.pem')), cert: fs.readFileSync(path.join(dir, 'cert.pem')) })
  try {
    const { report, code } = await doctor(`https://127.0.0.1:${server.address().port}`)
    assert.equal(code, 1, 'exit 1: unreachable')
    assert.equal(report.reachable, false)
    assert.equal(report.tls_ok, false)
    assert.deepEqual(report.verdict.problems.map((p) => p.code), ['tls'])
  } finally {
    server.close()
    server.closeAllConnections()
    fs.rmSync(dir, { recursive: true, force: true })
  }
})
