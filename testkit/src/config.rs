//! The test deployment's config: both servers on `127.0.0.1:0`, the dev identity provider on, a
//! known admission secret, limiters out of the way and background loops on short intervals.

use engine::Config;

/// What test servers sign and verify admission tokens with; tests that sign their own use it.
pub const ADMISSION_SECRET: &str = "test-admission-secret";

/// The config for the Redis and Postgres that `./dev test` started
/// (`FLOODGATE_TEST_REDIS_URL`, `FLOODGATE_TEST_DATABASE_URL`).
pub fn test_config() -> Config {
    let redis = std::env::var("FLOODGATE_TEST_REDIS_URL")
        .expect("run tests with ./dev test (FLOODGATE_TEST_REDIS_URL)");
    let db = std::env::var("FLOODGATE_TEST_DATABASE_URL")
        .expect("run tests with ./dev test (FLOODGATE_TEST_DATABASE_URL)");
    let mut cfg = test_config_for(&redis, &db);
    // That Postgres is full of other tests' drops: a test server looks after only the drops it
    // served itself, so its sweeper, reconciler and watcher never touch another test's drop.
    cfg.reconciler.watch_newest_drops = 0;
    cfg
}

/// The test config against a stack of the test's own (the fault tests start and break theirs).
/// It looks after the newest drops in that Postgres, as production does.
pub fn test_config_for(redis_url: &str, database_url: &str) -> Config {
    let mut cfg = Config::default();
    // Parsing a literal address: can't fail.
    cfg.http.listen = "127.0.0.1:0".parse().expect("an address");
    cfg.queue.listen = "127.0.0.1:0".parse().expect("an address");
    cfg.redis.url = redis_url.to_owned();
    cfg.database.url = database_url.to_owned();
    cfg.database.pool_size = 8;
    cfg.identity.dev = true;
    cfg.admission.secrets = vec![ADMISSION_SECRET.into()];
    // Tests hammer from one address and one fan on purpose; the limiters have their own tests.
    cfg.limits.per_ip_per_s = 1_000_000;
    cfg.limits.per_ip_burst = 1_000_000;
    cfg.limits.per_fan_per_s = 1_000_000;
    cfg.limits.per_fan_burst = 1_000_000;
    cfg.queue.per_ip_per_s = 1_000_000;
    cfg.queue.per_ip_burst = 1_000_000;
    cfg.queue.per_ip_join_per_s = 1_000_000;
    cfg.queue.per_ip_join_burst = 1_000_000;
    cfg.queue.per_fan_poll_per_s = 1_000_000;
    cfg.queue.per_fan_poll_burst = 1_000_000;
    // A stack of the test's own holds only its drops: look after the newest as production does,
    // so a server started after a fault recovers drops it never served (`test_config` turns
    // this off on the shared stack).
    cfg.reconciler.max_drops_watched = 20;
    cfg.reconciler.watch_newest_drops = 20;
    // Short loops, so expiry, reconciling and exact positions happen within a test's patience.
    cfg.holds.sweep_interval_ms = 100;
    cfg.reconciler.interval_ms = 200;
    cfg.reconciler.watch_interval_ms = 200;
    cfg.holds.confirm_timeout_ms = 5_000;
    cfg.holds.confirm_safety_margin_ms = 1_000;
    cfg.gateway.timeout_ms = 300;
    cfg.gateway.test_slow_ms = 500;
    cfg.queue.position_interval_ms = 500;
    // Tests read a seat map right after changing it: no snapshot outlives the request that
    // asked (the seat map suite sets its own refresh).
    cfg.seats.map_refresh_ms = 0;
    cfg
}
