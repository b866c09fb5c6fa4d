//! Bringing a bundle's bytes in: where a download starts (resuming a partial file),
//! whether there is room, and whether what the server sends is the bundle the
//! assignment names (its size here; its SHA-256 by the caller, who has the bytes).
//!
//! A download interrupted by anything (power cut, agent killed, server gone) resumes
//! from the bytes already on disk with an HTTP range request; a partial file that cannot
//! be the bundle, or a reply that is not the asked range, starts it over.

use fleetml_protocol::assignment::AssignedModel;

/// Why a bundle was not brought in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The transfer failed; the next pull resumes it.
    Transfer(String),
    /// The bytes are not the bundle the assignment names: the partial file goes.
    Mismatch(String),
    /// The disk is full (or would be): the partial file goes (it would keep the disk
    /// full); the next pull starts over.
    DiskFull(String),
}

/// Not enough room for a download: `need` bytes free are needed, `free` are available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom {
    pub need: u64,
    pub free: u64,
}

/// Where a download starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The partial file is longer than the bundle: delete it first.
    pub discard: bool,
    /// Ask for the bytes from here on (0: the whole bundle).
    pub from: u64,
    /// Everything is here already: check it, fetch nothing.
    pub complete: bool,
}

/// Plans the download of `model` given `have` bytes of a partial file and `free` bytes
/// on its disk (if known). Room is needed for the rest of the download, the store's
/// copy of the whole bundle, and `headroom` for everything else the device writes.
pub fn plan(
    model: &AssignedModel,
    have: u64,
    free: Option<u64>,
    headroom: u64,
) -> Result<Plan, NoRoom> {
    let discard = have > model.size;
    let have = if discard { 0 } else { have };
    if have == model.size {
        return Ok(Plan {
            discard,
            from: have,
            complete: true,
        });
    }
    let need = (model.size - have)
        .saturating_add(model.size)
        .saturating_add(headroom);
    if let Some(free) = free.filter(|free| *free < need) {
        return Err(NoRoom { need, free });
    }
    Ok(Plan {
        discard,
        from: have,
        complete: false,
    })
}

/// How the reply to a bundle request starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// 206 with the asked range: append to the partial file.
    Append,
    /// 200: the whole bundle follows; write the file from its start.
    Restart,
    /// Any other status: the reply's body says why (the caller reads a bounded piece).
    Refused(u16),
}

/// One bundle transfer: what was asked for and what has arrived.
#[derive(Debug, Clone)]
pub struct Transfer {
    size: u64,
    digest: String,
    /// Where the bytes of this reply start in the bundle.
    from: u64,
    received: u64,
}

impl Transfer {
    /// A request for `model`'s bundle from byte `from` on.
    pub fn new(model: &AssignedModel, from: u64) -> Transfer {
        Transfer {
            size: model.size,
            digest: model.digest.to_string(),
            from,
            received: 0,
        }
    }

    /// The reply's status and `Content-Range` header.
    pub fn begin(&mut self, status: u16, content_range: Option<&str>) -> Result<Begin, Failure> {
        match status {
            206 => {
                let range = content_range.unwrap_or("");
                if range.starts_with(&format!("bytes {}-", self.from)) {
                    Ok(Begin::Append)
                } else {
                    Err(Failure::Transfer(format!(
                        "the server answered range `{range}` to a request from byte {}",
                        self.from
                    )))
                }
            }
            200 => {
                self.from = 0;
                Ok(Begin::Restart)
            }
            other => Ok(Begin::Refused(other)),
        }
    }

    /// The bundle byte the next chunk starts at.
    pub fn at(&self) -> u64 {
        self.from + self.received
    }

    /// Bytes of this reply so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// A chunk of `len` bytes arrived: refused if it runs past the bundle's size.
    pub fn chunk(&mut self, len: usize) -> Result<(), Failure> {
        if self.at().saturating_add(len as u64) > self.size {
            return Err(Failure::Mismatch(format!(
                "the server sent more than the {} bytes of bundle {} the assignment names: not installed",
                self.size, self.digest
            )));
        }
        self.received += len as u64;
        Ok(())
    }

    /// The reply ended: it must have brought the bundle to its full size.
    pub fn finish(&self) -> Result<(), Failure> {
        if self.at() == self.size {
            return Ok(());
        }
        Err(Failure::Mismatch(format!(
            "the server's bundle ends at byte {}, bundle {} the assignment names has {}: not installed",
            self.at(),
            self.digest,
            self.size
        )))
    }
}

/// The finished bundle hashed to `got`: it must be the digest the assignment names.
pub fn check_digest(
    model: &AssignedModel,
    got: &fleetml_protocol::crypto::Sha256,
) -> Result<(), Failure> {
    if *got == model.digest {
        return Ok(());
    }
    Err(Failure::Mismatch(format!(
        "downloaded bundle has sha256 {got}, the assignment names {}: not installed",
        model.digest
    )))
}

#[cfg(test)]
mod tests {
    use fleetml_protocol::crypto::sha256;

    use super::*;

    fn model(size: u64) -> AssignedModel {
        AssignedModel {
            shadow: None,
            version: 1,
            digest: sha256(b"bundle"),
            size,
            rollout: None,
        }
    }

    #[test]
    fn plans_resume_restart_and_refuse_without_room() {
        let m = model(1_000);
        // (have, free, plan or the room needed)
        let rows: [(u64, Option<u64>, Result<Plan, NoRoom>); 6] = [
            (
                0,
                None,
                Ok(Plan {
                    discard: false,
                    from: 0,
                    complete: false,
                }),
            ),
            (
                400,
                Some(1_700),
                Ok(Plan {
                    discard: false,
                    from: 400,
                    complete: false,
                }),
            ),
            (
                400,
                Some(1_699),
                Err(NoRoom {
                    need: 1_700,
                    free: 1_699,
                }),
            ),
            (
                1_000,
                Some(0),
                Ok(Plan {
                    discard: false,
                    from: 1_000,
                    complete: true,
                }),
            ),
            (
                5_000,
                Some(2_100),
                Ok(Plan {
                    discard: true,
                    from: 0,
                    complete: false,
                }),
            ),
            (
                5_000,
                Some(10),
                Err(NoRoom {
                    need: 2_100,
                    free: 10,
                }),
            ),
        ];
        for (have, free, want) in rows {
            assert_eq!(
                plan(&m, have, free, 100),
                want,
                "have {have}, free {free:?}"
            );
        }
    }

    #[test]
    fn a_reply_is_checked_against_the_range_asked_and_the_size_named() {
        let m = model(10);
        let mut t = Transfer::new(&m, 4);
        assert!(
            matches!(t.begin(206, Some("bytes 0-9/10")), Err(Failure::Transfer(e)) if e.contains("from byte 4"))
        );
        assert_eq!(t.begin(206, Some("bytes 4-9/10")), Ok(Begin::Append));
        t.chunk(3).expect("fits");
        assert_eq!(t.at(), 7);
        assert!(matches!(t.finish(), Err(Failure::Mismatch(e)) if e.contains("ends at byte 7")));
        assert!(
            matches!(t.chunk(4), Err(Failure::Mismatch(e)) if e.contains("more than the 10 bytes"))
        );
        t.chunk(3).expect("fits");
        assert_eq!(t.finish(), Ok(()));

        let mut whole = Transfer::new(&m, 4);
        assert_eq!(whole.begin(200, None), Ok(Begin::Restart));
        assert_eq!(whole.at(), 0, "a 200 sends the bundle from its start");
        assert_eq!(
            Transfer::new(&m, 0).begin(404, None),
            Ok(Begin::Refused(404))
        );

        assert_eq!(check_digest(&m, &sha256(b"bundle")), Ok(()));
        assert!(check_digest(&m, &sha256(b"other")).is_err());
    }
}
