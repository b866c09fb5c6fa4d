//! When a device must pull its assignment because commands on its `cmd` subscription
//! may have been missed. Devices subscribe with QoS 0 ([`QOS`]): no broker keeps
//! commands for a device that is not subscribed, so every grant of the subscription is
//! followed by a pull — the first of a run (a change made between the start's pull and
//! the grant), each after a reconnect (while the device was away), and one after the
//! broker refused the subscription for a while (a busy NATS node answers SUBACK 0x80).
//! Commands are nudges; the pull is what a device acts on. The pull waits for the
//! grant, so a change made before the subscription exists is not missed either.

/// The QoS of the command subscription: 0. Every command is a nudge whose effect a pull
/// (or the status every connect sends) also brings, and a QoS 1 subscription costs a
/// clustered broker dearly: nats-server keeps a replicated JetStream consumer for each
/// one (docs/BENCHMARKS.md, "Commands at QoS 0").
pub const QOS: u8 = 0;

/// Why commands may have been missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// The broker refused the subscription before granting it.
    WhileRefused,
    /// The device was away (a reconnect).
    WhileAway,
    /// The first grant of a run: nothing was subscribed before it.
    BeforeFirstGrant,
}

/// The command subscription's history on one device's connections.
#[derive(Debug, Default, Clone)]
pub struct Subscription {
    ever_connected: bool,
    ever_granted: bool,
    reconnected: bool,
    refusals: u32,
}

impl Subscription {
    /// A connection was made (CONNACK). With `subscribes` false (no command
    /// subscription), a reconnect's pull is due now: `Some(WhileAway)`.
    pub fn connected(&mut self, subscribes: bool) -> Option<Missed> {
        self.reconnected = self.ever_connected;
        self.ever_connected = true;
        (self.reconnected && !subscribes).then(|| {
            self.reconnected = false;
            Missed::WhileAway
        })
    }

    /// The broker refused the subscription: the refusals in a row so far (for the
    /// back-off before subscribing again).
    pub fn refused(&mut self) -> u32 {
        self.refusals = self.refusals.saturating_add(1);
        self.refusals
    }

    /// The broker granted the subscription: whether to pull now, and why (one pull for
    /// every reason at once; `None` for a grant the device did not ask for again, such
    /// as a second SUBACK on the same connection).
    pub fn granted(&mut self) -> Option<Missed> {
        let refused = std::mem::take(&mut self.refusals) > 0;
        let away = std::mem::take(&mut self.reconnected);
        let first = !std::mem::replace(&mut self.ever_granted, true);
        if refused {
            Some(Missed::WhileRefused)
        } else if away {
            Some(Missed::WhileAway)
        } else if first {
            Some(Missed::BeforeFirstGrant)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connect_pulls_once_granted() {
        let mut s = Subscription::default();
        assert_eq!(s.connected(true), None, "waits for the grant");
        assert_eq!(s.granted(), Some(Missed::BeforeFirstGrant));
        assert_eq!(s.granted(), None, "once");
        assert_eq!(s.connected(true), None, "waits for the grant");
        assert_eq!(s.granted(), Some(Missed::WhileAway));
        assert_eq!(s.granted(), None, "once");
        // Without a subscription, a reconnect pulls on the connect.
        assert_eq!(s.connected(false), Some(Missed::WhileAway));
        assert_eq!(s.granted(), None);
    }

    #[test]
    fn a_reconnect_before_the_first_grant_still_pulls_once_granted() {
        let mut s = Subscription::default();
        assert_eq!(s.connected(true), None);
        assert_eq!(s.connected(true), None, "lost before the SUBACK");
        assert_eq!(s.granted(), Some(Missed::WhileAway));
        assert_eq!(s.granted(), None);
    }

    #[test]
    fn refusals_count_up_and_one_grant_pulls_once_for_both_reasons() {
        let mut s = Subscription::default();
        s.connected(true);
        assert_eq!(s.refused(), 1, "the first subscription refused");
        assert_eq!(s.granted(), Some(Missed::WhileRefused), "one pull");
        assert_eq!(s.granted(), None);
        s.connected(true);
        assert_eq!(s.refused(), 1);
        assert_eq!(s.refused(), 2);
        assert_eq!(s.granted(), Some(Missed::WhileRefused));
        assert_eq!(s.granted(), None);
        assert_eq!(s.refused(), 1, "counted afresh after a grant");
    }
}
