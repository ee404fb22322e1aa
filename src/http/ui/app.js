// The demo page: one recording session through voxpoll.js (browser wx from wx-browser.js),
// one-shot upload, history. `window.voxpollDemo` exposes start/stop/state for the browser test.
(function () {
  'use strict'
  var $ = function (id) { return document.getElementById(id) }
  var client = null
  var session = null
  var state = { phase: 'idle', transport: null, startedAt: 0, firstPartialMs: null, lastFinalMs: null, text: '', error: null }

  function setStatus (phase, detail) {
    state.phase = phase
    $('status').dataset.state = phase
    var bits = [phase]
    if (state.transport) bits.push('transport: ' + state.transport)
    if (state.firstPartialMs !== null) bits.push('first partial after ' + state.firstPartialMs + ' ms')
    if (state.lastFinalMs !== null) bits.push('last final after ' + state.lastFinalMs + ' ms of recording')
    if (detail) bits.push(detail)
    $('status').textContent = bits.join(' · ')
    $('status').className = state.error ? 'error' : ''
  }

  function render (s) {
    var box = $('transcript')
    box.textContent = ''
    var keys = Object.keys(s.sentences).map(Number).sort(function (a, b) { return a - b })
    keys.forEach(function (k) {
      var it = s.sentences[k]
      var span = document.createElement('span')
      span.className = it.final ? 'final' : 'partial'
      if (!it.final && it.stable) {
        // The settled prefix darker, the guess that may still change grey.
        var settled = document.createElement('span')
        settled.className = 'stable'
        settled.textContent = it.stable
        span.appendChild(settled)
        span.appendChild(document.createTextNode(it.text.slice(it.stable.length)))
      } else {
        span.textContent = it.text
      }
      box.appendChild(span)
      box.appendChild(document.createTextNode(' '))
    })
    state.text = s.text(' ')
  }

  function start () {
    if (session) return Promise.resolve()
    state = { phase: 'starting', transport: null, startedAt: Date.now(), firstPartialMs: null, lastFinalMs: null, text: '', error: null }
    client = voxpoll.createClient({ baseUrl: location.origin, wx: wxBrowser, transport: $('transport').value })
    $('start').disabled = true
    $('stop').disabled = false
    setStatus('starting')
    var opts = { engine: $('engine').value, provider: $('provider').value || undefined }
    return client.record(opts, {
      onTransport: function (name) { state.transport = name; setStatus(state.phase) },
      onSpeechStart: function () { setStatus('recording', 'hearing speech…') },
      onPartial: function (ev, s) {
        if (state.firstPartialMs === null) state.firstPartialMs = Date.now() - state.startedAt
        render(s)
        setStatus('recording')
      },
      onFinal: function (ev, s) { state.lastFinalMs = Date.now() - state.startedAt; render(s); setStatus(state.phase) },
      onError: function (err) { state.error = err.code + ': ' + err.message; setStatus(state.phase, state.error) },
      onEnd: function (ev) {
        session = null
        $('start').disabled = false
        $('stop').disabled = true
        state.text = ev.transcript || state.text
        var used = ev.usage ? ' · audio ' + ev.usage.audio_ms + ' ms, speech ' + ev.usage.recognized_ms + ' ms' : ''
        setStatus('ended', 'reason: ' + ev.reason + used)
        loadHistory()
      }
    }).then(function (s) { session = s; setStatus('recording') }, function (err) {
      state.error = err.code + ': ' + err.message
      $('start').disabled = false
      $('stop').disabled = true
      setStatus('failed', state.error)
    })
  }

  function stop () {
    if (session) { setStatus('finishing'); session.finish() }
  }

  function loadProviders () {
    return fetch('/ready').then(function (r) { return r.json() }).then(function (v) {
      var sel = $('provider')
      Object.keys(v.providers || {}).sort().forEach(function (name) {
        var o = document.createElement('option')
        o.value = name
        o.textContent = name + (v.providers[name].ready ? '' : ' (not ready)')
        if (name === v.default_provider) o.selected = true
        sel.appendChild(o)
      })
    }).catch(function () {})
  }

  function loadHistory () {
    return fetch('/v1/history?limit=10').then(function (r) { return r.json() }).then(function (v) {
      var body = $('history')
      body.textContent = ''
      ;(v.items || []).forEach(function (it) {
        var tr = document.createElement('tr')
        ;[new Date(it.created_at_ms).toLocaleString(), it.kind, it.provider, it.text].forEach(function (t) {
          var td = document.createElement('td')
          td.textContent = t === undefined || t === null ? '' : String(t)
          tr.appendChild(td)
        })
        body.appendChild(tr)
      })
    }).catch(function () {})
  }

  $('upload').addEventListener('submit', function (e) {
    e.preventDefault()
    var f = $('file').files[0]
    if (!f) return
    var form = new FormData()
    form.append('file', f)
    form.append('engine', $('engine').value)
    if ($('provider').value) form.append('provider', $('provider').value)
    $('upload-result').textContent = 'Recognising…'
    fetch('/v1/recognize', { method: 'POST', body: form }).then(function (r) { return r.json() }).then(function (v) {
      $('upload-result').textContent = v.error ? v.error.code + ': ' + v.error.message : v.text
      loadHistory()
    })
  })
  $('start').addEventListener('click', start)
  $('stop').addEventListener('click', stop)
  window.voxpollDemo = { start: start, stop: stop, state: function () { return state }, ready: Promise.all([loadProviders(), loadHistory()]) }
})()
