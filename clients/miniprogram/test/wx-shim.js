// A `wx` object for node that does what the mini-program runtime does, over real sockets:
// wx.request (node http, ArrayBuffer bodies, JSON answers parsed, `fail` on network errors and
// timeouts, RequestTask.abort), wx.connectSocket (node's WebSocket, SocketTask callbacks),
// wx.getRecorderManager (plays a PCM buffer as onFrameRecorded frames of `frameSize` KB at a
// chosen speed), storage, and onAppHide/onAppShow with triggers.
//
// Faults are injected per call: `shim.faults.push({ match, times, action })` where `match(opts)`
// picks requests, and `action` is 'fail-before' (never sent), 'fail-after' (sent, answer lost),
// or `{ status, body, headers }` (answered without reaching the server).
'use strict'

const http = require('node:http')

function createWx (options = {}) {
  const storage = new Map()
  const hide = new Set()
  const show = new Set()
  const faults = []
  const log = { requests: [], sockets: [], activeAudio: 0, maxActiveAudio: 0 }
  const recording = { pcm: options.pcm || Buffer.alloc(0), speed: options.speed || 1 }

  function takeFault (opts) {
    for (const f of faults) {
      if (f.times > 0 && f.match(opts)) {
        f.times--
        f.hits = (f.hits || 0) + 1
        return f.action
      }
    }
    return null
  }

  function request (opts) {
    const url = new URL(opts.url)
    const method = (opts.method || 'GET').toUpperCase()
    const headers = Object.assign({}, opts.header)
    let body = null
    if (opts.data instanceof ArrayBuffer) body = Buffer.from(opts.data)
    else if (ArrayBuffer.isView(opts.data)) body = Buffer.from(opts.data.buffer, opts.data.byteOffset, opts.data.byteLength)
    else if (typeof opts.data === 'string') body = Buffer.from(opts.data)
    else if (opts.data !== undefined && opts.data !== null) {
      body = Buffer.from(JSON.stringify(opts.data))
      headers['content-type'] = headers['content-type'] || 'application/json'
    }
    if (body && method !== 'GET') headers['content-length'] = body.length
    log.requests.push({ method, url: opts.url, at: Date.now() })
    const isAudio = /\/audio\?/.test(opts.url)
    if (isAudio) log.maxActiveAudio = Math.max(log.maxActiveAudio, ++log.activeAudio)
    let done = false
    const finish = (fn, arg) => {
      if (done) return
      done = true
      if (isAudio) log.activeAudio--
      clearTimeout(timer)
      fn && fn(arg)
      opts.complete && opts.complete(arg)
    }
    const fault = takeFault({ method, url: opts.url, path: url.pathname + url.search })
    const timer = setTimeout(() => { req && req.destroy(); finish(opts.fail, { errMsg: 'request:fail timeout' }) }, opts.timeout || 60000)
    let req = null
    if (fault === 'fail-before') {
      setImmediate(() => finish(opts.fail, { errMsg: 'request:fail injected (not sent)' }))
      return { abort () { finish(opts.fail, { errMsg: 'request:fail abort' }) } }
    }
    if (fault && typeof fault === 'object') {
      setImmediate(() => finish(opts.success, { statusCode: fault.status, data: fault.body || '', header: fault.headers || {} }))
      return { abort () {} }
    }
    req = http.request({ host: url.hostname, port: url.port, path: url.pathname + url.search, method, headers }, (res) => {
      const chunks = []
      res.on('data', (c) => chunks.push(c))
      res.on('error', (e) => finish(opts.fail, { errMsg: 'request:fail ' + e.message }))
      res.on('end', () => {
        if (fault === 'fail-after') return finish(opts.fail, { errMsg: 'request:fail injected (answer lost)' })
        const raw = Buffer.concat(chunks)
        let data
        if (opts.responseType === 'arraybuffer') data = raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length)
        else {
          data = raw.toString('utf8')
          if ((opts.dataType || 'json') === 'json') { try { data = JSON.parse(data) } catch (e) {} }
        }
        finish(opts.success, { statusCode: res.statusCode, data, header: res.headers })
      })
    })
    req.on('error', (e) => finish(opts.fail, { errMsg: 'request:fail ' + e.message }))
    if (body) req.write(body)
    req.end()
    return { abort () { req.destroy(); finish(opts.fail, { errMsg: 'request:fail abort' }) } }
  }

  function connectSocket (opts) {
    const cbs = { open: [], message: [], close: [], error: [] }
    const entry = { url: opts.url, opened: false, closeCode: null }
    log.sockets.push(entry)
    const ws = new WebSocket(opts.url, { headers: opts.header || {} })
    ws.binaryType = 'arraybuffer'
    let closed = false
    const fireClose = (code, reason) => {
      if (closed) return
      closed = true
      entry.closeCode = code
      cbs.close.forEach((f) => f({ code, reason }))
    }
    ws.onopen = () => { entry.opened = true; cbs.open.forEach((f) => f({ header: {} })) }
    ws.onmessage = (e) => cbs.message.forEach((f) => f({ data: e.data }))
    ws.onerror = (e) => {
      cbs.error.forEach((f) => f({ errMsg: 'connectSocket:fail ' + (e.message || 'error') }))
      setTimeout(() => fireClose(1006, 'abnormal'), 50)
    }
    ws.onclose = (e) => fireClose(e.code, e.reason)
    return {
      onOpen (f) { cbs.open.push(f) },
      onMessage (f) { cbs.message.push(f) },
      onClose (f) { cbs.close.push(f) },
      onError (f) { cbs.error.push(f) },
      send ({ data, success, fail }) {
        try { ws.send(data); success && success({}) } catch (e) { fail && fail({ errMsg: 'sendSocketMessage:fail ' + e.message }) }
      },
      close ({ code, reason } = {}) {
        try { ws.close(code || 1000, reason || '') } catch (e) {}
      },
      _ws: ws
    }
  }

  function getRecorderManager () {
    const cbs = { frame: [], stop: [], start: [], pause: [], resume: [], error: [] }
    let timer = null
    let pos = 0
    let frameBytes = 0
    let paused = false
    let stopped = true
    const rm = {
      options: null,
      onFrameRecorded (f) { cbs.frame.push(f) },
      onStop (f) { cbs.stop.push(f) },
      onStart (f) { cbs.start.push(f) },
      onPause (f) { cbs.pause.push(f) },
      onResume (f) { cbs.resume.push(f) },
      onError (f) { cbs.error.push(f) },
      start (o) {
        rm.options = o
        if (o.format !== 'PCM' || o.sampleRate !== 16000 || o.numberOfChannels !== 1) {
          cbs.error.forEach((f) => f({ errMsg: 'operateRecorder:fail shim plays 16 kHz mono PCM only' }))
          return
        }
        frameBytes = Math.round(o.frameSize * 1024)
        pos = 0
        stopped = false
        paused = false
        cbs.start.forEach((f) => f({}))
        const ms = (frameBytes / 32000) * 1000 / recording.speed
        timer = setInterval(() => {
          if (paused || stopped) return
          const end = Math.min(recording.pcm.length, pos + frameBytes)
          const chunk = recording.pcm.subarray(pos, end)
          pos = end
          const last = pos >= recording.pcm.length
          const frameBuffer = chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.length)
          cbs.frame.forEach((f) => f({ frameBuffer, isLastFrame: last }))
          if (last) rm.stop()
        }, ms)
      },
      pause () { paused = true; cbs.pause.forEach((f) => f({})) },
      resume () { paused = false; cbs.resume.forEach((f) => f({})) },
      stop () {
        if (stopped) return
        stopped = true
        clearInterval(timer)
        // A stop before the end gives one last (short) frame flagged isLastFrame, then onStop.
        if (pos < recording.pcm.length) {
          const chunk = recording.pcm.subarray(pos, Math.min(recording.pcm.length, pos + frameBytes))
          pos = recording.pcm.length
          cbs.frame.forEach((f) => f({ frameBuffer: chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.length), isLastFrame: true }))
        }
        setImmediate(() => cbs.stop.forEach((f) => f({ tempFilePath: 'wxfile://shim.pcm' })))
      },
      get position () { return pos }
    }
    return rm
  }

  // wx.cloud.callContainer over the same HTTP, with Cloud Hosting's limits (15 s per call,
  // 100 KB request bodies) and its X-WX-SERVICE header required; `options.containerBase` is
  // the service's address.
  const cloud = {
    calls: 0,
    callContainer (o) {
      cloud.calls++
      const size = o.data instanceof ArrayBuffer ? o.data.byteLength : (typeof o.data === 'string' ? Buffer.byteLength(o.data) : 0)
      const service = o.header && o.header['X-WX-SERVICE']
      if (!o.config || !o.config.env || !service) {
        setImmediate(() => o.fail && o.fail({ errMsg: 'cloud.callContainer:fail missing env or X-WX-SERVICE' }))
        return undefined
      }
      if (size > 100 * 1024) {
        setImmediate(() => o.fail && o.fail({ errMsg: 'cloud.callContainer:fail request data exceeds 100KB' }))
        return undefined
      }
      request(Object.assign({}, o, { url: options.containerBase + o.path, timeout: Math.min(o.timeout || 15000, 15000) }))
      return undefined
    }
  }

  const wx = {
    cloud,
    request,
    connectSocket,
    getRecorderManager,
    getStorageSync: (k) => (storage.has(k) ? storage.get(k) : ''),
    setStorageSync: (k, v) => { storage.set(k, v) },
    removeStorageSync: (k) => { storage.delete(k) },
    onAppHide: (f) => hide.add(f),
    offAppHide: (f) => hide.delete(f),
    onAppShow: (f) => show.add(f),
    offAppShow: (f) => show.delete(f)
  }
  return {
    wx,
    faults,
    log,
    storage,
    recording,
    triggerHide () { hide.forEach((f) => f()) },
    triggerShow () { show.forEach((f) => f({})) }
  }
}

module.exports = { createWx }
