//! queue-server: serve the waiting room. Configuration: defaults, FLOODGATE_CONFIG file,
//! FLOODGATE_* env (its own section is `queue`, e.g. FLOODGATE_QUEUE__LISTEN).

use engine::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    web::process::init_logging();
    let cfg = Config::load()?;
    let running = queue_server::start(cfg).await?;
    println!("queue-server listening on {}", running.url());
    web::process::shutdown_signal().await?;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
