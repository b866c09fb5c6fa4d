//! When a device must pull its assignment because commands on its `cmd` subscription
//! may have been missed: the broker refused the subscription for a while (a busy NATS
//! node answers SUBACK 0x80), or the device reconnected and the broker may have forgotten
//! what it queued meanwhile (restarted without persistence, or a NATS cluster restarted
//! as a whole with its session consumers in memory). Commands are nudges; the pull is
//! what a device acts on. The pull waits for the subscription's grant, so a change made
//! before the subscription exists is not missed either.

/// Why commands may have been missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// The broker refused the subscription before granting it.
    WhileRefused,
    /// The device was away (a reconnect).
    WhileAway,
}

/// The command subscription's history on one device's connections.
#[derive(Debug, Default, Clone)]
pub struct Subscription {
    ever_connected: bool,
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
    /// both reasons).
    pub fn granted(&mut self) -> Option<Missed> {
        let refused = std::mem::take(&mut self.refusals) > 0;
        let away = std::mem::take(&mut self.reconnected);
        if refused {
            Some(Missed::WhileRefused)
        } else if away {
            Some(Missed::WhileAway)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_connect_pulls_nothing_a_reconnect_pulls_once_granted() {
        let mut s = Subscription::default();
        assert_eq!(s.connected(true), None);
        assert_eq!(s.granted(), None, "the first grant");
        assert_eq!(s.connected(true), None, "waits for the grant");
        assert_eq!(s.granted(), Some(Missed::WhileAway));
        assert_eq!(s.granted(), None, "once");
        // Without a subscription, a reconnect pulls on the connect.
        assert_eq!(s.connected(false), Some(Missed::WhileAway));
        assert_eq!(s.granted(), None);
    }

    #[test]
    fn refusals_count_up_and_one_grant_pulls_once_for_both_reasons() {
        let mut s = Subscription::default();
        s.connected(true);
        s.granted();
        s.connected(true);
        assert_eq!(s.refused(), 1);
        assert_eq!(s.refused(), 2);
        assert_eq!(s.granted(), Some(Missed::WhileRefused));
        assert_eq!(s.granted(), None);
        assert_eq!(s.refused(), 1, "counted afresh after a grant");
    }
}
