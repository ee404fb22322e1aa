// Type declarations of voxpoll.js (the mini-program / uni-app / Taro / browser client).
// Shapes follow the server's HTTP API (README "HTTP API (v1)"): times in ms, sizes in bytes.

/** The subset of the mini-program `wx` object the client calls (uni, Taro and the page's
 * `wxBrowser` provide the same). */
export interface WxLike {
  request(options: any): { abort(): void }
  connectSocket?(options: any): any
  getRecorderManager?(): any
  getStorageSync?(key: string): any
  setStorageSync?(key: string, value: any): void
  onAppHide?(cb: () => void): void
  onAppShow?(cb: () => void): void
  offAppHide?(cb: () => void): void
  offAppShow?(cb: () => void): void
  cloud?: { callContainer(options: any): any }
}

export interface ClientOptions {
  /** `https://asr.example.com` (or a label with `container`). */
  baseUrl: string
  /** Defaults to the global `wx`. */
  wx?: WxLike
  /** 'auto' (WebSocket if the host passes upgrades, else long-poll), 'ws' or 'poll'. */
  transport?: 'auto' | 'ws' | 'poll'
  /** Time for a WebSocket to open and say `ready` before falling back, ms (3000). */
  wsProbeMs?: number
  /** How long a remembered transport choice per host stays valid, ms (24 h). */
  rememberMs?: number
  /** First retry delay, ms (250), doubling up to `retryMaxMs` (5000). */
  retryBaseMs?: number
  retryMaxMs?: number
  /** Attempts per request before `network_error` (12). */
  maxAttempts?: number
  /** Upper bound of a held poll, ms (50000; wx.request caps requests at 60 s). */
  maxHoldMs?: number
  /** Extra headers for every call (an app's own auth, `Authorization: Bearer <jwt>`). */
  headers?: Record<string, string>
  storagePrefix?: string
  /** WeChat Cloud Hosting: every call through `wx.cloud.callContainer` (long-poll only). */
  container?: { env: string; service: string } | null
}

/** Session options: the body of `POST /v1/sessions`. */
export interface SessionOptions {
  /** Engine model type, e.g. `16k_zh`, `16k_en`. */
  engine?: string
  provider?: string
  /** `pcm` (s16le), `wav`, `mp3`, `aac`. */
  format?: string
  /** Hz. */
  sample_rate?: number
  channels?: number
  partials?: boolean
  vad_silence_ms?: number
  hotword_list?: string
  word_info?: 0 | 1 | 2
  filter_dirty?: 0 | 1 | 2
  filter_modal?: 0 | 1 | 2
  filter_punc?: 0 | 1
  convert_num_mode?: 0 | 1 | 3
  [option: string]: unknown
}

export interface Word { word: string; start_ms: number; end_ms: number }

/** One event of the session's log, in `seq` order. */
export interface VoxpollEvent {
  seq: number
  /** `speech_start`: speech opened `sentence` at `start_ms` (no text yet). */
  type: 'speech_start' | 'partial' | 'final' | 'warning' | 'error' | 'end'
  sentence?: number
  text?: string
  /** `partial` only: the prefix of `text` this partial and the sentence's previous one agree on. */
  stable?: string
  start_ms?: number
  end_ms?: number
  words?: Word[]
  code?: string
  message?: string
  provider_code?: string
  /** `end` only: `finished`, `cancelled`, `expired`, `failed`. */
  reason?: string
  /** `end` only: the finals joined. */
  transcript?: string
  /** `end` only: what the session used. */
  usage?: Usage
}

/** On the `end` event: audio received, audio the finals cover (both ms), the provider. */
export interface Usage { audio_ms: number; recognized_ms: number; provider: string }

export interface VoxpollError { code: string; message: string; status?: number }

export interface Handlers {
  onSpeechStart?(ev: VoxpollEvent, session: Session): void
  onPartial?(ev: VoxpollEvent, session: Session): void
  onFinal?(ev: VoxpollEvent, session: Session): void
  onWarning?(ev: VoxpollEvent): void
  onError?(err: VoxpollError): void
  onEnd?(ev: VoxpollEvent): void
  onTransport?(name: 'ws' | 'poll', why?: string): void
}

export interface RecorderOptions { duration?: number; audioSource?: string; [option: string]: unknown }

export declare class ClientError extends Error {
  constructor(code: string, message: string, status: number, retryAfterMs?: number)
  code: string
  status: number
  retryAfterMs?: number
}

export declare class Session {
  readonly id: string
  readonly token: string
  readonly epoch: number
  /** `ws` or `poll` once chosen. */
  readonly transport: 'ws' | 'poll' | null
  /** Sentence index → its newest text, whether it is final, and its settled prefix. */
  readonly sentences: Record<number, { text: string; final: boolean; stable: string }>
  /** Resolves with the `end` event. */
  readonly ended: Promise<VoxpollEvent>
  readonly stats: { uploads: number; uploadRetries: number; polls: number; pollRetries: number; duplicates: number; wsConnects: number; switches: number }
  /** Finals and the newest partial of every sentence, in order. */
  text(joiner?: string): string
  /** Finals and the settled prefix (`stable`) of every open sentence: grows, does not flicker. */
  stableText(joiner?: string): string
  /** Queues audio (an ArrayBuffer, as RecorderManager's onFrameRecorded gives); `isLast` ends it. */
  push(buffer: ArrayBuffer | null, isLast?: boolean): void
  /** Ends the audio (stops the recorder); the last sentence lands in onFinal/onEnd. */
  finish(): void
  /**
   * Ends the current sentence after the audio pushed so far without ending the session (its
   * final arrives at once); `after_seq` is null when nothing was pushed yet; null after
   * `onError` when the server refused it.
   */
  finalize(): Promise<{ after_seq: number | null } | null>
  /** Cancels the session; onEnd fires with reason `cancelled`. */
  cancel(): void
  pause(): void
  resume(): void
}

export declare class VoxpollClient {
  constructor(options: ClientOptions)
  /** Opens a session; audio goes in with `session.push`. */
  open(options: SessionOptions, handlers?: Handlers): Promise<Session>
  /** Opens a session and records into it with `wx.getRecorderManager()` (16 kHz mono PCM). */
  record(options: SessionOptions, handlers?: Handlers, recorder?: RecorderOptions): Promise<Session>
}

export declare function createClient(options: ClientOptions): VoxpollClient

export declare const DEFAULTS: Required<Omit<ClientOptions, 'baseUrl' | 'wx' | 'container'>> & { container: null }
