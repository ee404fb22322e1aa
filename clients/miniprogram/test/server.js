// Starts the real voxpoll server (target/debug/voxpoll, or $VOXPOLL_BIN) on a free port with a
// fresh SQLite file, and loads the speech fixtures the tests stream.
'use strict'

const { spawn } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')

const ROOT = path.resolve(__dirname, '..', '..', '..')
const BIN = process.env.VOXPOLL_BIN || path.join(ROOT, 'target', 'debug', 'voxpoll')

/** Starts `voxpoll serve` with `args`; resolves `{url, port, stop()}` once it listens. */
function startServer (args = [], env = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'voxpoll-js-'))
  const proc = spawn(BIN, ['serve', '--host', '127.0.0.1', '--port', '0', '--db', path.join(dir, 'voxpoll.db'), ...args], {
    env: Object.assign({}, process.env, { NO_COLOR: '1', RUST_LOG: 'voxpoll=info,warp=warn' }, env),
    stdio: ['ignore', 'ignore', 'pipe']
  })
  let log = ''
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('voxpoll did not start within 60 s:\n' + log)), 60000)
    proc.stderr.on('data', (d) => {
      log += d.toString()
      // eslint-disable-next-line no-control-regex
      const m = /listening\s+addr=([\d.]+):(\d+)/.exec(log.replace(/\x1b\[[0-9;]*m/g, ''))
      if (m && timer) {
        clearTimeout(timer)
        const port = Number(m[2])
        resolve({
          url: `http://127.0.0.1:${port}`,
          port,
          log: () => log,
          stop: () => new Promise((resolve) => {
            proc.once('exit', () => { fs.rmSync(dir, { recursive: true, force: true }); resolve() })
            proc.kill('SIGTERM')
          })
        })
      }
    })
    proc.once('exit', (code) => reject(new Error(`voxpoll exited (${code}):\n${log}`)))
  })
}

/** s16le samples of a 16 kHz mono WAV (the data chunk). */
function wavPcm (file) {
  const b = fs.readFileSync(file)
  let off = 12
  while (off + 8 <= b.length) {
    const id = b.toString('ascii', off, off + 4)
    const len = b.readUInt32LE(off + 4)
    if (id === 'fmt ' && (b.readUInt16LE(off + 10) !== 1 || b.readUInt32LE(off + 12) !== 16000)) throw new Error(file + ': not 16 kHz mono')
    if (id === 'data') return b.subarray(off + 8, off + 8 + len)
    off += 8 + len + (len & 1)
  }
  throw new Error(file + ': no data chunk')
}

/**
 * Two sentences with a pause: zh fixtures 01 and 03 around 1 s of silence, plus 0.8 s of silence
 * at the end (so the VAD closes the second sentence before the last chunk). `text` is the
 * reference transcript.
 */
function twoSentences () {
  const dir = path.join(ROOT, 'tests', 'fixtures', 'zh')
  const texts = Object.fromEntries(fs.readFileSync(path.join(dir, 'texts.tsv'), 'utf8').trim().split('\n').map((l) => l.split('\t')))
  const pcm = Buffer.concat([wavPcm(path.join(dir, '01.wav')), Buffer.alloc(32000), wavPcm(path.join(dir, '03.wav')), Buffer.alloc(25600)])
  return { pcm, text: texts['01.wav'] + texts['03.wav'] }
}

/** Character error rate of `hyp` against `ref`, punctuation and spaces ignored. */
function cer (ref, hyp) {
  const norm = (s) => Array.from(s.replace(/[\s\p{P}]/gu, ''))
  const a = norm(ref)
  const b = norm(hyp)
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    const cur = [i]
    for (let j = 1; j <= b.length; j++) cur[j] = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1))
    prev = cur
  }
  return a.length ? prev[b.length] / a.length : 0
}

module.exports = { startServer, twoSentences, cer, ROOT, BIN }
