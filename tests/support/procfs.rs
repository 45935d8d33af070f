//! Reading `/proc`: a process's status fields (VmHWM, VmRSS, Threads) and the CPU time of
//! a process or of its threads.

/// A numeric field of `/proc/PID/status` (`pid` may be `"self"`), e.g. `"VmHWM:"` (kB).
pub fn status_field(pid: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU ticks (utime + stime) of this process's threads whose name starts with `prefix`.
pub fn thread_ticks(prefix: &str) -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        total += stat_ticks(&stat);
    }
    total
}

/// CPU ticks (utime + stime) of process `pid` (`"self"` for this one); 0 when gone.
pub fn process_ticks(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(0, |s| stat_ticks(&s))
}

/// utime + stime of a `stat` line (process or thread).
fn stat_ticks(stat: &str) -> u64 {
    let Some(close) = stat.rfind(')') else {
        return 0;
    };
    let f: Vec<&str> = stat[close + 2..].split(' ').collect();
    // fields after "(comm) ": state=0 … utime=11 stime=12
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// A counter from `/proc/PID/io` (e.g. `write_bytes`, the bytes sent to the storage
/// layer); 0 when it cannot be read.
pub fn io_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}: "))?.trim().parse().ok())
        .unwrap_or(0)
}
