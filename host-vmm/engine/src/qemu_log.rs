//! QEMU's log (`-D`, with `-msg timestamp=on`): its downtime checkpoints
//! (trace event `vmstate_downtime_checkpoint`), read back. Pure.
//!
//! A line reads `2026-11-28T01:09:22.925056Z vmstate_downtime_checkpoint
//! src-downtime-start`. The source logs `src-downtime-start` when it stops
//! the VM and `src-downtime-end` when it is done (what `query-migrate`
//! reports as `downtime`, in whole ms); the destination logs
//! `dst-precopy-bh-vm-started` when the VM runs again there.

/// Where Tandem has QEMU log for the VM whose API socket is `api`
/// (`web.sock` → `web.qemu.log`).
pub fn path_for(api: &std::path::Path) -> std::path::PathBuf {
    api.with_extension("qemu.log")
}

/// The time of day of a log line's timestamp, in microseconds.
fn micros_of_day(line: &str) -> Option<u64> {
    let t = line.split_whitespace().next()?;
    let (_, time) = t.split_once('T')?;
    let time = time.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let h: u64 = parts.next()?.parse().ok()?;
    let m: u64 = parts.next()?.parse().ok()?;
    let (sec, frac) = parts.next()?.split_once('.')?;
    let sec: u64 = sec.parse().ok()?;
    if frac.len() != 6 {
        return None;
    }
    let us: u64 = frac.parse().ok()?;
    Some(((h * 60 + m) * 60 + sec) * 1_000_000 + us)
}

fn is_checkpoint(line: &str, name: &str) -> bool {
    line.contains("vmstate_downtime_checkpoint") && line.trim_end().ends_with(name)
}

/// The time of day (microseconds) of the last checkpoint `name` in `log`.
pub fn last_checkpoint_us(log: &str, name: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find(|l| is_checkpoint(l, name))
        .and_then(micros_of_day)
}

/// `later - earlier`, two times of day in microseconds less than a day
/// apart (across midnight too).
pub fn span_us(earlier: u64, later: u64) -> u64 {
    const DAY: u64 = 86_400_000_000;
    if later >= earlier {
        later - earlier
    } else {
        later + DAY - earlier
    }
}

/// The source's downtime of the last migration in `log`: from its
/// `src-downtime-start` to the `src-downtime-end` after it.
pub fn downtime_us(log: &str) -> Option<u64> {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| is_checkpoint(l, "src-downtime-start"))?;
    let end = lines[start..]
        .iter()
        .find(|l| is_checkpoint(l, "src-downtime-end"))?;
    Some(span_us(micros_of_day(lines[start])?, micros_of_day(end)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downtime_comes_from_the_last_checkpoints_in_microseconds() {
        let log = "\
2026-11-28T01:09:20.000000Z vmstate_downtime_checkpoint src-downtime-start
2026-11-28T01:09:20.009000Z vmstate_downtime_checkpoint src-downtime-end
qemu-system-x86_64: some warning
2026-11-28T01:09:22.925056Z vmstate_downtime_checkpoint src-downtime-start
2026-11-28T01:09:22.926925Z vmstate_downtime_checkpoint src-vm-stopped
2026-11-28T01:09:22.928218Z vmstate_downtime_checkpoint src-downtime-end
";
        assert_eq!(downtime_us(log), Some(3162));
        assert_eq!(
            last_checkpoint_us(log, "src-downtime-start"),
            Some(((60 + 9) * 60 + 22) * 1_000_000 + 925_056)
        );
        // Across midnight.
        let log = "2026-11-28T23:59:59.999000Z vmstate_downtime_checkpoint src-downtime-start\n\
                   2026-11-29T00:00:00.001500Z vmstate_downtime_checkpoint src-downtime-end\n";
        assert_eq!(downtime_us(log), Some(2500));
        // A migration that never ended, or no timestamps: nothing.
        assert_eq!(
            downtime_us(
                "2026-11-28T01:00:00.000000Z vmstate_downtime_checkpoint src-downtime-start\n"
            ),
            None
        );
        assert_eq!(
            downtime_us(
                "vmstate_downtime_checkpoint src-downtime-start\nvmstate_downtime_checkpoint src-downtime-end\n"
            ),
            None
        );
        assert_eq!(last_checkpoint_us(log, "dst-precopy-bh-vm-started"), None);
    }
}
