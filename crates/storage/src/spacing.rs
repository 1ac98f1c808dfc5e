//! How long the log's writer waits after a write of several records before the next, as a
//! function of how fast records arrive.
//!
//! Waiting lets more records share each write and `fdatasync`, which saves the writer's wake-ups
//! and system calls and, in a cluster, the followers' acknowledgements; it costs that much
//! latency. A quiet log gains little from it and pays the latency on every append; a busy one
//! gains the most. So the wait grows with the rate of records, from `quiet` at `quiet_rate`
//! records/s or fewer to `busy` at `busy_rate` or more. The rate is measured over writes, not
//! against the wait itself (records per second between the starts of consecutive writes),
//! so a longer wait does not read as more load.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteSpacing {
    /// The wait while records arrive at `quiet_rate` per second or fewer.
    pub quiet: Duration,
    /// The wait from `busy_rate` records per second on; in between it grows linearly.
    pub busy: Duration,
    pub quiet_rate: f64,
    pub busy_rate: f64,
}

impl WriteSpacing {
    /// Never wait.
    pub const NONE: WriteSpacing = WriteSpacing::fixed(Duration::ZERO);

    /// The same wait at any rate.
    pub const fn fixed(wait: Duration) -> WriteSpacing {
        WriteSpacing {
            quiet: wait,
            busy: wait,
            quiet_rate: 0.0,
            busy_rate: 0.0,
        }
    }

    /// The wait at `rate` records per second.
    pub fn wait_at(&self, rate: f64) -> Duration {
        if rate <= self.quiet_rate {
            return self.quiet;
        }
        if rate >= self.busy_rate {
            return self.busy;
        }
        let share = (rate - self.quiet_rate) / (self.busy_rate - self.quiet_rate);
        let (quiet, busy) = (self.quiet.as_secs_f64(), self.busy.as_secs_f64());
        Duration::from_secs_f64(quiet + (busy - quiet) * share)
    }
}

/// Records per second, smoothed over the last several writes.
#[derive(Debug, Default)]
pub(crate) struct RecordRate {
    per_second: f64,
    last_start: Option<Instant>,
}

/// Weight of the newest write in the smoothed rate: about the last ten writes count, a few
/// tens of milliseconds when busy, so a change of load shows within a fraction of a second.
const NEWEST_WEIGHT: f64 = 0.1;

/// A write after a longer gap weighs more, `1 - e^(-gap / IDLE_HORIZON)`: after a busy spell
/// that ended in silence, the next writes are not spaced as if the spell were still going
/// (with the weight per write alone, ten writes after a second of silence still read as
/// about a third of the old rate). While busy, gaps are a few milliseconds and the weight per
/// write is the larger.
const IDLE_HORIZON: Duration = Duration::from_millis(50);

impl RecordRate {
    /// Notes a write of `records` records starting at `now`.
    pub fn note_write(&mut self, records: usize, now: Instant) {
        if let Some(last) = self.last_start {
            let seconds = now.saturating_duration_since(last).as_secs_f64().max(1e-6);
            let instant = records as f64 / seconds;
            let by_time = 1.0 - (-seconds / IDLE_HORIZON.as_secs_f64()).exp();
            let weight = NEWEST_WEIGHT.max(by_time);
            self.per_second += weight * (instant - self.per_second);
        }
        self.last_start = Some(now);
    }

    pub fn per_second(&self) -> f64 {
        self.per_second
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADAPTIVE: WriteSpacing = WriteSpacing {
        quiet: Duration::from_millis(1),
        busy: Duration::from_millis(3),
        quiet_rate: 3000.0,
        busy_rate: 6000.0,
    };

    #[test]
    fn the_wait_grows_with_the_rate_between_its_bounds() {
        assert_eq!(ADAPTIVE.wait_at(0.0), Duration::from_millis(1));
        assert_eq!(ADAPTIVE.wait_at(3000.0), Duration::from_millis(1));
        let middle = ADAPTIVE.wait_at(4500.0);
        assert!(
            (middle.as_secs_f64() - 0.002).abs() < 1e-9,
            "halfway: {middle:?}"
        );
        assert_eq!(ADAPTIVE.wait_at(6000.0), Duration::from_millis(3));
        assert_eq!(ADAPTIVE.wait_at(1e9), Duration::from_millis(3));
    }

    #[test]
    fn a_fixed_spacing_ignores_the_rate() {
        let fixed = WriteSpacing::fixed(Duration::from_millis(2));
        for rate in [0.0, 10.0, 1e6] {
            assert_eq!(fixed.wait_at(rate), Duration::from_millis(2));
        }
        assert_eq!(WriteSpacing::NONE.wait_at(1e6), Duration::ZERO);
    }

    #[test]
    fn the_rate_follows_the_records_between_write_starts() {
        let mut rate = RecordRate::default();
        let start = Instant::now();
        rate.note_write(5, start);
        assert_eq!(rate.per_second(), 0.0, "one write alone says nothing");
        // 5 records every millisecond: 5,000/s, approached within a few tens of writes.
        for i in 1..=60 {
            rate.note_write(5, start + Duration::from_millis(i));
        }
        assert!(
            (rate.per_second() - 5000.0).abs() < 50.0,
            "{}",
            rate.per_second()
        );
        // The same records spread over writes three times as far apart: a third of the rate,
        // whatever made the writes wait.
        for i in 1..=60 {
            rate.note_write(5, start + Duration::from_millis(60 + 3 * i));
        }
        assert!(
            (rate.per_second() - 5000.0 / 3.0).abs() < 50.0,
            "{}",
            rate.per_second()
        );
    }

    #[test]
    fn silence_ends_a_busy_spell() {
        let mut rate = RecordRate::default();
        let start = Instant::now();
        // 10,000/s: ten records every millisecond.
        for i in 0..=100 {
            rate.note_write(10, start + Duration::from_millis(i));
        }
        assert!(rate.per_second() > 9_000.0, "{}", rate.per_second());
        // A second of silence, then a write of two records: the load is gone, so the wait
        // after it is the quiet one.
        rate.note_write(2, start + Duration::from_millis(1_100));
        assert!(rate.per_second() < 100.0, "{}", rate.per_second());
        assert_eq!(ADAPTIVE.wait_at(rate.per_second()), ADAPTIVE.quiet);
    }
}
