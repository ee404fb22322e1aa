/**
 * voxpoll mini-program client: realtime speech recognition over HTTP long-polling, with a
 * WebSocket transport where the host allows upgrades. Plain JavaScript, no build step, no
 * dependencies: `require('./voxpoll')` in native mini-programs, uni-app and Taro.
 *
 *   const { createClient } = require('./voxpoll')
 *   const client = createClient({ baseUrl: 'https://asr.example.com' })
 *   const session = await client.record({ engine: '16k_zh' }, {
 *     onPartial (ev, s) { page.setData({ text: s.text() }) },
 *     onFinal (ev, s) { page.setData({ text: s.text() }) },
 *     onError (err) { console.warn(err.code, err.message) },
 *     onEnd (ev) { console.log('transcript', ev.transcript) },
 *   })
 *   // later: session.finish()  (stops the recorder; the last sentence lands in onFinal/onEnd)
 *
 * Wire protocol: README.md "HTTP API (v1)" and "WebSocket transport" of the voxpoll server.
 * Limits come from the server's session answer: `upload.chunk_bytes` (RecorderManager
 * `frameSize`), `upload.max_inflight`, `upload.window`, `poll.hold_ms`.
 */
'use strict'

var DEFAULTS = {
  /** 'auto' (WebSocket if the host passes upgrades, else long-poll), 'ws' or 'poll'. */
  transport: 'auto',
  /** How long a WebSocket gets to open and say `ready`, ms, before falling back. */
  wsProbeMs: 3000,
  /** How long a remembered transport choice per host stays valid, ms. */
  rememberMs: 24 * 3600 * 1000,
  /** First retry delay, ms; doubles per attempt up to `retryMaxMs` (plus jitter). */
  retryBaseMs: 250,
  retryMaxMs: 5000,
  /** Attempts per request before the session reports `network_error` and stops. */
  maxAttempts: 12,
  /** Upper bound of a held poll, ms (wx.request caps every request at 60 s). */
  maxHoldMs: 50000,
  /** Extra headers for every call (e.g. an app's own auth). */
  headers: {},
  /** Storage key prefix for the per-host transport choice. */
  storagePrefix: 'voxpoll.transport.',
  /**
   * WeChat Cloud Hosting: `{ env, service }` sends every call through `wx.cloud.callContainer`
   * (no legal-domain setup; 15 s and 100 KB per request, no WebSocket), so the transport is
   * long-polling with holds under 15 s. `baseUrl` is then only a label.
   */
  container: null
}

function assign (target) {
  for (var i = 1; i < arguments.length; i++) {
    var src = arguments[i] || {}
    for (var k in src) if (Object.prototype.hasOwnProperty.call(src, k)) target[k] = src[k]
  }
  return target
}

function hostOf (url) {
  var m = /^(\w+):\/\/([^/?#]+)/.exec(url)
  return m ? m[2].toLowerCase() : url
}

function sleep (ms) {
  return new Promise(function (resolve) { setTimeout(resolve, ms) })
}

function headerValue (headers, name) {
  if (!headers) return undefined
  var lower = name.toLowerCase()
  for (var k in headers) if (k.toLowerCase() === lower) return headers[k]
  return undefined
}

/** A failed call: `code` is the server's error code, or `network_error` / `timeout`. */
function ClientError (code, message, status, retryAfterMs) {
  this.code = code
  this.message = message
  this.status = status || 0
  this.retryAfterMs = retryAfterMs
}

/** Whether a call that failed this way may be repeated as it was. */
function retryable (status) {
  return status === 0 || status === 429 || status === 408 || status >= 500
}

/**
 * The client. `options`: `baseUrl` (required), `wx` (defaults to the global `wx`; uni-app and
 * Taro users may pass `uni`/`Taro` when they expose the same calls), and the DEFAULTS above.
 */
function VoxpollClient (options) {
  if (!options || !options.baseUrl) throw new Error('voxpoll: baseUrl is required')
  this.opts = assign({}, DEFAULTS, options)
  this.baseUrl = options.baseUrl.replace(/\/+$/, '')
  /* global wx */
  this.wx = options.wx || (typeof wx !== 'undefined' ? wx : null)
  if (!this.wx) throw new Error('voxpoll: no wx object (pass options.wx)')
  this.host = hostOf(this.baseUrl)
}

/**
 * One HTTP call through wx.request. Resolves `{status, data, headers, elapsedMs}` for every HTTP
 * answer; rejects with a ClientError (`network_error`, status 0) when no answer came.
 * `hooks.task` receives the RequestTask (for abort).
 */
VoxpollClient.prototype.call = function (method, path, data, extra, hooks) {
  var self = this
  var started = Date.now()
  return new Promise(function (resolve, reject) {
    var header = assign({}, self.opts.headers, extra && extra.header)
    var c = self.opts.container
    if (c) header['X-WX-SERVICE'] = c.service
    var call = c ? function (o) { return self.wx.cloud.callContainer(assign(o, { config: { env: c.env }, path: path })) } : self.wx.request
    var timeout = (extra && extra.timeout) || 60000
    var task = call({
      url: self.baseUrl + path,
      method: method,
      header: header,
      data: data,
      timeout: c ? Math.min(timeout, 15000) : timeout,
      responseType: 'text',
      success: function (res) {
        resolve({ status: res.statusCode, data: res.data, headers: res.header || {}, elapsedMs: Date.now() - started })
      },
      fail: function (err) {
        var msg = (err && err.errMsg) || 'request failed'
        var e = new ClientError(/timeout/.test(msg) ? 'timeout' : 'network_error', msg, 0)
        e.elapsedMs = Date.now() - started
        reject(e)
      }
    })
    if (hooks && hooks.task) hooks.task(task)
  })
}

/** `call`, repeated with backoff on network errors, 408, 429 (honouring Retry-After) and 5xx. */
VoxpollClient.prototype.callWithRetry = function (method, path, data, extra, shouldStop) {
  var self = this
  var attempt = 0
  function once () {
    return self.call(method, path, data, extra).then(function (res) {
      if (res.status >= 200 && res.status < 300) return res
      throw errorFromResponse(res)
    }).catch(function (err) {
      attempt++
      if (!retryable(err.status) || attempt >= self.opts.maxAttempts || (shouldStop && shouldStop())) throw err
      return sleep(self.backoff(attempt, err.retryAfterMs)).then(once)
    })
  }
  return once()
}

VoxpollClient.prototype.backoff = function (attempt, retryAfterMs) {
  if (retryAfterMs) return retryAfterMs
  var ms = Math.min(this.opts.retryMaxMs, this.opts.retryBaseMs * Math.pow(2, attempt - 1))
  return ms / 2 + Math.random() * ms / 2
}

function errorFromResponse (res) {
  var body = res.data
  if (typeof body === 'string') { try { body = JSON.parse(body) } catch (e) { body = null } }
  var e = body && body.error
  var ra = headerValue(res.headers, 'retry-after')
  return new ClientError(e ? e.code : 'http_' + res.status,
    e ? e.message : 'HTTP ' + res.status, res.status, ra ? Number(ra) * 1000 : undefined)
}

function parseBody (data) {
  if (typeof data === 'string') return JSON.parse(data)
  return data
}

/** The transport remembered for this host, if still fresh: 'ws', 'poll' or null. */
VoxpollClient.prototype.rememberedTransport = function () {
  try {
    var v = this.wx.getStorageSync(this.opts.storagePrefix + this.host)
    if (v && v.transport && Date.now() - v.at < this.opts.rememberMs) return v.transport
  } catch (e) { /* storage unavailable: negotiate again */ }
  return null
}

VoxpollClient.prototype.rememberTransport = function (transport) {
  try { this.wx.setStorageSync(this.opts.storagePrefix + this.host, { transport: transport, at: Date.now() }) } catch (e) {}
}

/**
 * Opens a session (`POST /v1/sessions` with `sessionOptions`, see the server's API) and starts
 * its result loop. Feed audio with `session.push(arrayBuffer, isLast)`. Resolves the Session.
 */
VoxpollClient.prototype.open = function (sessionOptions, handlers) {
  var self = this
  return this.callWithRetry('POST', '/v1/sessions', JSON.stringify(sessionOptions || {}),
    { header: { 'content-type': 'application/json' } })
    .then(function (res) {
      var s = new Session(self, parseBody(res.data), handlers || {})
      return s.start().then(function () { return s })
    })
}

/**
 * Opens a session and records into it with `wx.getRecorderManager()`: PCM, 16 kHz, mono,
 * `frameSize` from the server's advertised chunk size. `recorderOptions` may override
 * `duration` (ms, ≤ 600000) and `audioSource`. The session pauses and resumes with the app
 * (wx.onAppHide / wx.onAppShow); `session.finish()` stops the recorder.
 */
VoxpollClient.prototype.record = function (sessionOptions, handlers, recorderOptions) {
  var opts = assign({ format: 'pcm', sample_rate: 16000, channels: 1 }, sessionOptions)
  return this.open(opts, handlers).then(function (s) {
    s.attachRecorder(recorderOptions || {})
    return s
  })
}

/**
 * One recognition session. Events arrive in `seq` order exactly once through the handlers:
 * `onSpeechStart(ev, session)` (speech opened sentence `ev.sentence` at `ev.start_ms`, no text
 * yet), `onPartial(ev, session)`, `onFinal(ev, session)`, `onWarning(ev)`, `onError(err)` (server
 * `error` events and client failures, `{code, message}`), `onEnd(ev)` (`reason`, `transcript`),
 * `onTransport(name)` when the transport is chosen or switched.
 */
function Session (client, created, handlers) {
  this.client = client
  this.wx = client.wx
  this.handlers = handlers
  this.id = created.session_id
  this.token = created.session_token
  this.epoch = created.epoch
  // callContainer cuts every request at 15 s: hold well under it.
  this.holdMs = Math.min(created.poll.hold_ms, client.opts.maxHoldMs, client.opts.container ? 10000 : Infinity)
  this.upload = created.upload
  this.maxChunk = created.upload.max_chunk_bytes
  this.chunkBytes = created.upload.chunk_bytes || 8192
  this.maxInflight = Math.max(1, created.upload.max_inflight || 2)
  this.window = Math.max(1, created.upload.window || 8)
  this.cursor = 0
  this.nextSeq = 0
  this.queue = [] // chunks not yet acknowledged: {seq, data, last, sending, notBefore, attempts}
  this.inflight = 0
  this.lastQueued = false
  this.done = false
  this.paused = false
  this.transport = null
  this.sentences = {} // sentence index → {text, final}
  this.pollTask = null
  this.socket = null
  this.wsFailures = 0
  this.pumpTimer = null
  this.endEvent = null
  this.stats = { uploads: 0, uploadRetries: 0, polls: 0, pollRetries: 0, duplicates: 0, wsConnects: 0, switches: 0 }
  var self = this
  this.ended = new Promise(function (resolve) { self._resolveEnded = resolve })
  this._onHide = function () { self.pause() }
  this._onShow = function () { self.resume() }
  if (this.wx.onAppHide) this.wx.onAppHide(this._onHide)
  if (this.wx.onAppShow) this.wx.onAppShow(this._onShow)
}

Session.prototype.authHeader = function () {
  return { 'X-Session-Token': this.token }
}

/** The current text: finals and the newest partial of every sentence, in order. */
Session.prototype.text = function (joiner) {
  var self = this
  var keys = Object.keys(this.sentences).map(Number).sort(function (a, b) { return a - b })
  return keys.map(function (k) { return self.sentences[k].text }).filter(Boolean).join(joiner || '')
}

/**
 * The settled text: finals and, of every open sentence, the prefix its last two partials agree
 * on (the event's `stable`). It only grows while the guesses keep to it, so it suits a display
 * that must not flicker; `text()` is the newest guess.
 */
Session.prototype.stableText = function (joiner) {
  var self = this
  var keys = Object.keys(this.sentences).map(Number).sort(function (a, b) { return a - b })
  return keys.map(function (k) { return self.sentences[k].stable }).filter(Boolean).join(joiner || '')
}

Session.prototype.start = function () {
  var wanted = this.client.opts.container ? 'poll' : this.client.opts.transport
  if (wanted === 'poll') return this.usePoll('configured')
  var remembered = wanted === 'auto' ? this.client.rememberedTransport() : null
  if (remembered === 'poll') return this.usePoll('remembered')
  var self = this
  return this.connectSocket().then(function () {
    if (wanted === 'auto') self.client.rememberTransport('ws')
  }, function (err) {
    if (wanted === 'auto') self.client.rememberTransport('poll')
    return self.usePoll('fallback: ' + err.message)
  })
}

Session.prototype.setTransport = function (name, why) {
  if (this.transport && this.transport !== name) this.stats.switches++
  this.transport = name
  if (this.handlers.onTransport) this.handlers.onTransport(name, why)
}

/** Switches to long-polling (also mid-stream): unacknowledged chunks are sent again over HTTP. */
Session.prototype.usePoll = function (why) {
  this.closeSocket()
  this.setTransport('poll', why)
  this.queue.forEach(function (c) { c.sending = false })
  this.pollLoop()
  this.pump()
  return Promise.resolve()
}

/** Switches to the WebSocket transport (also mid-stream). Rejects when the socket does not open. */
Session.prototype.useSocket = function () {
  if (this.pollTask) { try { this.pollTask.abort() } catch (e) {} }
  return this.connectSocket()
}

// ---- audio in ----

/**
 * Queues audio (an ArrayBuffer: what RecorderManager's onFrameRecorded gives). Frames larger
 * than the server's `max_chunk_bytes` are split. `isLast` ends the session's audio.
 */
Session.prototype.push = function (buffer, isLast) {
  if (this.lastQueued || this.done) return
  var bytes = buffer ? new Uint8Array(buffer) : new Uint8Array(0)
  var off = 0
  do {
    var end = Math.min(bytes.length, off + this.maxChunk)
    var last = !!isLast && end >= bytes.length
    if (end > off || last) {
      this.queue.push({ seq: this.nextSeq++, data: bytes.slice(off, end).buffer, last: last, sending: false, notBefore: 0, attempts: 0 })
    }
    off = end
  } while (off < bytes.length)
  if (isLast) this.lastQueued = true
  this.pump()
}

/** Ends the audio (stops the recorder when recording). Results keep arriving until `onEnd`. */
Session.prototype.finish = function () {
  if (this.recorder && this.recording) {
    this.finishing = true
    this.recorder.stop() // its last frame carries isLastFrame; onStop covers the rest
    return
  }
  this.push(null, true)
}

/**
 * Ends the current sentence after the audio pushed so far, without ending the session (a
 * push-to-talk release, a "send" button): its final arrives at once instead of after the
 * server's silence timeout. Resolves with `{after_seq}` (`null` when nothing was pushed yet), or
 * with null after `onError` when the server refused it.
 */
Session.prototype.finalize = function () {
  if (this.done || this.lastQueued) return Promise.resolve({ after_seq: null })
  if (this.nextSeq === 0) return Promise.resolve({ after_seq: null })
  var self = this
  var path = '/v1/sessions/' + this.id + '/finalize?seq=' + (this.nextSeq - 1)
  return this.client.callWithRetry('POST', path, undefined, { header: this.authHeader() })
    .then(function (r) { return parseBody(r.data) }, function (err) {
      self.emitError({ code: err.code, message: err.message, status: err.status })
      return null
    })
}

/** Cancels the session (`DELETE`); `onEnd` fires with reason `cancelled`. */
Session.prototype.cancel = function () {
  var self = this
  if (this.recorder && this.recording) { this.cancelled = true; this.recorder.stop() }
  this.queue = []
  this.lastQueued = true
  return this.client.callWithRetry('DELETE', '/v1/sessions/' + this.id, undefined, { header: this.authHeader() })
    .then(function () { return self.drainEnd(2000) }, function (err) { self.fail(err) })
}

/** Waits up to `ms` for the `end` event after a cancel, then ends locally. */
Session.prototype.drainEnd = function (ms) {
  var self = this
  return Promise.race([this.ended, sleep(ms)]).then(function () {
    if (!self.done) self.finishLocal({ type: 'end', reason: 'cancelled', transcript: self.text() })
  })
}

/** Pauses: recorder paused, poll/socket released (a backgrounded mini-program's requests fail). */
Session.prototype.pause = function () {
  if (this.paused || this.done) return
  this.paused = true
  if (this.recorder && this.recording) this.recorder.pause()
  if (this.pollTask) { try { this.pollTask.abort() } catch (e) {} }
  this.closeSocket()
}

/** Resumes after `pause`: the same session, cursor and seq; unacknowledged chunks are resent. */
Session.prototype.resume = function () {
  if (!this.paused || this.done) return
  this.paused = false
  if (this.recorder && this.recording) this.recorder.resume()
  this.queue.forEach(function (c) { c.sending = false })
  if (this.transport === 'ws') {
    var self = this
    this.connectSocket().catch(function () { self.usePoll('socket failed on resume') })
  } else {
    this.pollLoop()
  }
  this.pump()
}

Session.prototype.attachRecorder = function (recorderOptions) {
  var self = this
  var rm = this.wx.getRecorderManager()
  this.recorder = rm
  rm.onFrameRecorded(function (res) {
    if (self.cancelled) return
    self.push(res.frameBuffer, !!res.isLastFrame)
  })
  rm.onStop(function () {
    self.recording = false
    if (!self.cancelled) self.push(null, true)
  })
  rm.onError(function (err) {
    self.emitError({ code: 'recorder_error', message: (err && err.errMsg) || 'recorder failed' })
    self.recording = false
    self.push(null, true)
  })
  this.recording = true
  rm.start(assign({
    duration: 600000,
    sampleRate: 16000,
    numberOfChannels: 1,
    format: 'PCM',
    frameSize: Math.max(1, Math.round(this.chunkBytes / 1024))
  }, recorderOptions))
}

/** Sends queued chunks: over the socket when one is up, else as requests (≤ max_inflight). */
Session.prototype.pump = function () {
  if (this.paused || this.done || !this.transport) return
  var now = Date.now()
  var base = this.queue.length ? this.queue[0].seq : this.nextSeq
  var wait = null
  for (var i = 0; i < this.queue.length; i++) {
    var c = this.queue[i]
    if (c.seq >= base + this.window) break
    if (c.sending) continue
    if (c.notBefore > now) { wait = wait === null ? c.notBefore - now : Math.min(wait, c.notBefore - now); continue }
    if (this.transport === 'ws') {
      if (!this.socketReady) break
      this.sendFrame(c)
    } else {
      if (this.inflight >= this.maxInflight) break
      this.sendRequest(c)
    }
  }
  if (wait !== null && !this.pumpTimer) {
    var self = this
    this.pumpTimer = setTimeout(function () { self.pumpTimer = null; self.pump() }, wait)
  }
}

Session.prototype.acked = function (c, duplicate) {
  var i = this.queue.indexOf(c)
  if (i >= 0) this.queue.splice(i, 1)
  if (duplicate) this.stats.duplicates++
}

/** A refused chunk: retried later when the refusal is temporary, else reported. */
Session.prototype.refused = function (c, err) {
  c.sending = false
  var temporary = retryable(err.status) || err.code === 'seq_out_of_window'
  if (err.code === 'session_closed') { this.queue = []; return } // the end event says why
  if (!temporary || ++c.attempts >= this.client.opts.maxAttempts) {
    this.acked(c)
    this.fail(err)
    return
  }
  if (err.status === 0 || err.status >= 500 || err.status === 429) this.stats.uploadRetries++
  c.notBefore = Date.now() + this.client.backoff(c.attempts, err.retryAfterMs)
}

Session.prototype.sendRequest = function (c) {
  var self = this
  c.sending = true
  this.inflight++
  this.stats.uploads++
  var path = '/v1/sessions/' + this.id + '/audio?seq=' + c.seq + (c.last ? '&last=1' : '')
  this.client.call('POST', path, c.data, { header: assign({ 'content-type': 'application/octet-stream' }, this.authHeader()) })
    .then(function (res) {
      if (res.status === 200) return self.acked(c, parseBody(res.data).duplicate)
      self.refused(c, errorFromResponse(res))
    }, function (err) { self.refused(c, err) })
    .then(function () { self.inflight--; self.pump() })
}

// ---- results out ----

/** The one long-poll loop: `GET events?after=cursor`, shortening the hold when a proxy cuts it. */
Session.prototype.pollLoop = function () {
  if (this.polling) return
  this.polling = true
  var self = this
  var failures = 0
  var hold = self.holdMs
  function next () {
    if (self.done || self.paused || self.transport !== 'poll') { self.polling = false; return }
    hold = self.holdMs
    var path = '/v1/sessions/' + self.id + '/events?after=' + self.cursor + '&wait_ms=' + hold
    self.stats.polls++
    self.client.call('GET', path, undefined, { header: self.authHeader(), timeout: Math.min(60000, hold + 15000) },
      { task: function (t) { self.pollTask = t } })
      .then(function (res) {
        self.pollTask = null
        if (res.status === 200) {
          failures = 0
          self.deliver(parseBody(res.data))
          return next()
        }
        var err = errorFromResponse(res)
        return retry(err, res.elapsedMs)
      }, function (err) {
        self.pollTask = null
        return retry(err, err.elapsedMs || 0)
      })
  }
  function retry (err, elapsedMs) {
    if (self.paused || self.done || self.transport !== 'poll') { self.polling = false; return }
    if (!retryable(err.status)) { self.polling = false; return self.fail(err) }
    failures++
    self.stats.pollRetries++
    // A gateway error after the request was held a while: the path cuts held requests. Hold
    // for less from now on (the cut, minus a margin), as `voxpoll doctor` would advise.
    if ((err.status === 502 || err.status === 504 || err.status === 0) && elapsedMs > 2000 && elapsedMs < hold + 1000) {
      self.holdMs = Math.max(1000, Math.floor(elapsedMs * 0.6))
    }
    if (failures >= self.client.opts.maxAttempts) { self.polling = false; return self.fail(err) }
    return sleep(self.client.backoff(failures, err.retryAfterMs)).then(next)
  }
  next()
}

/** Applies a poll answer (or a socket `events` frame): each event once, in seq order. */
Session.prototype.deliver = function (r) {
  if (r.epoch !== undefined && r.epoch !== this.epoch) {
    this.epoch = r.epoch // a restarted server: only superseded partials can be gone
  }
  var evs = r.events || []
  for (var i = 0; i < evs.length; i++) {
    var ev = evs[i]
    if (ev.seq <= this.cursor) continue
    this.cursor = ev.seq
    this.dispatch(ev)
    if (this.done) return
  }
  if (r.next_cursor > this.cursor) this.cursor = r.next_cursor
}

Session.prototype.dispatch = function (ev) {
  var h = this.handlers
  switch (ev.type) {
    case 'speech_start':
      if (h.onSpeechStart) h.onSpeechStart(ev, this)
      break
    case 'partial':
      this.sentences[ev.sentence] = { text: ev.text, final: false, stable: ev.stable || '' }
      if (h.onPartial) h.onPartial(ev, this)
      break
    case 'final':
      this.sentences[ev.sentence] = { text: ev.text, final: true, stable: ev.text }
      if (h.onFinal) h.onFinal(ev, this)
      break
    case 'warning':
      if (h.onWarning) h.onWarning(ev, this)
      break
    case 'error':
      this.emitError({ code: ev.code, message: ev.message, event: ev })
      break
    case 'end':
      this.finishLocal(ev)
      break
  }
}

Session.prototype.emitError = function (err) {
  if (this.handlers.onError) this.handlers.onError(err, this)
}

/** A client-side failure that ends the session for this client (reported once, then onEnd). */
Session.prototype.fail = function (err) {
  if (this.done) return
  this.emitError({ code: err.code, message: err.message, status: err.status })
  this.finishLocal({ type: 'end', reason: 'failed', transcript: this.text(), client: true })
}

Session.prototype.finishLocal = function (ev) {
  if (this.done) return
  this.done = true
  this.endEvent = ev
  if (this.recorder && this.recording) { this.cancelled = true; this.recorder.stop() }
  if (this.pollTask) { try { this.pollTask.abort() } catch (e) {} }
  this.closeSocket()
  if (this.pumpTimer) { clearTimeout(this.pumpTimer); this.pumpTimer = null }
  if (this.wx.offAppHide) this.wx.offAppHide(this._onHide)
  if (this.wx.offAppShow) this.wx.offAppShow(this._onShow)
  if (this.handlers.onEnd) this.handlers.onEnd(ev, this)
  this._resolveEnded(ev)
}

// ---- WebSocket transport ----

Session.prototype.socketUrl = function () {
  return this.client.baseUrl.replace(/^http/, 'ws') + '/v1/sessions/' + this.id + '/ws?after=' + this.cursor
}

/**
 * Opens `GET /v1/sessions/{id}/ws` and resolves once the server's `ready` frame arrives within
 * `wsProbeMs` (an upgrade refused with 404/400/426, a silent socket or an early close rejects).
 */
Session.prototype.connectSocket = function () {
  var self = this
  this.closeSocket()
  this.stats.wsConnects++
  return new Promise(function (resolve, reject) {
    var settled = false
    var opened = false
    var task = self.wx.connectSocket({ url: self.socketUrl(), header: assign({}, self.client.opts.headers, self.authHeader()) })
    self.socket = task
    self.socketReady = false
    var timer = setTimeout(function () {
      if (settled) return
      settled = true
      try { task.close({ code: 1000, reason: 'probe timeout' }) } catch (e) {}
      reject(new Error(opened ? 'socket opened but stayed silent' : 'no upgrade within ' + self.client.opts.wsProbeMs + ' ms'))
    }, self.client.opts.wsProbeMs)
    task.onOpen(function () { opened = true })
    task.onMessage(function (msg) {
      if (self.socket !== task) return
      var v
      try { v = JSON.parse(msg.data) } catch (e) { return }
      if (v.type === 'ready' && !settled) {
        settled = true
        clearTimeout(timer)
        self.socketReady = true
        self.socketOpenedAt = Date.now()
        self.setTransport('ws', 'socket ready')
        self.queue.forEach(function (c) { c.sending = false })
        resolve()
        self.pump()
        return
      }
      self.onSocketFrame(v)
    })
    function down (why) {
      if (!settled) {
        settled = true
        clearTimeout(timer)
        reject(new Error(why))
        return
      }
      if (self.socket === task) self.onSocketDown(why)
    }
    task.onError(function (e) { down((e && e.errMsg) || 'socket error') })
    task.onClose(function (e) { down('socket closed' + (e && e.code ? ' (' + e.code + ')' : '')) })
  })
}

Session.prototype.sendFrame = function (c) {
  var body = new Uint8Array(c.data)
  var frame = new Uint8Array(5 + body.length)
  var dv = new DataView(frame.buffer)
  dv.setUint32(0, c.seq)
  frame[4] = c.last ? 1 : 0
  frame.set(body, 5)
  c.sending = true
  this.stats.uploads++
  var self = this
  this.socket.send({ data: frame.buffer, fail: function () { c.sending = false; self.onSocketDown('send failed') } })
}

Session.prototype.onSocketFrame = function (v) {
  if (v.type === 'events') return this.deliver(v)
  if (v.type === 'ack' || v.type === 'error') {
    var c = null
    for (var i = 0; i < this.queue.length; i++) if (this.queue[i].seq === v.seq) { c = this.queue[i]; break }
    if (v.type === 'ack') {
      if (c) this.acked(c, v.duplicate)
    } else if (c) {
      this.refused(c, new ClientError(v.error.code, v.error.message, v.status, v.retry_after_ms))
    } else {
      this.emitError({ code: v.error.code, message: v.error.message, status: v.status })
    }
    this.pump()
  }
}

/** The socket died mid-session: reconnect; if that fails twice, switch to long-polling. */
Session.prototype.onSocketDown = function (why) {
  this.socket = null
  this.socketReady = false
  if (this.done || this.paused) return
  var self = this
  var lived = Date.now() - (this.socketOpenedAt || 0)
  this.wsFailures = lived > 10000 ? 1 : this.wsFailures + 1
  if (this.wsFailures > 2) {
    this.usePoll('socket keeps dropping: ' + why)
    return
  }
  setTimeout(function () {
    if (self.done || self.paused || self.transport !== 'ws') return
    self.connectSocket().catch(function (err) { self.usePoll('reconnect failed: ' + err.message) })
  }, this.client.backoff(this.wsFailures))
}

Session.prototype.closeSocket = function () {
  var t = this.socket
  this.socket = null
  this.socketReady = false
  if (t) { try { t.close({ code: 1000, reason: 'client' }) } catch (e) {} }
}

function createClient (options) {
  return new VoxpollClient(options)
}

var api = { createClient: createClient, VoxpollClient: VoxpollClient, Session: Session, ClientError: ClientError, DEFAULTS: DEFAULTS }
/* global window */
if (typeof module !== 'undefined' && module.exports) module.exports = api
else if (typeof window !== 'undefined') window.voxpoll = api // a <script> tag (the demo page)
