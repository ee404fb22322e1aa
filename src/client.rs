//! `voxpoll transcribe FILE [--server URL]`: streams a file the way a mini-program does (chunks
//! of `--chunk-ms` at real-time pace, `seq` numbers, retries with backoff) while one long-poll
//! loop follows the session's events; shows the partial live and prints finals as they land.
//! Without `--server` it starts an in-process server on a free loopback port.

use crate::audio;
use crate::config::Config;
use anyhow::{bail, Context};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Arguments of `voxpoll transcribe`.
#[derive(clap::Args, Debug, Clone)]
pub struct TranscribeArgs {
    /// Audio file: WAV (any rate, mono/stereo, 16-bit) or raw 16 kHz mono s16le (`.raw`/`.pcm`).
    pub file: PathBuf,
    /// Base URL of a running server; without it an in-process server is started.
    #[arg(long)]
    pub server: Option<String>,
    /// Engine model type.
    #[arg(long, default_value = "16k_zh")]
    pub engine: String,
    /// Audio per chunk, ms.
    #[arg(long, default_value_t = 200)]
    pub chunk_ms: u64,
    /// Send as fast as the server accepts instead of at real-time pace.
    #[arg(long)]
    pub fast: bool,
    /// Print a JSON summary (transcript, sentences, latencies) instead of live text.
    #[arg(long)]
    pub json: bool,
    /// Model for the in-process server.
    #[arg(long, env = "VOXPOLL_MODEL", default_value_os_t = crate::config::default_model_path())]
    pub model: PathBuf,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Session id.
    pub session_id: String,
    /// Final transcript from the `end` event.
    pub transcript: String,
    /// Final sentences as received.
    pub sentences: Vec<Value>,
    /// `end` reason.
    pub reason: String,
    /// Audio sent, ms.
    pub audio_ms: u64,
    /// From the first chunk sent to the first partial received, ms.
    pub first_partial_ms: Option<u64>,
    /// From the first chunk sent to the first final received, ms.
    pub first_final_ms: Option<u64>,
    /// From the last chunk acknowledged to the `end` event, ms.
    pub end_after_last_chunk_ms: u64,
    /// Per final: arrival time minus the sentence's end in stream time (with real-time pacing,
    /// the delay after the end of speech), ms.
    pub final_delays_ms: Vec<i64>,
    /// Partial events received.
    pub partials: usize,
    /// Upload retries needed.
    pub retries: u32,
    /// Every speech start, partial and final as it arrived, for `scripts/bench`'s latency and stability
    /// figures.
    pub timeline: Vec<Arrival>,
}

/// One result event and when it reached the client.
#[derive(Debug, Serialize)]
pub struct Arrival {
    /// From the first chunk's due time (stream time 0 at real-time pace) to its arrival, ms.
    pub at_ms: u64,
    /// `speech_start`, `partial` or `final`.
    pub kind: String,
    /// Sentence index.
    pub sentence: u64,
    /// The result's text.
    pub text: String,
    /// A partial's stable prefix (the event's `stable`); `None` for other kinds or servers
    /// that do not send it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable: Option<String>,
    /// Stream time the result covers, ms.
    pub start_ms: u64,
    /// Stream time the result covers, ms.
    pub end_ms: u64,
}

/// Runs the command.
///
/// # Errors
/// Unreadable file, unreachable server, or a session that failed.
pub async fn transcribe(args: TranscribeArgs) -> anyhow::Result<()> {
    let pcm = read_audio(&args.file)?;
    let (base, local) = match &args.server {
        Some(url) => (url.trim_end_matches('/').to_string(), None),
        None => {
            let (url, server) = start_local(&args).await?;
            (url, Some(server))
        }
    };
    let result = stream_file(&base, &pcm, &args).await;
    if let Some((token, handle, _dir)) = local {
        token.cancel();
        let _ = handle.await;
    }
    let summary = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("\nTranscript: {}", summary.transcript);
    }
    if summary.reason != "finished" {
        bail!("session ended with reason {:?}", summary.reason);
    }
    Ok(())
}

type LocalServer = (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tempfile::TempDir,
);

async fn start_local(args: &TranscribeArgs) -> anyhow::Result<(String, LocalServer)> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::loopback(dir.path().join("voxpoll.db"));
    config.model = args.model.clone();
    let engine = crate::app::load_engine(&config)?;
    let shutdown = CancellationToken::new();
    let state = crate::app::build(config, Some(engine), shutdown.clone()).await?;
    let listener = crate::app::bind(([127, 0, 0, 1], 0).into())?;
    let url = format!("http://{}", listener.local_addr()?);
    let handle = tokio::spawn(crate::app::run(listener, state, shutdown.clone()));
    Ok((url, (shutdown, handle, dir)))
}

/// 16 kHz mono samples from a WAV or raw s16le file.
fn read_audio(path: &std::path::Path) -> anyhow::Result<Vec<i16>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(b"RIFF") {
        return audio::decode_wav_bytes(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("raw" | "pcm") => Ok(bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect()),
        _ => bail!(
            "{}: not a WAV file; raw audio must be 16 kHz mono s16le named .raw or .pcm",
            path.display()
        ),
    }
}

async fn stream_file(base: &str, pcm: &[i16], args: &TranscribeArgs) -> anyhow::Result<Summary> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let created: Value = http
        .post(format!("{base}/v1/sessions"))
        .json(&serde_json::json!({ "engine": args.engine, "format": "pcm", "sample_rate": 16000 }))
        .send()
        .await
        .context("creating a session")?
        .error_for_status()
        .context("creating a session")?
        .json()
        .await?;
    let id = created["session_id"]
        .as_str()
        .context("no session_id")?
        .to_string();
    let token = created["session_token"]
        .as_str()
        .context("no session_token")?
        .to_string();
    let hold_ms = created["poll"]["hold_ms"].as_u64().unwrap_or(25_000);

    let live = !args.json;
    let mp = MultiProgress::with_draw_target(if live {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let samples_per_chunk = (16 * args.chunk_ms) as usize;
    let n_chunks = pcm.len().div_ceil(samples_per_chunk).max(1);
    let bar = mp.add(ProgressBar::new(n_chunks as u64));
    bar.set_style(
        ProgressStyle::with_template("upload {bar:30} {pos}/{len} chunks {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let partial_line = mp.add(ProgressBar::new_spinner());

    let started = Instant::now();
    let poller = {
        let (http, base, id, token) = (http.clone(), base.to_string(), id.clone(), token.clone());
        let (mp, partial_line) = (mp.clone(), partial_line.clone());
        tokio::spawn(async move {
            follow_events(
                &http,
                &base,
                &id,
                &token,
                hold_ms,
                started,
                live,
                &mp,
                &partial_line,
            )
            .await
        })
    };

    let mut retries = 0;
    let chunk_dur = Duration::from_millis(args.chunk_ms);
    for (seq, chunk) in pcm.chunks(samples_per_chunk).enumerate() {
        if !args.fast {
            let due = started + chunk_dur * (seq as u32 + 1);
            tokio::time::sleep_until(due.into()).await;
        }
        let last = seq + 1 == n_chunks;
        let body = crate::audio::le_bytes(chunk.iter().copied());
        retries += upload(&http, base, &id, &token, seq as u64, last, body).await?;
        bar.inc(1);
    }
    if pcm.is_empty() {
        http.post(format!("{base}/v1/sessions/{id}/finish"))
            .header("x-session-token", &token)
            .send()
            .await?;
    }
    let last_sent = Instant::now();
    bar.finish_with_message("sent");
    let mut summary = poller.await??;
    summary.end_after_last_chunk_ms = last_sent.elapsed().as_millis() as u64;
    summary.audio_ms = pcm.len() as u64 / 16;
    summary.retries = retries;
    partial_line.finish_and_clear();
    Ok(summary)
}

/// POSTs one chunk, retrying network errors, 5xx and 429 with backoff. Returns retries used.
async fn upload(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    token: &str,
    seq: u64,
    last: bool,
    body: Vec<u8>,
) -> anyhow::Result<u32> {
    let url = format!(
        "{base}/v1/sessions/{id}/audio?seq={seq}{}",
        if last { "&last=1" } else { "" }
    );
    let mut backoff = Duration::from_millis(100);
    for attempt in 0..8u32 {
        let resp = http
            .post(&url)
            .header("x-session-token", token)
            .header("content-type", "application/octet-stream")
            .timeout(Duration::from_secs(15))
            .body(body.clone())
            .send()
            .await;
        let wait = match resp {
            Ok(r) if r.status().is_success() => return Ok(attempt),
            Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .map_or(backoff, Duration::from_secs),
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                bail!("chunk {seq} refused: {status} {text}");
            }
            Err(_) => backoff,
        };
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
    bail!("chunk {seq} failed after retries")
}

#[allow(clippy::too_many_arguments)]
async fn follow_events(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    token: &str,
    hold_ms: u64,
    started: Instant,
    live: bool,
    mp: &MultiProgress,
    partial_line: &ProgressBar,
) -> anyhow::Result<Summary> {
    let mut cursor = 0u64;
    let mut summary = Summary {
        session_id: id.to_string(),
        transcript: String::new(),
        sentences: Vec::new(),
        reason: String::new(),
        audio_ms: 0,
        first_partial_ms: None,
        first_final_ms: None,
        end_after_last_chunk_ms: 0,
        final_delays_ms: Vec::new(),
        partials: 0,
        retries: 0,
        timeline: Vec::new(),
    };
    let mut failures = 0;
    loop {
        let resp = http
            .get(format!(
                "{base}/v1/sessions/{id}/events?after={cursor}&wait_ms={hold_ms}"
            ))
            .header("x-session-token", token)
            .timeout(Duration::from_millis(hold_ms + 10_000))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        let page: Value = match resp {
            Ok(r) => r.json().await?,
            Err(e) => {
                failures += 1;
                if failures > 10 {
                    return Err(e).context("polling events");
                }
                tokio::time::sleep(Duration::from_millis(200 * failures)).await;
                continue;
            }
        };
        failures = 0;
        let now_ms = started.elapsed().as_millis() as u64;
        for ev in page["events"].as_array().into_iter().flatten() {
            if let Some(kind @ ("speech_start" | "partial" | "final")) = ev["type"].as_str() {
                summary.timeline.push(Arrival {
                    at_ms: now_ms,
                    kind: kind.to_string(),
                    sentence: ev["sentence"].as_u64().unwrap_or(0),
                    text: ev["text"].as_str().unwrap_or("").to_string(),
                    stable: ev["stable"].as_str().map(String::from),
                    start_ms: ev["start_ms"].as_u64().unwrap_or(0),
                    end_ms: ev["end_ms"].as_u64().unwrap_or(0),
                });
            }
            match ev["type"].as_str() {
                Some("partial") => {
                    summary.partials += 1;
                    summary.first_partial_ms.get_or_insert(now_ms);
                    if live {
                        partial_line
                            .set_message(format!("… {}", ev["text"].as_str().unwrap_or("")));
                        partial_line.tick();
                    }
                }
                Some("final") => {
                    summary.first_final_ms.get_or_insert(now_ms);
                    let end_ms = ev["end_ms"].as_u64().unwrap_or(0) as i64;
                    summary.final_delays_ms.push(now_ms as i64 - end_ms);
                    if live {
                        partial_line.set_message("");
                        let line =
                            format!("[{}] {}", ev["sentence"], ev["text"].as_str().unwrap_or(""));
                        if mp.is_hidden() {
                            println!("{line}"); // not a terminal: plain lines
                        } else {
                            let _ = mp.println(line);
                        }
                    }
                    summary.sentences.push(ev.clone());
                }
                Some("error" | "warning") if live => {
                    eprintln!("{}: {} {}", ev["type"], ev["code"], ev["message"]);
                }
                Some("end") => {
                    summary.transcript = ev["transcript"].as_str().unwrap_or("").to_string();
                    summary.reason = ev["reason"].as_str().unwrap_or("").to_string();
                }
                _ => {}
            }
        }
        cursor = page["next_cursor"].as_u64().unwrap_or(cursor);
        if page["done"].as_bool() == Some(true) {
            return Ok(summary);
        }
    }
}
