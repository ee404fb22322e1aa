// AudioWorklet processor of the voxpoll demo page: posts each 128-frame render quantum of the
// microphone (mono, at the AudioContext's rate, 16 kHz on this page) to the main thread as
// Float32 samples. The main thread turns them into 16-bit PCM frames (wx-browser.js).
class VoxpollRecorder extends AudioWorkletProcessor {
  process (inputs) {
    const ch = inputs[0] && inputs[0][0]
    if (ch && ch.length) this.port.postMessage(ch.slice(0))
    return true
  }
}
registerProcessor('voxpoll-recorder', VoxpollRecorder)
