//! CPU time read with Linux `clock_gettime`, for the benchmarks that report CPU per operation.
//! A bench includes it with `#[path = "common/cpu_time.rs"] mod cpu_time;`; not every bench
//! uses every item.
#![allow(dead_code)]

#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

unsafe extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU time of the calling thread, seconds (Linux `CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_seconds() -> f64 {
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    cpu_seconds(CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of this whole process (every thread: runtime workers, log writers), seconds
/// (Linux `CLOCK_PROCESS_CPUTIME_ID`).
pub fn process_cpu_seconds() -> f64 {
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    cpu_seconds(CLOCK_PROCESS_CPUTIME_ID)
}

fn cpu_seconds(clock: i32) -> f64 {
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}
