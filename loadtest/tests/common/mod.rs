//! What loadtest's tests share: a booking-api and a queue-server started in process on the Redis
//! and Postgres that `./dev test` started, as the scenarios meet them in a deployment.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

/// Both servers, a client of booking-api with a seller and an ops key, and where Redis and
/// Postgres are (loadtest's checks read them too).
pub struct Servers {
    pub booking: booking_api::Running,
    pub queue: queue_server::Running,
    pub client: testkit::BookingClient,
    pub redis_url: String,
    pub database_url: String,
}

impl Servers {
    /// Starts both with `cfg` (from [`config`]); keys named after `name`.
    pub async fn start(cfg: engine::Config, name: &str) -> Servers {
        let (redis_url, database_url) = (cfg.redis.url.clone(), cfg.database.url.clone());
        let booking = booking_api::start(cfg.clone())
            .await
            .expect("booking-api starts");
        let mut qcfg = cfg;
        qcfg.queue.booking_public_url = booking.url();
        let queue = queue_server::start(qcfg)
            .await
            .expect("queue-server starts");
        let client =
            testkit::BookingClient::with_new_keys(booking.url(), &booking.engine, name).await;
        Servers {
            booking,
            queue,
            client,
            redis_url,
            database_url,
        }
    }

    pub async fn shutdown(self) {
        self.queue.shutdown().await;
        self.booking.shutdown().await;
    }
}

/// The test config with one dev identity for both servers: booking-api signs the fans' tokens,
/// queue-server verifies them (each would make up its own secret otherwise).
pub fn config() -> engine::Config {
    let mut cfg = testkit::test_config();
    cfg.identity.dev_secret = format!("loadtest-{:016x}", rand::random::<u64>());
    cfg
}
