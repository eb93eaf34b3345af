//! What a bench's work cost the machine in CPU time: every process together
//! (the services, the sandboxes and their agents, NATS, PostgreSQL, the
//! bench itself), from the kernel's counters in `/proc/stat`.
//!
//! Near 100% busy, throughput is the cores' time divided by the CPU time
//! per unit of work, so this is the figure a change must lower to raise it.

/// The machine's CPU counters at one moment, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    /// Now, or `None` where `/proc/stat` cannot be read (not Linux).
    pub fn now() -> Option<CpuTimes> {
        parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// CPU milliseconds spent on anything but idling since `earlier`, and
    /// that as a share of all the cores' time (0-100).
    pub fn busy_since(&self, earlier: &CpuTimes) -> (f64, f64) {
        let busy = self.busy.saturating_sub(earlier.busy);
        let total = self.total.saturating_sub(earlier.total);
        // SAFETY: sysconf only reads a configuration value.
        let ticks_per_sec = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
            n if n > 0 => n as f64,
            _ => 100.0,
        };
        let busy_ms = busy as f64 * 1000.0 / ticks_per_sec;
        let share = if total == 0 {
            0.0
        } else {
            busy as f64 * 100.0 / total as f64
        };
        (busy_ms, share)
    }
}

/// The first line of `/proc/stat`: `cpu user nice system idle iowait irq
/// softirq steal guest guest_nice`. Busy is user, nice, system, irq and
/// softirq: not idle or iowait, nor steal (the hypervisor running someone
/// else); guest time is already inside user and nice.
fn parse(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    let total: u64 = (0..8).map(field).sum();
    let idle = field(3) + field(4) + field(7);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_leaves_out_idle_iowait_and_steal_and_counts_guest_once() {
        let stat = "cpu  100 5 50 800 20 3 2 7 40 0\ncpu0 50 2 25 400 10 1 1 0 20 0\n";
        let times = parse(stat).expect("a cpu line");
        assert_eq!(times.total, 100 + 5 + 50 + 800 + 20 + 3 + 2 + 7);
        assert_eq!(times.busy, 100 + 5 + 50 + 3 + 2);
    }

    #[test]
    fn the_share_is_of_the_time_between_two_samples() {
        let earlier = CpuTimes {
            busy: 1000,
            total: 4000,
        };
        let later = CpuTimes {
            busy: 1600,
            total: 4800,
        };
        let (busy_ms, share) = later.busy_since(&earlier);
        assert!(busy_ms > 0.0, "600 busy ticks are some milliseconds");
        assert_eq!(share, 75.0);
    }

    #[test]
    fn a_file_without_a_cpu_line_gives_nothing() {
        assert_eq!(parse("intr 1 2 3\n"), None);
        assert_eq!(parse("cpu  1 2 x 4\n"), None);
    }
}
