//! The accept loop against misbehaving clients, on real sockets with short limits.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use fleetml_net::{Limits, Metrics};

const METRICS: Metrics = Metrics {
    open: "fleetml_test_connections",
    refused: "fleetml_test_connections_refused_total",
    timed_out: "fleetml_test_requests_timed_out_total",
};

/// A server with 1 s head, 1 s request (2 s idle) limits and room for `max` connections.
fn server(max: usize) -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            let app = Router::new().route("/ok", get(|| async { "ok" })).route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            );
            let limits = Limits {
                header_read: Duration::from_secs(1),
                ..Limits::new(Duration::from_secs(1), max, METRICS)
            };
            fleetml_net::serve(listener, app, limits, None)
                .await
                .expect("serve");
        });
    });
    rx.recv().expect("address")
}

/// Reads until the server closes the connection (or 10 s pass); what it sent.
fn until_closed(stream: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    (got, started.elapsed())
}

fn get_ok(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    String::from_utf8_lossy(&until_closed(&mut s).0).into_owned()
}

#[test]
fn a_half_sent_head_is_cut_at_the_header_time_out() {
    let addr = server(8);
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"POST /ok HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let (_, took) = until_closed(&mut s);
    assert!(took < Duration::from_secs(4), "held {took:?}");
}

#[test]
fn a_half_sent_body_and_an_idle_connection_are_cut_at_the_idle_time_out() {
    let addr = server(8);
    let mut body = TcpStream::connect(addr).expect("connect");
    body.write_all(b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        .expect("write");
    let mut idle = TcpStream::connect(addr).expect("connect");
    idle.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let (_, took) = until_closed(&mut body);
    assert!(
        took < Duration::from_secs(6),
        "a half-sent body held {took:?}"
    );
    let (answer, took) = until_closed(&mut idle);
    assert!(String::from_utf8_lossy(&answer).contains("200 OK"));
    assert!(
        took < Duration::from_secs(6),
        "an idle keep-alive held {took:?}"
    );
}

#[test]
fn a_slow_handler_is_answered_408() {
    let addr = server(8);
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let (answer, took) = until_closed(&mut s);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("not answered within 1 s"), "{answer}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn beyond_the_connection_limit_new_connections_are_closed_and_served_again_later() {
    let addr = server(2);
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut third = TcpStream::connect(addr).expect("the kernel accepts");
    let _ = third.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (answer, took) = until_closed(&mut third);
    assert!(answer.is_empty(), "closed without an answer");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The held connections send nothing: the head time-out frees their slots.
    for s in &mut held {
        until_closed(s);
    }
    assert!(get_ok(addr).contains("200 OK"));
}

#[test]
fn the_open_files_soft_limit_is_raised_to_the_hard_one() {
    let (soft, hard) = fleetml_net::raise_open_files_limit().expect("raised");
    assert_eq!(soft, hard);
}
