//! The `voxpoll` binary: `serve` and `transcribe`.

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "voxpoll",
    version,
    about = "Realtime speech recognition over HTTP long-polling"
)]
struct Cli {
    /// Log line format on stderr: `text` (human) or `json` (one JSON object per line, with the
    /// session span's id, provider and epoch on every line a session causes).
    #[arg(long, global = true, env = "VOXPOLL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve(Box<voxpoll::config::Config>),
    /// Stream an audio file through a server the way a mini-program does and print the transcript.
    Transcribe(voxpoll::client::TranscribeArgs),
    /// Probe a deployment (reachability, TLS, WebSocket upgrade, held-request cut, buffering,
    /// body cap) and print the settings to use.
    Doctor(voxpoll::doctor::DoctorArgs),
}

fn init_tracing(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            init_tracing(cli.log_format, "voxpoll=info,warp=warn");
            let addr = config.listen_addr(std::env::var("PORT").ok().as_deref())?;
            let listener = voxpoll::app::bind(addr)?;
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            let state = voxpoll::app::build(*config, None, shutdown.clone()).await?;
            voxpoll::app::run(listener, state, shutdown).await
        }
        Command::Transcribe(args) => {
            init_tracing(cli.log_format, "voxpoll=warn,warp=warn");
            voxpoll::client::transcribe(args).await
        }
        Command::Doctor(args) => {
            init_tracing(cli.log_format, "voxpoll=warn,warp=warn");
            voxpoll::doctor::run(args).await
        }
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot install SIGTERM handler");
                        let _ = ctrl_c.await;
                        shutdown.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        shutdown.cancel();
    });
}
