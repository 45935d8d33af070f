//! Reading `/proc` for the benches: a process's status fields and its threads' CPU time.

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
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        // fields after "(comm) ": state=0 … utime=11 stime=12
        total += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    }
    total
}
