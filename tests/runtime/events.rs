//! The event recorder against a real replica: repeats become a count on one Event, many
//! different messages for one reason become one combined Event, and a burst per object caps
//! what a crash loop can write.

use std::time::Duration;

use keel::api::kinds::Kind;
use keel::client::{Client, ListOptions};
use keel::controllers::runtime::{EventLimits, EventRecorder};
use keel::proto::v1 as pb;

fn pod_ref(name: &str) -> pb::ObjectReference {
    pb::ObjectReference {
        kind: "Pod".into(),
        namespace: "default".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        api_version: "v1".into(),
        ..Default::default()
    }
}

async fn events_about(client: &Client, name: &str) -> Vec<pb::CoreEvent> {
    let opts = ListOptions {
        namespace: "default".into(),
        field_selector: format!("involvedObject.name={name}"),
        ..Default::default()
    };
    client
        .list_all(Kind::Event, &opts)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| match o.kind {
            Some(pb::object::Kind::Event(e)) => Some(e),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_events_aggregate_and_a_crash_loop_cannot_flood_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (_replica, addr, pki) = keel::harness::single_replica(&dir.path().join("r")).await.unwrap();
    let client = Client::with_certificate(&[addr], Duration::from_secs(5), &pki.admin).unwrap();
    let recorder = EventRecorder::new(client.clone(), "test-controller", "host-1", EventLimits::default());

    // The same event five times: one Event, count 5.
    for _ in 0..5 {
        assert!(recorder
            .record(&pod_ref("web"), "Warning", "BackOff", "Back-off restarting failed container")
            .await
            .unwrap());
    }
    let ev = events_about(&client, "web").await;
    assert_eq!(ev.len(), 1, "{ev:#?}");
    assert_eq!(ev[0].count, 5);
    assert_eq!((ev[0].reason.as_str(), ev[0].r#type.as_str()), ("BackOff", "Warning"));
    assert_eq!(ev[0].source.as_ref().unwrap().component, "test-controller");
    assert!(ev[0].last_timestamp >= ev[0].first_timestamp);

    // Fourteen different messages for one reason: ten Events, then one combined Event that
    // counts the rest.
    for i in 0..14 {
        recorder.record(&pod_ref("db"), "Warning", "Failed", &format!("attempt {i} failed")).await.unwrap();
    }
    let ev = events_about(&client, "db").await;
    let combined: Vec<&pb::CoreEvent> =
        ev.iter().filter(|e| e.message.starts_with("(combined from similar events): ")).collect();
    assert_eq!(ev.len(), 11, "{:#?}", ev.iter().map(|e| (&e.message, e.count)).collect::<Vec<_>>());
    assert_eq!(combined.len(), 1);
    assert_eq!(combined[0].count, 4, "the 11th to 14th message count on the combined event");
    assert_eq!(combined[0].message, "(combined from similar events): attempt 13 failed");

    // A crash loop: 100 events about one object; at most a burst of 25 is written.
    let mut written = 0;
    for i in 0..100 {
        written +=
            usize::from(recorder.record(&pod_ref("loop"), "Normal", "Started", &format!("run {i}")).await.unwrap());
    }
    assert_eq!(written, 25, "the spam filter's burst");
    let ev = events_about(&client, "loop").await;
    let total: i32 = ev.iter().map(|e| e.count).sum();
    assert_eq!(total, 25);
    assert!(ev.len() <= 11, "at most ten distinct and one combined: {}", ev.len());
    assert!(recorder.cached() <= EventLimits::default().cache_entries);
}
