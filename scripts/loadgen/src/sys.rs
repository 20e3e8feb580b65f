//! The operating system's side: file-descriptor limit, our own CPU time,
//! other processes' CPU time and resident memory from /proc, and the clock
//! that stamps bodies.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Raises RLIMIT_NOFILE's soft limit to the hard limit. Returns (soft, hard)
/// as in force afterwards.
pub fn raise_nofile() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
    Ok((r.rlim_cur as u64, r.rlim_max as u64))
}

/// This process's CPU time so far (user, system), seconds: getrusage(RUSAGE_SELF).
pub fn self_cpu() -> (f64, f64) {
    // SAFETY: getrusage fills a zeroed rusage.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return (0.0, 0.0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(u.ru_utime), secs(u.ru_stime))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (ppid, utime + stime in ticks) from the text of /proc/<pid>/stat.
pub fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    // The command name may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): field n is fields[n - 3].
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// CPU seconds used so far by `pid` and its living direct children (for
/// PostgreSQL: the postmaster and its backends). `None` if `pid` is gone.
pub fn tree_cpu_secs(pid: u32) -> Option<f64> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, mut ticks) = parse_stat(&own)?;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if child == pid {
                continue;
            }
            if let Some((ppid, t)) = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| parse_stat(&s))
            {
                if ppid == pid {
                    ticks += t;
                }
            }
        }
    }
    Some(ticks as f64 / clock_ticks())
}

/// (busy, total) CPU time of the whole machine in seconds, all cores
/// together, from the text of /proc/stat (busy: all but idle and iowait).
pub fn parse_proc_stat(stat: &str) -> Option<(f64, f64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    let t = clock_ticks();
    Some(((total - idle) as f64 / t, total as f64 / t))
}

pub fn machine_cpu() -> Option<(f64, f64)> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// VmRSS of `pid` in bytes, from the text of /proc/<pid>/status.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut it = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => Some(n * 1024),
        _ => None,
    }
}

pub fn vm_rss(pid: u32) -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

pub fn self_rss() -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// Unix nanoseconds from the monotonic clock, anchored once to the wall
/// clock: every stamp and every receipt uses it, so latencies never see a
/// wall-clock step.
pub fn now_ns() -> u64 {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    let (at, unix) = ANCHOR.get_or_init(|| {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (Instant::now(), unix)
    });
    unix + at.elapsed().as_nanos() as u64
}

/// The unix-ns stamp of a monotonic instant (see [`now_ns`]).
pub fn ns_at(t: Instant) -> u64 {
    let now_i = Instant::now();
    let now = now_ns();
    if t >= now_i {
        now + (t - now_i).as_nanos() as u64
    } else {
        now.saturating_sub((now_i - t).as_nanos() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_in_the_name() {
        let stat = "1234 (my (odd) proc) S 77 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_stat(stat), Some((77, 300)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn machine_cpu_from_proc_stat() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        let t = clock_ticks();
        assert_eq!(parse_proc_stat(stat), Some((150.0 / t, 1000.0 / t)));
        assert!(machine_cpu().is_some());
    }

    #[test]
    fn vm_rss_in_bytes() {
        let status = "Name:\tgateway\nVmPeak:\t  100 kB\nVmRSS:\t   20480 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(20_480 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn own_process_is_readable() {
        assert!(self_rss().unwrap() > 0);
        assert!(tree_cpu_secs(std::process::id()).is_some());
        let (soft, hard) = raise_nofile().unwrap();
        assert_eq!(soft, hard);
    }

    #[test]
    fn clock_is_monotonic_and_near_the_wall_clock() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        assert!(wall.abs_diff(b) < 1_000_000_000);
        let later = Instant::now() + std::time::Duration::from_millis(5);
        assert!(ns_at(later) > now_ns());
    }
}
