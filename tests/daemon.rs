//! Integration tests of the daemon served in this process (`serve_with` on `127.0.0.1:0`) and
//! called over the real transport with tonic clients.

mod support;

use mistguard::daemon::pb::{self, guard_client::GuardClient};
use mistguard::daemon::Control;
use std::time::Duration;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test step timed out")
}

fn req(text: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        text: text.to_string(),
        ..Default::default()
    }
}

fn subject_req(text: &str, subject: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        text: text.to_string(),
        subject: subject.to_string(),
        ..Default::default()
    }
}

fn chunk(text: &str) -> pb::ClassifyStreamRequest {
    pb::ClassifyStreamRequest {
        text: text.to_string(),
        ..Default::default()
    }
}

/// Opens a ClassifyStream whose requests the test feeds through the returned sender.
async fn open_stream(
    client: &mut GuardClient<Channel>,
) -> (
    mpsc::Sender<pb::ClassifyStreamRequest>,
    Streaming<pb::ClassifyStreamResponse>,
) {
    let (tx, rx) = mpsc::channel(16);
    let responses = within(client.classify_stream(ReceiverStream::new(rx)))
        .await
        .expect("stream opens")
        .into_inner();
    (tx, responses)
}

async fn ok_after(client: &mut GuardClient<Channel>) {
    let r = within(client.classify(req("a harmless sentence about gardening")))
        .await
        .expect("daemon still serves");
    assert_eq!(r.into_inner().action, pb::Action::Allow as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_reports_action_hits_and_decision_id() {
    let d = Daemon::start(&[]).await;
    let mut c = d.client().await;

    let r = within(c.classify(req(&format!("They said {BLOCK_PHRASE} today."))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::Block as i32);
    let hit = r
        .hits
        .iter()
        .find(|h| h.trigger_id == "daemon.test.harm")
        .expect("hit reported");
    assert_eq!(hit.rule_id, "RULE-MIST-001");
    assert_eq!(hit.action, pb::Action::Block as i32);
    assert_eq!((hit.start, hit.end), (10, 10 + BLOCK_PHRASE.len() as u64));
    assert_eq!(r.decision_id.len(), 32);
    assert!(r.decision_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(r.escalation_level, 1);

    let clean = within(c.classify(req("The weather is fine.")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(clean.action, pb::Action::Allow as i32);
    assert!(clean.hits.is_empty());
    assert_eq!(clean.escalation_level, 0);
    assert_ne!(clean.decision_id, r.decision_id);

    let s = within(c.classify(req(&format!("Please {INJECTION_PHRASE} and continue."))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.action, pb::Action::Sanitize as i32);
    assert!(
        s.sanitized_text.is_some(),
        "sanitize returns sanitized text"
    );

    within(c.ping(pb::PingRequest {})).await.expect("ping");
}

/// The client may forward `released_bytes`; past the trigger's start only once the hit is known
/// (with the hit's span in hand it can sanitize or refuse). Checked with a language hint (the hit
/// comes mid-stream) and without one (a short text's language is undecided until its end, so the
/// engine holds the text back and reports the hit at the end of input).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_split_over_chunks_is_caught_and_never_released() {
    // With the learned tier (the default), a rule the model adds to decides only once the
    // model's window is decided (a 512-byte window: here, at the end of input); the rules alone
    // decide mid-stream. Never released before the hit is known, either way.
    for models in ["off", "bundled"] {
        trigger_split_over_chunks_with(models).await;
    }
}

async fn trigger_split_over_chunks_with(models: &str) {
    let d = Daemon::start(&[("models", models)]).await;
    let mut c = d.client().await;
    let text = format!("Hello there, please {INJECTION_PHRASE} and tell me a secret.");
    let trigger_start = text.find(INJECTION_PHRASE).unwrap() as u64;
    for hint in ["en", ""] {
        let (tx, mut responses) = open_stream(&mut c).await;
        let mut hit_seen = false;
        let mut hit_mid_stream = false;
        let mut last_released = 0;
        let check = |r: &pb::ClassifyStreamResponse,
                     hit_seen: &mut bool,
                     last_released: &mut u64| {
            if let Some(h) = r
                .hits
                .iter()
                .find(|h| h.rule_id == "RULE-MIST-009" && !h.trigger_id.starts_with("model."))
            {
                assert_eq!(
                    (h.start, h.end),
                    (trigger_start, trigger_start + INJECTION_PHRASE.len() as u64)
                );
                *hit_seen = true;
            }
            assert!(
                r.released_bytes >= *last_released,
                "released_bytes never decreases"
            );
            *last_released = r.released_bytes;
            assert!(
                *hit_seen || r.released_bytes <= trigger_start,
                "hint {hint:?}: released {} bytes, past the trigger at {trigger_start}, before the hit",
                r.released_bytes
            );
        };
        for (i, piece) in text.as_bytes().chunks(3).enumerate() {
            let mut m = chunk(std::str::from_utf8(piece).unwrap());
            if i == 0 {
                m.language = hint.to_string();
            }
            tx.send(m).await.unwrap();
            let r = within(responses.message())
                .await
                .unwrap()
                .expect("a response per chunk");
            assert!(!r.r#final);
            check(&r, &mut hit_seen, &mut last_released);
            hit_mid_stream |= hit_seen;
        }
        drop(tx); // half-close: end of input
        let last = within(responses.message())
            .await
            .unwrap()
            .expect("final response");
        assert!(last.r#final);
        assert_eq!(last.reason, "end_of_input");
        check(&last, &mut hit_seen, &mut last_released);
        assert!(hit_seen, "hint {hint:?}: the split trigger was reported");
        if hint == "en" && models == "off" {
            assert!(
                hit_mid_stream,
                "with a language hint the hit comes before the end of input"
            );
        }
        assert_eq!(last.action, pb::Action::Sanitize as i32);
        assert!(
            within(responses.message()).await.unwrap().is_none(),
            "stream ends after the final response"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_stream_releases_everything_at_end() {
    let d = Daemon::start(&[]).await;
    let mut c = d.client().await;
    let (tx, mut responses) = open_stream(&mut c).await;
    let text = "A calm paragraph about tomatoes and the weather in spring.";
    for piece in text.as_bytes().chunks(7) {
        tx.send(chunk(std::str::from_utf8(piece).unwrap()))
            .await
            .unwrap();
        let r = within(responses.message()).await.unwrap().unwrap();
        assert_eq!(r.action, pb::Action::Allow as i32);
    }
    drop(tx);
    let last = within(responses.message()).await.unwrap().unwrap();
    assert!(last.r#final);
    assert_eq!(last.released_bytes, text.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_ends_the_stream_with_a_final_response() {
    let d = Daemon::start(&[]).await;
    let mut c = d.client().await;
    let (tx, mut responses) = open_stream(&mut c).await;
    let preamble = "The message is: ";
    tx.send(pb::ClassifyStreamRequest {
        text: preamble.into(),
        language: "en".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let first = within(responses.message()).await.unwrap().unwrap();
    assert_eq!(first.action, pb::Action::Allow as i32);
    tx.send(chunk(BLOCK_PHRASE)).await.unwrap();
    tx.send(chunk(" and more text")).await.unwrap();
    // The client keeps sending: the daemon still ends the stream on the block.
    let keep_sending = tokio::spawn(async move {
        for _ in 0..50 {
            if tx.send(chunk(" filler")).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut last = None;
    for _ in 0..60 {
        let r = within(responses.message())
            .await
            .unwrap()
            .expect("the stream ends with a final response");
        assert!(
            r.released_bytes <= preamble.len() as u64,
            "the blocked phrase was released"
        );
        if r.r#final {
            last = Some(r);
            break;
        }
    }
    let last = last.expect("a final response");
    assert_eq!(last.action, pb::Action::Block as i32);
    assert_eq!(last.reason, "blocked");
    assert!(last.hits.iter().any(|h| h.rule_id == "RULE-MIST-001"));
    assert_eq!(last.decision_id, first.decision_id);
    assert!(
        within(responses.message()).await.unwrap().is_none(),
        "no response after the final one"
    );
    keep_sending.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_get_resource_exhausted() {
    let d = Daemon::start(&[("max_message_bytes", "4KiB")]).await;
    let mut c = d.client().await;
    // Just over the limit: checked by the handler.
    let e = within(c.classify(req(&"a".repeat(4 * 1024 + 1))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("4096"), "{}", e.message());
    // Far over it: refused by the decoder, still RESOURCE_EXHAUSTED.
    let e = within(c.classify(req(&"a".repeat(200 * 1024))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    ok_after(&mut c).await;

    let (tx, mut responses) = open_stream(&mut c).await;
    tx.send(chunk(&"b".repeat(300 * 1024))).await.unwrap();
    let e = within(responses.message()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    ok_after(&mut c).await;
    let m = d.metrics().await;
    assert!(
        metric_value(
            &m,
            "mistguard_rejected_total",
            &["reason=\"message_too_large\""]
        ) >= 3.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_caps_and_idle_timeout() {
    let d = Daemon::start(&[
        ("stream_max_chunks", "5"),
        ("stream_max_bytes", "64"),
        ("stream_idle_timeout", "1s"),
    ])
    .await;
    let mut c = d.client().await;

    // Too many chunks.
    let (tx, mut responses) = open_stream(&mut c).await;
    let mut err = None;
    for _ in 0..6 {
        tx.send(chunk("ab")).await.unwrap();
        match within(responses.message()).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("stream ended without a status"),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = err.expect("the sixth chunk is refused");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("chunks"), "{}", e.message());

    // Too many bytes.
    let (tx, mut responses) = open_stream(&mut c).await;
    tx.send(chunk(&"x".repeat(40))).await.unwrap();
    within(responses.message()).await.unwrap().unwrap();
    tx.send(chunk(&"x".repeat(40))).await.unwrap();
    let e = within(responses.message()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("bytes"), "{}", e.message());

    // Idle.
    let (tx, mut responses) = open_stream(&mut c).await;
    tx.send(chunk("hello")).await.unwrap();
    within(responses.message()).await.unwrap().unwrap();
    let e = within(responses.message()).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    drop(tx);
    ok_after(&mut c).await;
}

/// A mirror of `ClassifyRequest` whose `text` is `bytes`, to send invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawClassifyRequest {
    #[prost(bytes = "vec", tag = "1")]
    text: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_malformed_messages_get_an_error_status() {
    let d = Daemon::start(&[]).await;
    let channel = d.channel().await;
    let mut grpc = tonic::client::Grpc::new(channel.clone());

    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<RawClassifyRequest, pb::ClassifyResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/mistguard.v1.Guard/Classify");
    let bad = RawClassifyRequest {
        text: vec![b'h', b'i', 0xff, 0xfe, b'!'],
    };
    let e = within(grpc.unary(Request::new(bad.clone()), path, codec))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // The same on a stream.
    grpc.ready().await.unwrap();
    let codec =
        tonic_prost::ProstCodec::<RawClassifyRequest, pb::ClassifyStreamResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/mistguard.v1.Guard/ClassifyStream");
    let reqs = tokio_stream::iter(vec![
        RawClassifyRequest {
            text: b"fine".to_vec(),
        },
        bad,
    ]);
    let mut responses = within(grpc.streaming(Request::new(reqs), path, codec))
        .await
        .unwrap()
        .into_inner();
    let mut status: Option<Status> = None;
    while let Some(item) = within(responses.next()).await {
        if let Err(e) = item {
            status = Some(e);
            break;
        }
    }
    let e = status.expect("an error status for the bad chunk");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Bytes that are not protobuf at all.
    grpc.ready().await.unwrap();
    #[derive(Clone, PartialEq, prost::Message)]
    struct Garbage {
        #[prost(fixed64, tag = "1")]
        text: u64,
    }
    let codec = tonic_prost::ProstCodec::<Garbage, pb::ClassifyResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/mistguard.v1.Guard/Classify");
    let e = within(grpc.unary(Request::new(Garbage { text: 7 }), path, codec))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let mut c = GuardClient::new(channel);
    ok_after(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_shed_and_cancelled_streams_free_their_slot() {
    let d = Daemon::start(&[("max_streams", "1")]).await;
    let mut c = d.client().await;
    let (tx, mut responses) = open_stream(&mut c).await;
    tx.send(chunk("one")).await.unwrap();
    within(responses.message()).await.unwrap().unwrap();

    let (_tx2, rx2) = mpsc::channel::<pb::ClassifyStreamRequest>(1);
    let e = within(c.classify_stream(ReceiverStream::new(rx2)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // Cancel the first stream: its slot (and state) is freed.
    drop(responses);
    drop(tx);
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (tx3, rx3) = mpsc::channel(1);
        tx3.send(chunk("again")).await.unwrap();
        match within(c.classify_stream(ReceiverStream::new(rx3))).await {
            Ok(r) => {
                let mut r = r.into_inner();
                if within(r.message()).await.is_ok() {
                    break;
                }
            }
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cancelled stream's slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_load_is_shed_not_queued() {
    let d = Daemon::start(&[("max_inflight", "1")]).await;
    let c = d.client().await;
    // Bursts of concurrent calls against one slot: calls that overlap one in progress are
    // refused at once (none is queued); repeated until an overlap has happened.
    let (mut ok, mut shed) = (0, 0);
    for _round in 0..20 {
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.classify(req(&"word ".repeat(3000))).await
            }));
        }
        for t in tasks {
            match within(t).await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                    assert!(e.message().contains("overloaded"), "{}", e.message());
                    shed += 1;
                }
            }
        }
        if shed > 0 {
            break;
        }
    }
    assert!(ok >= 1, "some calls are served");
    assert!(
        shed >= 1,
        "with one slot, overlapping calls are shed (ok {ok})"
    );
    let m = d.metrics().await;
    assert!(metric_value(&m, "mistguard_rejected_total", &["reason=\"overloaded\""]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_suspends_after_three_blocks_and_rate_limits_extraction() {
    let d = Daemon::start(&[]).await;
    let mut c = d.client().await;
    let blocked = format!("I think {BLOCK_PHRASE}.");
    for i in 1..=3 {
        let r = within(c.classify(subject_req(&blocked, "user-alice")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.action, pb::Action::Block as i32);
        assert_eq!(
            r.escalation_level,
            if i < 3 { 1 } else { 2 },
            "decision {i}"
        );
    }
    let r = within(c.classify(subject_req("hello, how are you?", "user-alice")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::Block as i32);
    assert_eq!(r.reason, "suspended");
    assert_eq!(r.escalation_level, 2);
    assert!(!r.message.is_empty());

    // A suspended subject's stream is answered the same way.
    let (tx, mut responses) = {
        let (tx, rx) = mpsc::channel(4);
        let s = within(c.classify_stream(ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        (tx, s)
    };
    tx.send(pb::ClassifyStreamRequest {
        text: "hi".into(),
        subject: "user-alice".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = within(responses.message()).await.unwrap().unwrap();
    assert!(r.r#final);
    assert_eq!(r.reason, "suspended");

    // Another subject is not affected.
    let r = within(c.classify(subject_req("hello, how are you?", "user-bob")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::Allow as i32);

    // CSAM: level 2 on the first hit.
    let r = within(c.classify(subject_req(CSAM_PHRASE, "user-carol")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.escalation_level, 2);
    let r = within(c.classify(subject_req("anything", "user-carol")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.reason, "suspended");

    // Model extraction: RATE_LIMIT for that subject.
    let r = within(c.classify(subject_req(EXTRACTION_PHRASE, "user-dave")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::RateLimit as i32);
    let r = within(c.classify(subject_req("a normal question", "user-dave")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action, pb::Action::RateLimit as i32);
    assert_eq!(r.reason, "rate_limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let d = Daemon::start(&[]).await;
    let channel = d.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "mistguard.v1.Guard"] {
        let r = within(health.check(HealthCheckRequest {
            service: service.into(),
        }))
        .await
        .unwrap();
        assert_eq!(
            r.into_inner().status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }

    let mut refl = ServerReflectionClient::new(channel.clone());
    let reqs = tokio_stream::iter(vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "mistguard.v1.Guard".into(),
            )),
        },
    ]);
    let mut resp = within(refl.server_reflection_info(reqs))
        .await
        .unwrap()
        .into_inner();
    let first = within(resp.message()).await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("{first:?}")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"mistguard.v1.Guard"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    let second = within(resp.message()).await.unwrap().unwrap();
    assert!(
        matches!(
            second.message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        ),
        "{second:?}"
    );

    // v1alpha too (grpcio-reflection and several GUI clients speak only it).
    {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut refl = ServerReflectionClient::new(channel.clone());
        let reqs = tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]);
        let mut resp = within(refl.server_reflection_info(reqs))
            .await
            .unwrap()
            .into_inner();
        let first = within(resp.message()).await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
            panic!("{first:?}")
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"mistguard.v1.Guard"), "{names:?}");
    }

    // Shutdown: health turns NOT_SERVING, new calls are refused.
    let mut c = d.client().await;
    d.control.send(Control::Shutdown).await.unwrap();
    within(d.task).await.unwrap().unwrap();
    let e = within(c.ping(pb::PingRequest {})).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_open_streams_a_final_response() {
    let d = Daemon::start(&[("drain_deadline", "5s")]).await;
    let mut c = d.client().await;
    let (tx, mut responses) = open_stream(&mut c).await;
    tx.send(chunk("some text in flight")).await.unwrap();
    within(responses.message()).await.unwrap().unwrap();
    d.control.send(Control::Shutdown).await.unwrap();
    let last = within(responses.message())
        .await
        .unwrap()
        .expect("final response");
    assert!(last.r#final);
    assert_eq!(last.reason, "shutdown");
    assert_eq!(last.released_bytes, "some text in flight".len() as u64);
    within(d.task).await.unwrap().unwrap();
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "# operators\ntoken-aaaaaaaaaaaaaaaa\ntoken-bbbbbbbbbbbbbbbb\n",
    )
    .unwrap();
    let d = Daemon::start(&[("auth_tokens_file", tokens.to_str().unwrap())]).await;
    let mut c = d.client().await;
    let e = within(c.classify(req("hello"))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let mut r = Request::new(req("hello"));
    r.metadata_mut().insert(
        "authorization",
        "Bearer token-zzzzzzzzzzzzzzzz".parse().unwrap(),
    );
    assert_eq!(
        within(c.classify(r)).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let mut r = Request::new(req("hello"));
    r.metadata_mut().insert(
        "authorization",
        "Bearer token-bbbbbbbbbbbbbbbb".parse().unwrap(),
    );
    let ok = within(c.classify(r)).await.unwrap().into_inner();
    assert_eq!(ok.action, pb::Action::Allow as i32);

    // The scheme is case-insensitive (RFC 7235); the token is not.
    for header in [
        "bearer token-aaaaaaaaaaaaaaaa",
        "BEARER token-aaaaaaaaaaaaaaaa",
    ] {
        let mut r = Request::new(req("hello"));
        r.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        within(c.classify(r)).await.expect(header);
    }
    let mut r = Request::new(req("hello"));
    r.metadata_mut().insert(
        "authorization",
        "Bearer TOKEN-AAAAAAAAAAAAAAAA".parse().unwrap(),
    );
    assert_eq!(
        within(c.classify(r)).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Health stays open to probes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    within(health.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    }))
    .await
    .unwrap();
}

/// A language hint the rulesets do not support was silently ignored (the CLI refuses it), and a
/// direction outside the enum was taken: both are INVALID_ARGUMENT, on Classify and on streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_language_and_unknown_direction_are_invalid_argument() {
    let d = Daemon::start(&[]).await;
    let mut c = d.client().await;
    let supported = mistguard::lang::supported_codes();
    for language in ["xx", "tlh", "klingon"] {
        let e = within(c.classify(pb::ClassifyRequest {
            text: "hello".into(),
            language: language.into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{language}");
        assert!(e.message().contains(&supported), "{language}: {e:?}");
    }
    for direction in [4, 9, -1] {
        let e = within(c.classify(pb::ClassifyRequest {
            text: "hello".into(),
            direction,
            ..Default::default()
        }))
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{direction}");
        assert!(e.message().contains("DIRECTION_INPUT"), "{e:?}");
    }
    for first in [
        pb::ClassifyStreamRequest {
            text: "hello".into(),
            language: "xx".into(),
            ..Default::default()
        },
        pb::ClassifyStreamRequest {
            text: "hello".into(),
            direction: 9,
            ..Default::default()
        },
    ] {
        let (tx, mut responses) = open_stream(&mut c).await;
        tx.send(first).await.unwrap();
        let e = within(responses.message()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    // Supported codes, with or without a region, and the known directions still work.
    for (language, direction) in [("fr", 1), ("pt-BR", 2), ("", 0), ("EN", 1)] {
        let r = within(c.classify(pb::ClassifyRequest {
            text: "hello".into(),
            language: language.into(),
            direction,
            ..Default::default()
        }))
        .await
        .unwrap();
        assert_eq!(r.into_inner().action, pb::Action::Allow as i32);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_exports_prefixed_metrics() {
    let d = Daemon::start(&[]).await;
    let mut c = d.client().await;
    within(c.classify(req(&format!("x {BLOCK_PHRASE} y"))))
        .await
        .unwrap();
    let m = d.metrics().await;
    assert!(
        metric_value(
            &m,
            "mistguard_requests_total",
            &["rpc=\"classify\"", "code=\"ok\""]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            "mistguard_hits_total",
            &[
                "rule=\"RULE-MIST-001\"",
                "action=\"block\"",
                "language=\"en\""
            ]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        m.contains("mistguard_request_duration_seconds_bucket"),
        "{m}"
    );
    assert!(m.contains("mistguard_ruleset_info{version="), "{m}");
    assert!(metric_value(&m, "mistguard_bytes_scanned_total", &["rpc=\"classify\""]) >= 1.0);
    for line in m.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        assert!(line.starts_with("mistguard_"), "unprefixed metric: {line}");
    }
}

#[test]
fn docs_list_every_setting_and_metric_and_the_example_config_is_valid() {
    use mistguard::daemon::config::SETTINGS;
    use mistguard::daemon::metrics::METRICS;
    let doc = std::fs::read_to_string(manifest_path("docs/DAEMON.md")).unwrap();
    for s in SETTINGS {
        assert!(
            doc.contains(&format!("`{}`", s.env_var())),
            "{} missing from docs/DAEMON.md",
            s.env_var()
        );
        assert!(
            doc.contains(&format!("`{}`", s.flag())),
            "{} missing from docs/DAEMON.md",
            s.flag()
        );
    }
    for (name, _) in METRICS.iter().chain(mistguard::io::moderation::METRICS) {
        assert!(
            doc.contains(&format!("`{name}`")),
            "{name} missing from docs/DAEMON.md"
        );
    }
    let path = manifest_path("deploy/mistguard.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let sources = mistguard::daemon::Sources::default()
        .with_file_text(&path, &text)
        .unwrap();
    let c = mistguard::daemon::Config::from_sources(&sources).unwrap();
    assert_eq!(c.listen, "127.0.0.1:50051".parse().unwrap());
    assert_eq!(c.escalation.level2_hits, 3);
}
