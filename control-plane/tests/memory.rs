//! fleetctl's allocator hands freed memory back to the system within
//! `--malloc-trim-interval`, and keeps it for reuse when the interval is zero.

use std::time::{Duration, Instant};

use fleet_control::memory::{Handback, hand_back_freed};
use tikv_jemalloc_ctl::{background_thread, raw};

/// This process's resident memory in bytes (/proc/self/statm counts pages).
fn resident() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages in /proc/self/statm");
    pages * page_size()
}

#[allow(unsafe_code)]
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("a page size")
}

/// One of jemalloc's `ssize_t` settings.
#[allow(unsafe_code)]
fn setting(name: &str) -> isize {
    let name = format!("{name}\0");
    // SAFETY: every name read here is a jemalloc setting of type ssize_t (isize), and
    // it ends in NUL.
    unsafe { raw::read(name.as_bytes()) }.expect("a jemalloc setting")
}

/// The dirty pages' decay of the arena this thread allocates from.
#[allow(unsafe_code)]
fn this_threads_decay() -> isize {
    // SAFETY: `thread.arena` is an unsigned (u32), and the name ends in NUL.
    let arena: u32 = unsafe { raw::read(b"thread.arena\0") }.expect("thread.arena");
    setting(&format!("arena.{arena}.dirty_decay_ms"))
}

/// 256 MiB in 64 KiB blocks (kept in jemalloc's arenas when freed, not unmapped),
/// every page written.
fn allocate() -> Vec<Vec<u8>> {
    (0..4096).map(|_| vec![1u8; 64 << 10]).collect()
}

const MIB: usize = 1 << 20;

// One test: each step changes the whole process's allocator.
#[test]
fn freed_memory_goes_back_within_the_interval_and_stays_when_it_is_zero() {
    // Zero: freed pages stay for reuse, and no background thread runs.
    assert_eq!(
        hand_back_freed(Duration::ZERO).expect("zero"),
        Handback::Never
    );
    assert_eq!(setting("arenas.dirty_decay_ms"), -1);
    assert_eq!(this_threads_decay(), -1);
    assert!(!background_thread::read().expect("background_thread"));
    let before = resident();
    drop(allocate());
    std::thread::sleep(Duration::from_millis(1500));
    let kept = resident();
    assert!(
        kept >= before + 200 * MIB,
        "with the interval zero, 256 MiB freed should stay resident: {} MiB more than before",
        (kept.saturating_sub(before)) / MIB
    );

    // 200 ms: every arena made so far and every one made later decays its dirty pages
    // over 200 ms, muzzy pages go at once (jemalloc's default), and the background
    // threads purge.
    assert_eq!(
        hand_back_freed(Duration::from_millis(200)).expect("200 ms"),
        Handback::Allocator
    );
    assert_eq!(setting("arenas.dirty_decay_ms"), 200);
    assert_eq!(setting("arenas.muzzy_decay_ms"), 0);
    assert_eq!(this_threads_decay(), 200);
    assert!(background_thread::read().expect("background_thread"));
    // What the first step kept and a second burst reused goes back without this
    // thread allocating or freeing again, well before jemalloc's default decay (10 s)
    // would have handed back three quarters of it.
    let blocks = allocate();
    assert!(resident() >= before + 200 * MIB);
    drop(blocks);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = resident();
        if now <= before + 64 * MIB {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jemalloc still keeps {} MiB of 256 MiB freed 5 s ago",
            (now - before) / MIB
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
