//! What an agent built without the `sinks` or `capture` feature does with the sections and
//! endpoints those features serve: it refuses them, naming the feature, never ignores
//! them. The same tests run on the default build (scripts/test.sh runs them again with
//! `--no-default-features --features onnxruntime`), where everything is accepted.

use std::io::{Read, Write};

use fleet_agent::api::{self, Api, ApiLimits};
use fleet_agent::config::AgentConfig;

fn config(text: &str) -> AgentConfig {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).expect("write agent.toml");
    AgentConfig::load(&path).expect("agent.toml parses in every build")
}

#[test]
fn a_configured_prediction_sink_is_refused_by_a_build_without_sinks() {
    let c = config(
        "[[prediction_sink]]\nkind = \"jsonl\"\npath = \"/tmp/predictions.jsonl\"\n\n\
         [[prediction_sink]]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/p\"\n",
    );
    let checked = c.check_features();
    if cfg!(feature = "sinks") {
        assert_eq!(checked, Ok(()));
    } else {
        let e = checked.expect_err("a sink this build cannot run must be refused");
        assert!(
            e.contains("2 [[prediction_sink]]") && e.contains("`sinks` feature"),
            "{e}"
        );
    }
}

#[test]
fn a_configured_capture_is_refused_by_a_build_without_capture() {
    let c = config("[[capture]]\nmodel = \"claims\"\nsample_rate = 0.5\n");
    let checked = c.check_features();
    if cfg!(feature = "capture") {
        assert_eq!(checked, Ok(()));
    } else {
        let e = checked.expect_err("a capture this build cannot run must be refused");
        assert!(
            e.contains("1 [[capture]]") && e.contains("`capture` feature"),
            "{e}"
        );
    }
}

#[test]
fn a_config_without_either_section_runs_on_every_build() {
    assert_eq!(config("workers = 1\n").check_features(), Ok(()));
}

/// `POST /v1/feedback` to an API that was given no capture: 501 naming the feature in a
/// build without it; 503 (not ready) in a build with it.
#[tokio::test]
async fn feedback_says_which_feature_it_needs() {
    let api = Api::new(ApiLimits::default(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        axum::serve(listener, api::router::router(api))
            .await
            .expect("serve");
    });
    let reply = tokio::task::spawn_blocking(move || {
        let body = r#"{"id":"0000000000000001","label":1}"#;
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "POST /v1/feedback HTTP/1.1\r\nhost: agent\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reply");
        reply
    })
    .await
    .expect("client");
    server.abort();
    if cfg!(feature = "capture") {
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    } else {
        assert!(reply.starts_with("HTTP/1.1 501"), "{reply}");
        assert!(reply.contains("`capture` feature"), "{reply}");
    }
}
