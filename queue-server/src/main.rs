//! queue-server: serve the waiting room. Configuration: defaults, FLOODGATE_CONFIG file,
//! FLOODGATE_* env (its own section is `queue`, e.g. FLOODGATE_QUEUE__LISTEN).

use engine::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOODGATE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = Config::load()?;
    let running = queue_server::start(cfg).await?;
    println!("queue-server listening on {}", running.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
