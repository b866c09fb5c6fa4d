//! When a published message may be forgotten, and which to publish again.
//!
//! A device keeps every message it seals until it is known to be delivered. At first
//! that is the broker's PUBACK. Once the control plane has sent one [`Receipt`] (it then
//! sends them for everything it stores), a PUBACK is not enough: the message waits for
//! a receipt that names it. A PUBACK only says the broker has the message; a broker
//! drops what a lagging subscriber has not read once its log is full, and loses it
//! when it restarts. So:
//!
//! - a message acknowledged by the broker and *overtaken* by a receipt (one naming a
//!   later message but not it) was most likely lost on the way. One ingest stores a
//!   device's messages in order, but control-plane replicas sharing the ingest (a work
//!   queue, a shared subscription) store their batches independently, so a later
//!   message may be stored, and named, a moment before an earlier one. So an overtaken
//!   message is published again when a second receipt also skips it, or
//!   [`OVERTAKEN_GRACE_MS`] after the first did, whichever comes first;
//! - one acknowledged and named by no receipt within the resend time is published
//!   again too (a last resort: a slow ingest is not a lost message);
//! - after a reconnect everything still held is published again in order, delivered or
//!   not: the device's store, not the MQTT session, is the source of truth. Duplicates
//!   are fine; the control plane de-duplicates by `(device, seq)`.
//!
//! [`Delivery`] holds only this bookkeeping (sequence numbers and times); where the
//! messages themselves live (sled on a board, memory in the simulator) is the caller's.
//! Times are milliseconds on any clock that does not go backwards, passed in.

use std::collections::{BTreeMap, BTreeSet};

use fleetml_protocol::telemetry::Receipt;

/// How long a message one receipt overtook waits for a replica that may still be
/// storing it (twice `fleetctl serve`'s default receipt interval), unless a second
/// receipt skips it first. Counted from the first [`Delivery::overdue`] call after the
/// receipt (the callers ask every few seconds); the resend time still applies.
pub const OVERTAKEN_GRACE_MS: u64 = 20_000;

/// What to do with a message the broker has just acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// Delete it: the control plane sends no receipts (yet).
    Forget,
    /// Keep it until a receipt names it.
    AwaitReceipt,
    /// It is not held any more (a receipt came first): nothing to do.
    Gone,
}

/// What a receipt means for the store of held messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipted {
    /// This was the first receipt ever: from now on only receipts delete, and the caller
    /// persists that (a restarted device must not go back to trusting PUBACKs).
    pub first: bool,
    /// Delete the held messages in these inclusive ranges (sensible ones only: a
    /// receipt's range may be as wide as it likes; only what is held goes).
    pub delete: Vec<(u64, u64)>,
}

/// The delivery bookkeeping of one device's outbox.
#[derive(Debug, Default, Clone)]
pub struct Delivery {
    receipts: bool,
    /// Handed to the broker, not acknowledged: never dropped for room (a dropped message
    /// must mean "will not arrive").
    inflight: BTreeSet<u64>,
    /// Acknowledged by the broker, awaiting a receipt: since when.
    delivered: BTreeMap<u64, u64>,
    /// Acknowledged, and one receipt named a later message but not these: still in
    /// `delivered` (always a subset of it), due [`OVERTAKEN_GRACE_MS`] after the first
    /// `overdue` that saw them (the time, once seen), or when a second receipt skips
    /// them too.
    suspect: BTreeMap<u64, Option<u64>>,
    /// Acknowledged, and two receipts named a later message but not these: lost.
    overtaken: BTreeSet<u64>,
}

impl Delivery {
    /// Bookkeeping for a device that has (`true`) or has not yet seen a receipt.
    pub fn new(receipts: bool) -> Delivery {
        Delivery {
            receipts,
            ..Delivery::default()
        }
    }

    /// Whether messages wait for the control plane's receipt after their PUBACK.
    pub fn receipts_enabled(&self) -> bool {
        self.receipts
    }

    /// `seq` was handed to the broker.
    pub fn sent(&mut self, seq: u64) {
        self.inflight.insert(seq);
    }

    /// Whether `seq` is handed to the broker and not acknowledged.
    pub fn in_flight(&self, seq: u64) -> bool {
        self.inflight.contains(&seq)
    }

    /// The sequence numbers in flight.
    pub fn inflight(&self) -> &BTreeSet<u64> {
        &self.inflight
    }

    /// The connection is gone: nothing is in flight or awaited any more; everything
    /// still held is published again, in order, on the next connection.
    pub fn reconnected(&mut self) {
        self.inflight.clear();
        self.delivered.clear();
        self.suspect.clear();
        self.overtaken.clear();
    }

    /// The broker acknowledged `seq` at `now_ms`; `held` says whether the device still
    /// holds it.
    pub fn acked(&mut self, seq: u64, held: bool, now_ms: u64) -> Acked {
        self.inflight.remove(&seq);
        match (held, self.receipts) {
            (false, _) => Acked::Gone,
            (true, false) => Acked::Forget,
            (true, true) => {
                self.delivered.insert(seq, now_ms);
                // A new publication: any earlier suspicion was about the old one.
                self.suspect.remove(&seq);
                Acked::AwaitReceipt
            }
        }
    }

    /// The control plane stored what `receipt` names.
    pub fn receipt(&mut self, receipt: &Receipt) -> Receipted {
        let first = !self.receipts;
        self.receipts = true;
        let delete: Vec<(u64, u64)> = receipt
            .stored
            .iter()
            .filter(|[a, b]| a <= b)
            .map(|&[a, b]| (a, b))
            .collect();
        for &(a, b) in &delete {
            let named: Vec<u64> = self.delivered.range(a..=b).map(|(s, _)| *s).collect();
            for seq in named {
                self.delivered.remove(&seq);
                self.suspect.remove(&seq);
            }
            // Stored after all (late): not to be published again.
            let late: Vec<u64> = self.overtaken.range(a..=b).copied().collect();
            for seq in late {
                self.overtaken.remove(&seq);
            }
        }
        // What the broker acknowledged before the newest stored message and this receipt
        // did not name: suspect the first time (another replica may still be storing
        // it), lost the second.
        if let Some(newest) = delete.iter().map(|&(_, b)| b).max() {
            let skipped: Vec<u64> = self.delivered.range(..newest).map(|(s, _)| *s).collect();
            for seq in skipped {
                if self.suspect.remove(&seq).is_some() {
                    self.delivered.remove(&seq);
                    self.overtaken.insert(seq);
                } else {
                    self.suspect.insert(seq, None);
                }
            }
        }
        Receipted { first, delete }
    }

    /// Messages to publish again at `now_ms`, oldest first: those two receipts overtook,
    /// those one receipt overtook [`OVERTAKEN_GRACE_MS`] ago (counted from the first call
    /// that saw them), and those acknowledged at least `after_ms` ago that no receipt has
    /// named. Each is handed out once per acknowledgement.
    pub fn overdue(&mut self, after_ms: u64, now_ms: u64) -> Vec<u64> {
        let mut due = std::mem::take(&mut self.overtaken);
        for (seq, since) in &mut self.suspect {
            if now_ms.saturating_sub(*since.get_or_insert(now_ms)) >= OVERTAKEN_GRACE_MS {
                due.insert(*seq);
            }
        }
        due.extend(
            self.delivered
                .iter()
                .filter(|(_, at)| now_ms.saturating_sub(**at) >= after_ms)
                .map(|(seq, _)| *seq),
        );
        for seq in &due {
            self.delivered.remove(seq);
            self.suspect.remove(seq);
        }
        due.into_iter().collect()
    }

    /// Messages acknowledged and awaiting a receipt.
    pub fn awaiting(&self) -> usize {
        self.delivered.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000;

    fn receipt(ranges: &[[u64; 2]]) -> Receipt {
        Receipt {
            stored: ranges.to_vec(),
        }
    }

    /// A transcript on simulated time: before the first receipt a PUBACK deletes; after
    /// it, messages wait, one overtaken by two receipts is due then, a silent one after
    /// the resend time, and a reconnect forgets what was in flight.
    #[test]
    fn pubacks_then_receipts_on_simulated_time() {
        let mut d = Delivery::new(false);
        d.sent(0);
        assert!(d.in_flight(0));
        assert_eq!(d.acked(0, true, 0), Acked::Forget);
        assert!(!d.in_flight(0));

        let r = d.receipt(&receipt(&[[0, 0]]));
        assert!(r.first && d.receipts_enabled());
        assert_eq!(r.delete, vec![(0, 0)]);
        assert!(!d.receipt(&receipt(&[])).first, "only the first is first");

        for seq in 1..=4 {
            d.sent(seq);
            assert_eq!(d.acked(seq, true, seq * S), Acked::AwaitReceipt);
        }
        assert_eq!(d.awaiting(), 4);
        // The ingest stored 3 but not 1 or 2: another replica may still be storing
        // them; 4 is merely not named yet.
        let r = d.receipt(&receipt(&[[3, 3], [9, 2]]));
        assert_eq!(r.delete, vec![(3, 3)], "a backwards range names nothing");
        assert_eq!(
            d.overdue(600 * S, 5 * S),
            Vec::<u64>::new(),
            "overtaken once: not yet"
        );
        // The next receipt names 4 but still not 1 or 2: lost.
        d.receipt(&receipt(&[[4, 4]]));
        assert_eq!(
            d.overdue(600 * S, 5 * S),
            vec![1, 2],
            "overtaken twice: due at once"
        );
        assert_eq!(
            d.overdue(600 * S, 5 * S),
            Vec::<u64>::new(),
            "handed out once"
        );
        // 5 acknowledged and never named: due after the resend time.
        d.sent(5);
        assert_eq!(d.acked(5, true, 5 * S), Acked::AwaitReceipt);
        assert_eq!(
            d.overdue(600 * S, 604 * S),
            Vec::<u64>::new(),
            "5 waited 599 s"
        );
        assert_eq!(d.overdue(600 * S, 605 * S), vec![5]);

        // Acknowledged after a receipt already deleted it.
        d.sent(8);
        assert_eq!(d.acked(8, false, 700 * S), Acked::Gone);
        // A reconnect: nothing in flight or awaited.
        d.sent(6);
        assert_eq!(d.acked(7, true, 700 * S), Acked::AwaitReceipt);
        d.reconnected();
        assert!(!d.in_flight(6));
        assert_eq!(d.awaiting(), 0);
        assert_eq!(d.overdue(0, u64::MAX), Vec::<u64>::new());
    }

    /// Two replicas store a device's messages: 2 is named before 1, which the next
    /// receipt names. Nothing is published again. Had no receipt named 1, it would
    /// have been due the grace after the skip was seen (a quiet device gets no second
    /// receipt).
    #[test]
    fn a_message_stored_late_by_another_replica_is_not_published_again() {
        let mut d = Delivery::new(true);
        for seq in 1..=3 {
            d.sent(seq);
            d.acked(seq, true, 0);
        }
        d.receipt(&receipt(&[[2, 2]]));
        assert_eq!(d.overdue(600 * S, S), Vec::<u64>::new());
        d.receipt(&receipt(&[[1, 1], [3, 3]]));
        assert_eq!(d.awaiting(), 0);
        assert_eq!(d.overdue(0, u64::MAX), Vec::<u64>::new());

        let mut quiet = Delivery::new(true);
        for seq in 1..=2 {
            quiet.sent(seq);
            quiet.acked(seq, true, 0);
        }
        quiet.receipt(&receipt(&[[2, 2]]));
        // The grace starts when the caller next asks: at 30 s here, long after the
        // acknowledgement (a lagging ingest sends its receipts late).
        assert_eq!(quiet.overdue(600 * S, 30 * S), Vec::<u64>::new());
        assert_eq!(
            quiet.overdue(600 * S, 30 * S + OVERTAKEN_GRACE_MS - 1),
            Vec::<u64>::new()
        );
        assert_eq!(quiet.overdue(600 * S, 30 * S + OVERTAKEN_GRACE_MS), vec![1]);
        assert_eq!(quiet.overdue(600 * S, u64::MAX), Vec::<u64>::new(), "once");
    }

    #[test]
    fn a_receipt_spanning_everything_names_only_what_waits() {
        let mut d = Delivery::new(true);
        for seq in [10, 11, 12] {
            d.acked(seq, true, 0);
        }
        let r = d.receipt(&receipt(&[[0, u64::MAX]]));
        assert!(!r.first);
        assert_eq!(r.delete, vec![(0, u64::MAX)]);
        assert_eq!(d.awaiting(), 0);
        assert_eq!(d.overdue(0, 1), Vec::<u64>::new());
    }

    proptest::proptest! {
        /// Whatever the receipts say, a message acknowledged by the broker is either
        /// named by a receipt or handed out again: none is forgotten silently.
        #[test]
        fn nothing_acknowledged_is_forgotten(
            acks in proptest::collection::btree_set(0u64..64, 0..32),
            receipts in proptest::collection::vec((0u64..64, 0u64..64), 0..8),
        ) {
            let mut d = Delivery::new(true);
            for &seq in &acks {
                d.sent(seq);
                proptest::prop_assert_eq!(d.acked(seq, true, seq), Acked::AwaitReceipt);
            }
            let mut named = BTreeSet::new();
            let mut newest = None;
            for &(a, b) in &receipts {
                for (x, y) in d.receipt(&receipt(&[[a, b]])).delete {
                    named.extend(acks.range(x..=y).copied());
                    newest = newest.max(Some(y));
                }
            }
            // Within the grace (long before the resend time), exactly what some receipt
            // skipped and none named comes back.
            let mut again: BTreeSet<u64> = d.overdue(600 * S, 0).into_iter().collect();
            again.extend(d.overdue(600 * S, OVERTAKEN_GRACE_MS));
            let skipped: BTreeSet<u64> = acks
                .iter()
                .copied()
                .filter(|s| !named.contains(s) && newest.is_some_and(|n| *s < n))
                .collect();
            proptest::prop_assert_eq!(&again, &skipped);
            again.extend(d.overdue(0, u64::MAX));
            for seq in &acks {
                proptest::prop_assert!(named.contains(seq) || again.contains(seq), "{seq} lost");
            }
        }
    }
}
