//! Crash-test helper: pushes messages into a telemetry outbox as fast as it can and
//! prints each sequence number once `push` has returned (written and flushed). The test
//! kills it with SIGKILL at a random moment and checks every printed message survived.
//!
//! Usage: outbox-writer DIR

use std::io::Write;

use fleet_agent::outbox::{Class, Limits, Outbox};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: outbox-writer DIR");
    let outbox = Outbox::open(std::path::Path::new(&dir), Limits::default()).expect("outbox");
    let mut out = std::io::stdout().lock();
    loop {
        let seq = outbox
            .push(Class::Keep, "fleetml/v1/crash/events", 0, |seq| {
                format!("payload of message {seq}: {}", "x".repeat(200)).into_bytes()
            })
            .expect("push");
        if writeln!(out, "{seq}").and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}
