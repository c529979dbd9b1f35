//! How many connections a transfer runs: `connections_per_blob` to start with, more while more
//! raise its throughput, up to `max_connections_per_blob`.
//!
//! # Design
//!
//! Object stores and CDNs cap what one connection gets, so a node with bandwidth to spare
//! reaches it only with more connections; an origin, a link or a node that is already the
//! bottleneck gains nothing from more and pays for them in memory and requests. No fixed
//! count suits both, and the operator cannot know which one a given source is.
//!
//! The controller measures the throughput at one level for [`PERIOD`], then tries a level half
//! as large again and measures that. It keeps the new level only when the throughput rose by
//! at least half of what the added connections would bring if each got as much as the others
//! (1.25 times for 1.5 times the connections): a capped origin gives the full gain, a
//! saturated path none. Otherwise the transfer goes back to the level before and stays there.
//! Each level is measured only after [`SETTLE`], so that the connections it added are past
//! their first byte; the first after [`WARM_UP`], past the start of the transfer, so that a
//! transfer too short to gain much pays for no probe.
//!
//! The decisions are a pure function of the clock and the bytes received, fed in by the
//! transfer ([`Adapt::tick`]), so they are tested without a network or a real clock.
//!
//! Rejected: adding and removing connections for the whole transfer, as TCP's congestion
//! control does with its window (a path's throughput is noisy over seconds; a transfer that
//! keeps probing keeps paying for probes that fail), and going below `connections_per_blob`
//! (the operator's floor; a probe that fails costs one [`PERIOD`] at the higher level).

use std::time::{Duration, Instant};

/// Before the first measurement: the first ranges' requests and TCP's slow start. A transfer
/// that ends sooner has little to gain from more connections, and a probe costs a few per
/// cent while it lasts (measured: 2 GiB from a loopback origin, CPU-bound, 2.11-2.17 s with a
/// probe after 1 s against 2.04-2.11 s without).
pub const WARM_UP: Duration = Duration::from_secs(2);
/// Between a change of level and the measurement of the new level.
pub const SETTLE: Duration = Duration::from_millis(500);
/// How long one level is measured.
pub const PERIOD: Duration = Duration::from_secs(1);

/// The controller of one transfer's connection count.
#[derive(Debug)]
pub struct Adapt {
    ceiling: usize,
    level: usize,
    /// The level before the one being tried, and its throughput (bytes per second).
    before: Option<(usize, f64)>,
    state: State,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Waiting for the connections to get going.
    Settling { until: Instant },
    /// Counting bytes since `from`, when `received` had been received.
    Measuring { from: Instant, received: u64 },
    /// The level is final.
    Done,
}

impl Adapt {
    /// A controller starting at `floor` connections at `now`; it never adds any when
    /// `ceiling <= floor`.
    pub fn new(floor: usize, ceiling: usize, now: Instant) -> Adapt {
        let state = match ceiling > floor {
            true => State::Settling {
                until: now + WARM_UP,
            },
            false => State::Done,
        };
        Adapt {
            ceiling,
            level: floor,
            before: None,
            state,
        }
    }

    /// The connections the transfer should run now.
    pub fn level(&self) -> usize {
        self.level
    }

    /// When [`tick`](Self::tick) is due next; `None` once the level is final.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Settling { until } => Some(until),
            State::Measuring { from, .. } => Some(from + PERIOD),
            State::Done => None,
        }
    }

    /// Moves on at `now`, `received` bytes having arrived since the transfer started; returns
    /// the level to run at from now on.
    pub fn tick(&mut self, now: Instant, received: u64) -> usize {
        match self.state {
            State::Settling { until } if now >= until => {
                self.state = State::Measuring {
                    from: now,
                    received,
                };
            }
            State::Measuring { from, received: at } if now >= from + PERIOD => {
                let seconds = now.duration_since(from).as_secs_f64();
                let rate = received.saturating_sub(at) as f64 / seconds;
                self.judge(rate, now);
            }
            _ => {}
        }
        self.level
    }

    /// Keeps or abandons the level just measured at `rate`, and tries the next one.
    fn judge(&mut self, rate: f64, now: Instant) {
        if let Some((before, before_rate)) = self.before {
            let added = self.level as f64 / before as f64 - 1.0;
            if rate < before_rate * (1.0 + added / 2.0) {
                self.level = before;
                self.state = State::Done;
                return;
            }
        }
        self.before = Some((self.level, rate));
        if self.level >= self.ceiling {
            self.state = State::Done;
            return;
        }
        self.level = (self.level + self.level.div_ceil(2)).min(self.ceiling);
        self.state = State::Settling {
            until: now + SETTLE,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a controller against an origin that delivers `rate(level)` bytes a second, and
    /// returns the levels it set, in order, until it settles (or `limit` seconds pass).
    fn follow(floor: usize, ceiling: usize, rate: impl Fn(usize) -> f64) -> Vec<usize> {
        let start = Instant::now();
        let mut adapt = Adapt::new(floor, ceiling, start);
        let (mut now, mut received, mut levels) = (start, 0.0, vec![adapt.level()]);
        while let Some(due) = adapt.deadline() {
            assert!(due > now, "a deadline in the past would spin");
            received += rate(adapt.level()) * due.duration_since(now).as_secs_f64();
            now = due;
            let level = adapt.tick(now, received as u64);
            if level != *levels.last().unwrap() {
                levels.push(level);
            }
            assert!(now.duration_since(start) < Duration::from_secs(60));
        }
        levels
    }

    #[test]
    fn an_origin_that_caps_each_connection_gets_the_ceiling() {
        let per_connection = 16e6;
        let levels = follow(8, 32, |n| n as f64 * per_connection);
        assert_eq!(levels, [8, 12, 18, 27, 32]);
    }

    #[test]
    fn a_saturated_path_goes_back_after_one_probe() {
        let levels = follow(8, 32, |_| 900e6);
        assert_eq!(levels, [8, 12, 8]);
    }

    #[test]
    fn growth_stops_where_the_link_is_full() {
        // 20 MB/s a connection on a 400 MB/s link: 18 connections get 360 MB/s, 27 only 400.
        let levels = follow(8, 64, |n| (n as f64 * 20e6).min(400e6));
        assert_eq!(levels, [8, 12, 18, 27, 18]);
    }

    #[test]
    fn a_small_gain_is_not_worth_the_connections() {
        // 1.5 times the connections for 1.2 times the bytes: below half the possible gain.
        let levels = follow(4, 16, |n| if n > 4 { 120e6 } else { 100e6 });
        assert_eq!(levels, [4, 6, 4]);
    }

    #[test]
    fn the_last_step_is_judged_by_what_it_added() {
        // 27 -> 32 adds a fifth: a tenth more is enough.
        let levels = follow(27, 32, |n| if n > 27 { 112e6 } else { 100e6 });
        assert_eq!(levels, [27, 32]);
    }

    #[test]
    fn without_room_to_grow_nothing_is_measured() {
        let adapt = Adapt::new(8, 8, Instant::now());
        assert_eq!(adapt.deadline(), None);
        assert_eq!(adapt.level(), 8);
    }

    #[test]
    fn an_early_tick_changes_nothing() {
        let start = Instant::now();
        let mut adapt = Adapt::new(2, 8, start);
        assert_eq!(adapt.tick(start + WARM_UP / 2, 1 << 20), 2);
        assert_eq!(adapt.deadline(), Some(start + WARM_UP));
    }
}
