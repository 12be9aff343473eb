//! booking-api: serve the HTTP API, or run one of its maintenance commands.

use clap::{Parser, Subcommand};
use engine::db::Scope;
use engine::ids::DropId;
use engine::scripts::Redis;
use engine::{Config, Engine};

/// mimalloc, not glibc's malloc: a reserve allocates and frees a few dozen small buffers (the
/// request, its JSON, fred's frames), and glibc's free lists were ≈ 17 % of booking-api's CPU
/// under load (perf, 6,000 reserves/s). The servers' tests run in-process on the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "booking-api", about = "Floodgate's booking API", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default). Configuration: defaults, FLOODGATE_CONFIG file, FLOODGATE_* env.
    Serve,
    /// Create an API key; prints it once on the last line of stdout.
    CreateKey {
        #[arg(long, value_parser = ["seller", "ops"])]
        scope: String,
        #[arg(long, default_value = "unnamed")]
        name: String,
    },
    /// Rebuild drops' Redis state from Postgres (the recovery procedure, run by hand).
    Rebuild {
        /// One drop; without it every open (or recently closed) drop.
        #[arg(long)]
        drop_id: Option<String>,
    },
    /// Print `FCALL <function> <numkeys> <keys...> <args...>`, the reserve call as the engine makes
    /// it, for redis-benchmark against a drop (GA, first SKU, quantity 1), with `__rand_int__` for
    /// per-call uniqueness; with `--evalsha`, `EVALSHA <sha> ...` of the same code as a script.
    BenchArgs {
        #[arg(long)]
        drop_id: String,
        #[arg(long)]
        evalsha: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    web::process::init_logging();
    let cli = Cli::parse();
    let cfg = Config::load()?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cfg).await,
        Command::CreateKey { scope, name } => {
            let scope = Scope::parse(&scope)
                .ok_or_else(|| anyhow::anyhow!("scope must be seller or ops"))?;
            let key = Engine::create_key(&cfg, scope, &name).await?;
            println!("{key}");
            Ok(())
        }
        Command::Rebuild { drop_id } => {
            let engine = Engine::start(cfg).await?;
            let drops = match drop_id {
                Some(d) => vec![DropId::parse(&d)?],
                None => engine.live_drops().await?,
            };
            for drop in drops {
                let (kept, ended) = engine.recover(&drop).await?;
                println!("{drop}: rebuilt from Postgres ({kept} live holds kept, {ended} ended)");
            }
            Ok(())
        }
        Command::BenchArgs { drop_id, evalsha } => {
            let drop = DropId::parse(&drop_id)?;
            let engine = Engine::start(cfg).await?;
            let def = engine.drop_def(&drop).await?;
            let sku = def
                .buckets
                .first()
                .map(|b| b.id.clone())
                .unwrap_or_default();
            // The idempotency key ends in 32 digits, as a request's digest does (engine::keys):
            // 20 zeros and redis-benchmark's 12.
            let keys =
                Redis::bench_keys(&drop, &format!("fg:{{{drop}}}:idem:{:020}__rand_int__", 0));
            let args = [
                "bench__rand_int__".to_owned(),
                format!("{drop}-h__rand_int__"),
                "0".to_owned(),
                "items".to_owned(),
                // No session ends (reserve.lua reads a non-number as none; an empty argument
                // wouldn't survive the shell's word splitting).
                "-".to_owned(),
                "-".to_owned(),
                sku,
                "1".to_owned(),
            ];
            let call = if evalsha {
                format!("EVALSHA {}", engine.reserve_script_sha())
            } else {
                format!("FCALL {}", engine.reserve_function())
            };
            println!(
                "{} {} {} {}",
                call,
                keys.len(),
                keys.join(" "),
                args.join(" ")
            );
            Ok(())
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let running = booking_api::start(cfg).await?;
    println!("booking-api listening on {}", running.url());
    web::process::shutdown_signal().await?;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
