//! systemd's readiness and watchdog protocol (`sd_notify(3)`), without libsystemd: one
//! datagram per state to the socket named by `NOTIFY_SOCKET`. Outside systemd (no such
//! variable) every call does nothing.
//!
//! The unit (`packaging/fleet-agent.service`) is `Type=notify` with `WatchdogSec=`: the
//! agent says `READY=1` once every listener is bound, then `WATCHDOG=1` from its main
//! loop at half the watchdog interval, so a wedged main loop gets the agent restarted.

use std::time::Duration;

/// Sends `state` (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, …) to systemd; true when a
/// notification socket exists and took it.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket address.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        None => socket.send_to(state.as_bytes(), &path),
    };
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "sd_notify failed");
            false
        }
    }
}

/// How often to say `WATCHDOG=1`: half of `WATCHDOG_USEC`, when systemd set it for this
/// process (`WATCHDOG_PID`, when present, names it).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
