//! queue-server starts only what it uses: it never migrates Postgres (booking-api owns the
//! schema) and refuses, with a clear error, to start on a database booking-api hasn't migrated.

use testkit::test_config;

#[tokio::test]
async fn queue_server_refuses_an_unmigrated_database_and_migrates_nothing() {
    let mut cfg = test_config();
    // A search path naming a schema that doesn't exist: the database looks never migrated, and
    // a server that tried to migrate would fail on CREATE TABLE instead (no schema to create in).
    let sep = if cfg.database.url.contains('?') {
        '&'
    } else {
        '?'
    };
    cfg.database.url = format!(
        "{}{sep}options=-csearch_path%3Dnot_migrated_{:016x}",
        cfg.database.url,
        rand::random::<u64>()
    );
    let err = match queue_server::start(cfg).await {
        Ok(_) => panic!("queue-server started on an unmigrated database"),
        Err(e) => e,
    };
    assert_eq!(err.code.name(), "unavailable", "{err:?}");
    assert!(
        err.to_string().contains("booking-api"),
        "the error should say to start booking-api first: {err}"
    );
}
