//! The control plane's allocator, and how memory it freed goes back to the system.
//!
//! With the `jemalloc` feature (on by default) every program built on this crate —
//! `fleetctl` and this crate's tests — allocates with jemalloc: its per-thread caches
//! made the ingest's and the rollouts' many short allocations cheaper than glibc's
//! malloc, and its background thread hands pages freed for a while back to the system,
//! so no server thread stops to trim (docs/BENCHMARKS.md, "jemalloc, and at most 64 blocking threads"). Without the
//! feature, glibc's malloc is trimmed periodically instead. `--malloc-trim-interval`
//! sets either.

use std::time::Duration;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How memory the allocator freed goes back to the system, as [`hand_back_freed`] set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handback {
    /// The allocator itself returns pages left unused for about the interval given
    /// (jemalloc: decay, purged by its background thread); nothing more to do.
    Allocator,
    /// The caller calls [`trim`] this often (glibc's malloc).
    Trim(Duration),
    /// Freed memory stays with the allocator for reuse.
    Never,
}

/// Makes memory freed and left unused for about `within` go back to the system;
/// never when `within` is zero. With jemalloc, every arena's dirty pages decay over
/// `within`, purged straight back (jemalloc's default of no lazy "muzzy" stage, which
/// `_RJEM_MALLOC_CONF` may change), and background threads do the purging; with glibc's malloc the caller trims every `within`.
pub fn hand_back_freed(within: Duration) -> anyhow::Result<Handback> {
    #[cfg(feature = "jemalloc")]
    {
        jemalloc::decay(within)?;
        Ok(if within.is_zero() {
            Handback::Never
        } else {
            Handback::Allocator
        })
    }
    #[cfg(not(feature = "jemalloc"))]
    {
        Ok(if within.is_zero() {
            Handback::Never
        } else {
            Handback::Trim(within)
        })
    }
}

/// Returns memory glibc's malloc holds freed to the system: it keeps what a thread
/// freed in that thread's arena, so after a burst the process would keep its peak;
/// `malloc_trim` releases the free pages of every arena. With jemalloc it only trims
/// what the C libraries linked in allocated. A no-op with other C libraries.
/// (fleet-agent makes the same call after large inputs.)
#[allow(unsafe_code)]
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes a byte count, has no preconditions and is
        // thread-safe; it only releases free memory.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(feature = "jemalloc")]
mod jemalloc {
    use std::time::Duration;

    use anyhow::Context;
    use tikv_jemalloc_ctl::{background_thread, opt, raw};

    /// The longest decay written, about 34 years: jemalloc refuses more than about 570.
    const LONGEST_MS: isize = 1 << 40;

    /// jemalloc's decay times in milliseconds (`ssize_t`; -1: never purge).
    fn millis(within: Duration) -> isize {
        if within.is_zero() {
            -1
        } else {
            isize::try_from(within.as_millis()).map_or(LONGEST_MS, |ms| ms.min(LONGEST_MS))
        }
    }

    /// Sets the dirty pages' decay of arenas made from now on and of every arena the
    /// threads have made so far, and starts (or, for
    /// never, stops) the background purging threads. The arena of allocations from
    /// 8 MiB up keeps its own setting: it hands them back as soon as they are freed.
    pub(super) fn decay(within: Duration) -> anyhow::Result<()> {
        let dirty = millis(within);
        write(b"arenas.dirty_decay_ms\0", dirty)?;
        // The threads' arenas are the first `opt.narenas`; the one for large
        // allocations comes after them.
        let threads = opt::narenas::read().context("reading jemalloc's opt.narenas")?;
        for i in 0..threads {
            let name = format!("arena.{i}.dirty_decay_ms\0");
            // An arena no thread has used yet does not exist: reading its setting
            // fails, and it takes the default above when it is made.
            if read(name.as_bytes()).is_some() {
                write(name.as_bytes(), dirty)?;
            }
        }
        background_thread::write(!within.is_zero())
            .context("starting jemalloc's background threads")?;
        Ok(())
    }

    /// One of jemalloc's `ssize_t` settings, or None where it does not exist (yet).
    #[allow(unsafe_code)]
    fn read(name: &[u8]) -> Option<isize> {
        // SAFETY: every name passed here is a jemalloc setting of type ssize_t, which
        // is isize, and ends in NUL (raw::read's two conditions).
        unsafe { raw::read(name) }.ok()
    }

    /// Writes one of jemalloc's `ssize_t` settings; `name` ends in NUL.
    #[allow(unsafe_code)]
    fn write(name: &[u8], value: isize) -> anyhow::Result<()> {
        // SAFETY: every name passed here is a jemalloc setting of type ssize_t, which
        // is isize, and ends in NUL (raw::write's two conditions).
        unsafe { raw::write(name, value) }.with_context(|| {
            format!(
                "setting jemalloc's {}",
                String::from_utf8_lossy(name.strip_suffix(b"\0").unwrap_or(name))
            )
        })
    }
}
