/**
 * The part of the mini-program `wx` API that voxpoll.js uses, for browsers: wx.request over
 * fetch, wx.connectSocket over WebSocket (the session token goes in `?session_token=`, since
 * browsers cannot set WebSocket headers), storage over localStorage, and a RecorderManager that
 * records the microphone with an AudioWorklet at 16 kHz mono and hands out 16-bit PCM frames of
 * `frameSize` KB through onFrameRecorded, as WeChat's does. The page then runs the mini-program
 * client unchanged: one protocol implementation for both.
 */
(function (global) {
  'use strict'
  // The worklet is loaded from where this script came from (another origin needs CORS there).
  var base = (document.currentScript && document.currentScript.src) ? document.currentScript.src.replace(/[^/]*$/, '') : '/ui/'

  function request (opts) {
    var ctrl = new AbortController()
    var done = false
    var timer = setTimeout(function () { ctrl.abort() }, opts.timeout || 60000)
    var finish = function (fn, arg) {
      if (done) return
      done = true
      clearTimeout(timer)
      if (fn) fn(arg)
      if (opts.complete) opts.complete(arg)
    }
    var body = opts.data
    if (body !== undefined && body !== null && typeof body !== 'string' && !(body instanceof ArrayBuffer) && !ArrayBuffer.isView(body)) {
      body = JSON.stringify(body)
    }
    fetch(opts.url, { method: opts.method || 'GET', headers: opts.header || {}, body: body, signal: ctrl.signal, cache: 'no-store' })
      .then(function (res) {
        return res.text().then(function (text) {
          var data = text
          if ((opts.dataType || 'json') === 'json') { try { data = JSON.parse(text) } catch (e) {} }
          var header = {}
          res.headers.forEach(function (v, k) { header[k] = v })
          finish(opts.success, { statusCode: res.status, data: data, header: header })
        })
      })
      .catch(function (e) {
        finish(opts.fail, { errMsg: ctrl.signal.aborted ? 'request:fail timeout' : 'request:fail ' + e.message })
      })
    return { abort: function () { ctrl.abort() } }
  }

  function connectSocket (opts) {
    var url = opts.url.replace(/^http/, 'ws')
    var token = opts.header && (opts.header['X-Session-Token'] || opts.header['x-session-token'])
    if (token) url += (url.indexOf('?') < 0 ? '?' : '&') + 'session_token=' + encodeURIComponent(token)
    var ws = new WebSocket(url)
    ws.binaryType = 'arraybuffer'
    var cbs = { open: [], message: [], close: [], error: [] }
    var fire = function (k, arg) { cbs[k].forEach(function (f) { f(arg) }) }
    ws.onopen = function () { fire('open', { header: {} }) }
    ws.onmessage = function (e) { fire('message', { data: e.data }) }
    ws.onerror = function () { fire('error', { errMsg: 'connectSocket:fail' }) }
    ws.onclose = function (e) { fire('close', { code: e.code, reason: e.reason }) }
    return {
      onOpen: function (f) { cbs.open.push(f) },
      onMessage: function (f) { cbs.message.push(f) },
      onClose: function (f) { cbs.close.push(f) },
      onError: function (f) { cbs.error.push(f) },
      send: function (o) {
        try { ws.send(o.data); if (o.success) o.success({}) } catch (e) { if (o.fail) o.fail({ errMsg: 'sendSocketMessage:fail ' + e.message }) }
      },
      close: function (o) { try { ws.close((o && o.code) || 1000, (o && o.reason) || '') } catch (e) {} }
    }
  }

  /** RecorderManager over getUserMedia + AudioWorklet (16 kHz mono, PCM frames). */
  function getRecorderManager () {
    var cbs = { frame: [], stop: [], start: [], error: [] }
    var fire = function (k, arg) { cbs[k].forEach(function (f) { f(arg) }) }
    var ctx = null
    var stream = null
    var node = null
    var pending = []
    var pendingBytes = 0
    var frameBytes = 8192
    function flush (last) {
      var out = new Int16Array(pendingBytes / 2)
      var off = 0
      pending.forEach(function (p) { out.set(p, off); off += p.length })
      pending = []
      pendingBytes = 0
      fire('frame', { frameBuffer: out.buffer, isLastFrame: !!last })
    }
    return {
      onFrameRecorded: function (f) { cbs.frame.push(f) },
      onStop: function (f) { cbs.stop.push(f) },
      onStart: function (f) { cbs.start.push(f) },
      onError: function (f) { cbs.error.push(f) },
      onPause: function () {},
      onResume: function () {},
      pause: function () { if (ctx) ctx.suspend() },
      resume: function () { if (ctx) ctx.resume() },
      start: function (o) {
        frameBytes = Math.max(2, Math.round((o.frameSize || 8) * 1024))
        navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } })
          .then(function (s) {
            stream = s
            ctx = new AudioContext({ sampleRate: o.sampleRate || 16000 })
            return ctx.audioWorklet.addModule(base + 'recorder-worklet.js')
          })
          .then(function () {
            node = new AudioWorkletNode(ctx, 'voxpoll-recorder')
            node.port.onmessage = function (e) {
              var f = e.data
              var pcm = new Int16Array(f.length)
              for (var i = 0; i < f.length; i++) {
                var v = Math.max(-1, Math.min(1, f[i]))
                pcm[i] = v < 0 ? v * 32768 : v * 32767
              }
              pending.push(pcm)
              pendingBytes += pcm.length * 2
              if (pendingBytes >= frameBytes) flush(false)
            }
            ctx.createMediaStreamSource(stream).connect(node)
            fire('start', {})
          })
          .catch(function (e) { fire('error', { errMsg: 'operateRecorder:fail ' + e.message }) })
      },
      stop: function () {
        if (node) node.port.onmessage = null
        if (pendingBytes > 0) flush(false)
        if (stream) stream.getTracks().forEach(function (t) { t.stop() })
        if (ctx) ctx.close()
        ctx = null
        fire('stop', {})
      }
    }
  }

  global.wxBrowser = {
    request: request,
    connectSocket: connectSocket,
    getRecorderManager: getRecorderManager,
    getStorageSync: function (k) { try { return JSON.parse(localStorage.getItem(k)) } catch (e) { return '' } },
    setStorageSync: function (k, v) { try { localStorage.setItem(k, JSON.stringify(v)) } catch (e) {} }
  }
})(window)
