//! Tencent Cloud ASR: real-time recognition over WebSocket for sessions ([`realtime`]) and
//! one-sentence recognition (`SentenceRecognition`, API 3.0) for one-shot requests
//! ([`sentence`]). Protocol details follow doc 1093/48982 and 1093/35646 as summarised in
//! shared/providers.md §1–2; signing lives in [`sign`].

pub mod realtime;
pub mod sentence;
pub mod sign;

use super::{
    OneShotAudio, Provider, ProviderError, ProviderStream, Readiness, Recognition, StreamOptions,
};
use serde::Deserialize;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::secret::Secret;

/// Account credentials. Read from the environment (`TENCENT_APP_ID`, `TENCENT_SECRET_ID`,
/// `TENCENT_SECRET_KEY`, optional `TENCENT_TOKEN` for temporary STS credentials); never from
/// the providers file, never logged, never sent to clients.
#[derive(Debug, Clone)]
pub struct TencentCredentials {
    /// Numeric account AppID (path of the real-time URL).
    pub app_id: String,
    /// API SecretId (`AKID…`).
    pub secret_id: String,
    /// API SecretKey.
    pub secret_key: Secret,
    /// STS session token, sent as `X-TC-Token`.
    pub token: Option<Secret>,
}

impl TencentCredentials {
    /// Credentials from the environment, or `None` when any required variable is missing.
    pub fn from_env() -> Option<Self> {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Some(Self {
            app_id: get("TENCENT_APP_ID")?,
            secret_id: get("TENCENT_SECRET_ID")?,
            secret_key: Secret::new(get("TENCENT_SECRET_KEY")?),
            token: get("TENCENT_TOKEN").map(Secret::new),
        })
    }
}

/// Settings of a Tencent provider (one entry of the providers file, `"kind": "tencent"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TencentSettings {
    /// Real-time endpoint without the AppID; `ws://` is accepted for fakes.
    pub realtime_url: String,
    /// API 3.0 endpoint for `SentenceRecognition`.
    pub api_url: String,
    /// Concurrent real-time streams this account may open (Tencent's default is 200, older
    /// accounts 20/50; error 4006 beyond). Sessions past it get 429 at creation.
    pub max_concurrency: usize,
    /// Most audio per WebSocket binary message, ms: 200 ms = 6400 bytes at 16 kHz, the 2026
    /// doc's recommendation (older docs: 40 ms; both accepted, shared/providers.md §1.5). Audio
    /// goes out as it arrives, so a client sending smaller chunks gets smaller messages.
    pub frame_ms: u64,
    /// Fastest send rate when audio is queued, × real time. Tencent rejects more than 3× (4000).
    pub catchup_speed: f64,
    /// After this long with no client audio, silence is sent at real time so the upstream never
    /// reaches its 15 s no-audio error (4008), ms. Result times are mapped back to client audio.
    pub bridge_after_ms: u64,
    /// Tencent `needvad` (1 = server-side sentence cutting; needed for streams over 60 s).
    pub needvad: u8,
    /// Longest wait for the handshake verdict and for `final: 1` after `end`, ms.
    pub timeout_ms: u64,
    /// Credentials; `None` reads the environment when the provider is built.
    #[serde(skip)]
    pub credentials: Option<TencentCredentials>,
}

impl Default for TencentSettings {
    fn default() -> Self {
        Self {
            realtime_url: "wss://asr.cloud.tencent.com/asr/v2".into(),
            api_url: "https://asr.tencentcloudapi.com/".into(),
            max_concurrency: 200,
            frame_ms: 200,
            catchup_speed: 2.0,
            bridge_after_ms: 1000,
            needvad: 1,
            timeout_ms: 15_000,
            credentials: None,
        }
    }
}

/// The Tencent provider: sessions use real-time ASR, one-shot requests `SentenceRecognition`.
pub struct TencentProvider {
    name: String,
    settings: Arc<TencentSettings>,
    slots: Arc<Semaphore>,
    http: reqwest::Client,
}

impl TencentProvider {
    /// A provider named `name`. Credentials missing from both `settings` and the environment
    /// leave it not ready (sessions get 503, `/ready` says which variables to set).
    ///
    /// # Errors
    /// Invalid settings (a pace above Tencent's 3× limit, zero frame size or concurrency).
    pub fn new(name: &str, mut settings: TencentSettings) -> anyhow::Result<Self> {
        anyhow::ensure!(
            settings.catchup_speed >= 1.0 && settings.catchup_speed < 3.0,
            "provider {name}: catchup_speed must be in [1, 3) (Tencent rejects > 3x real time)"
        );
        anyhow::ensure!(
            (10..=1000).contains(&settings.frame_ms),
            "provider {name}: frame_ms must be in 10..=1000"
        );
        anyhow::ensure!(
            settings.max_concurrency > 0,
            "provider {name}: max_concurrency must be > 0"
        );
        anyhow::ensure!(
            settings.bridge_after_ms < 10_000,
            "provider {name}: bridge_after_ms must stay well under Tencent's 15 s no-audio limit"
        );
        if settings.credentials.is_none() {
            settings.credentials = TencentCredentials::from_env();
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_millis(
                settings.timeout_ms.max(1000) * 4,
            ))
            .build()?;
        Ok(Self {
            name: name.to_string(),
            slots: Arc::new(Semaphore::new(settings.max_concurrency)),
            settings: Arc::new(settings),
            http,
        })
    }

    fn credentials(&self) -> Result<TencentCredentials, ProviderError> {
        self.settings.credentials.clone().ok_or_else(|| {
            ProviderError::Unavailable(format!(
                "provider {}: set TENCENT_APP_ID, TENCENT_SECRET_ID and TENCENT_SECRET_KEY",
                self.name
            ))
        })
    }
}

#[async_trait::async_trait]
impl Provider for TencentProvider {
    fn name(&self) -> &str {
        &self.name
    }

    /// Real-time ASR takes MP3 (`voice_format` 8) and AAC (16) as recorded (shared/providers.md
    /// §1.2), at the engine's rate, mono.
    fn accepts_encoded(&self, format: crate::audio::AudioFormat) -> bool {
        matches!(
            format,
            crate::audio::AudioFormat::Mp3 | crate::audio::AudioFormat::Aac
        )
    }

    fn readiness(&self) -> Readiness {
        let in_use = self.settings.max_concurrency - self.slots.available_permits();
        let ready = self.settings.credentials.is_some();
        Readiness {
            ready,
            detail: if ready {
                format!("Tencent real-time ASR at {}", self.settings.realtime_url)
            } else {
                "credentials missing: set TENCENT_APP_ID, TENCENT_SECRET_ID, TENCENT_SECRET_KEY"
                    .into()
            },
            stats: Some(serde_json::json!({
                "streams_open": in_use,
                "max_concurrency": self.settings.max_concurrency,
            })),
        }
    }

    fn open(
        &self,
        opts: &StreamOptions,
        cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let creds = self.credentials()?;
        let permit = Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            ProviderError::Busy(format!(
                "provider {}: all {} concurrent Tencent streams of this account are in use",
                self.name, self.settings.max_concurrency
            ))
        })?;
        realtime::open(
            Arc::clone(&self.settings),
            creds,
            opts.clone(),
            cancel,
            permit,
        )
    }

    async fn recognize(
        &self,
        audio: OneShotAudio,
        opts: &StreamOptions,
    ) -> Result<Vec<Recognition>, ProviderError> {
        let creds = self.credentials()?;
        sentence::recognize(&self.http, &self.settings.api_url, &creds, &audio, opts).await
    }
}

/// Maps a Tencent real-time error code (doc 1093/48982, error code table) to voxpoll's code.
pub fn realtime_error_code(code: i64) -> &'static str {
    match code {
        4000 => "provider_pacing",
        4001 => "provider_invalid_parameter",
        4002 => "provider_auth_failed",
        4003..=4005 => "provider_account",
        4006 => "provider_busy",
        4007 => "provider_audio_rejected",
        4008 => "provider_timeout",
        5000..=5002 => "provider_unavailable",
        6001 => "provider_region",
        _ => "provider_error",
    }
}
