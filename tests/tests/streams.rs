//! Streams are configured, not hard-coded: every service creates a missing
//! stream with the configured settings, and the tracker brings an existing
//! one to them at start.

use std::time::Duration;

use corral_common::streams::{StreamSettings, Streams};
use corral_tests::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_brings_existing_streams_to_the_configured_settings() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    let js = client.jetstream().clone();
    let info = |name: String| {
        let js = js.clone();
        async move {
            js.get_stream(&name)
                .await
                .expect("stream")
                .info()
                .await
                .expect("info")
                .config
                .clone()
        }
    };
    let events = info(env.subjects.events_stream()).await;
    assert_eq!(
        events.max_age,
        Duration::from_secs(7 * 24 * 3600),
        "the default"
    );
    assert_eq!(events.max_bytes, -1);
    tracker.stop().await;

    let mut config = env.tracker_config();
    config.streams = Streams {
        events: StreamSettings {
            max_age_secs: 3600,
            max_bytes: 64 << 20,
            discard: "new".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let tracker = env.start_tracker_with(config).await;
    let events = info(env.subjects.events_stream()).await;
    assert_eq!(events.max_age, Duration::from_secs(3600));
    assert_eq!(events.max_bytes, 64 << 20);
    assert_eq!(
        events.discard,
        async_nats::jetstream::stream::DiscardPolicy::New
    );
    let lifecycle = info(env.subjects.lifecycle_stream()).await;
    assert_eq!(
        lifecycle.max_age,
        Duration::from_secs(7 * 24 * 3600),
        "the others keep theirs"
    );

    // A setting that is no setting stops the tracker, naming it.
    tracker.stop().await;
    let mut config = env.tracker_config();
    config.streams.events.discard = "oldest".into();
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        corral_tracker::run(config, tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("the tracker stops at once")
    .expect_err("an unknown discard policy");
    let text = refused.to_string();
    assert!(text.contains(&env.subjects.events_stream()), "{text}");
    assert!(text.contains("discard \"oldest\""), "{text}");

    env.cleanup().await;
}
