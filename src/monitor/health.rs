//! The 0–100 health score of docs/reference.md ("Health score"), in integer arithmetic.
//!
//! The seed computed `int((1 - ratio) × 30)` in floating point, which truncates the wrong way
//! for some inputs (5 clients, 4 connected: 5 points instead of 6). Here every deduction is an
//! exact integer division of integers.

use serde::Serialize;

/// What the score is computed from; all counts are inside `health.window` where relevant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthInputs {
    /// The listener service runs.
    pub running: bool,
    /// Errors of every component but `config`, inside the window.
    pub listener_errors: u64,
    /// Enabled instances.
    pub clients_total: u64,
    /// Enabled instances that are not connected.
    pub clients_disconnected: u64,
    /// Chats known to the listener (active plus inactive).
    pub chats_total: u64,
    /// Inactive chats.
    pub chats_inactive: u64,
    /// Every recorded error inside the window (the error ratio's numerator).
    pub window_errors: u64,
    /// Messages processed inside the window (the ratio's denominator, at least 1).
    pub window_messages: u64,
}

/// Points lost per component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Deductions {
    /// 0, 10, 20 or 40.
    pub listener: u32,
    /// 0..=30.
    pub clients: u32,
    /// 0..=20.
    pub listeners: u32,
    /// 0, 5 or 10.
    pub error_rate: u32,
}

/// healthy, warning, critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// score ≥ 80.
    Healthy,
    /// 60 ≤ score < 80.
    Warning,
    /// score < 60.
    Critical,
}

impl Status {
    /// Every status, for the one-series-per-state gauge.
    pub const ALL: [Status; 3] = [Self::Healthy, Self::Warning, Self::Critical];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }

    /// Exit code of `wxauto-sidecar health`.
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Healthy => 0,
            Self::Warning => 1,
            Self::Critical => 2,
        }
    }
}

/// The computed score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Health {
    /// 0..=100.
    pub score: u32,
    /// From the score.
    pub status: Status,
    /// The four deductions; `100 - sum` is the score unless it floors at 0.
    pub deductions: Deductions,
}

/// Computes the score exactly as docs/reference.md ("Health score") says.
pub fn compute(inputs: &HealthInputs) -> Health {
    let listener = if !inputs.running {
        40
    } else if inputs.listener_errors > 10 {
        20
    } else if inputs.listener_errors > 5 {
        10
    } else {
        0
    };
    let clients = share(inputs.clients_disconnected, inputs.clients_total, 30);
    let listeners = share(inputs.chats_inactive, inputs.chats_total, 20);
    // ratio > 0.10 ⇔ errors × 10 > messages; ratio > 0.05 ⇔ errors × 20 > messages.
    let messages = inputs.window_messages.max(1);
    let error_rate = if inputs.window_errors.saturating_mul(10) > messages {
        10
    } else if inputs.window_errors.saturating_mul(20) > messages {
        5
    } else {
        0
    };
    let lost = listener + clients + listeners + error_rate;
    let score = 100u32.saturating_sub(lost);
    let status = if score >= 80 {
        Status::Healthy
    } else if score >= 60 {
        Status::Warning
    } else {
        Status::Critical
    };
    Health {
        score,
        status,
        deductions: Deductions {
            listener,
            clients,
            listeners,
            error_rate,
        },
    }
}

/// `(part × weight) div total`, 0 when `total` is 0.
fn share(part: u64, total: u64, weight: u64) -> u32 {
    if total == 0 {
        return 0;
    }
    let points = part.min(total) * weight / total;
    u32::try_from(points).unwrap_or(u32::MAX)
}

/// The error ratio: errors ÷ max(1, messages), both inside the window.
pub fn error_ratio(window_errors: u64, window_messages: u64) -> f64 {
    window_errors as f64 / window_messages.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(
        running: bool,
        listener_errors: u64,
        clients: (u64, u64),
        chats: (u64, u64),
        ratio: (u64, u64),
    ) -> HealthInputs {
        HealthInputs {
            running,
            listener_errors,
            clients_total: clients.0,
            clients_disconnected: clients.1,
            chats_total: chats.0,
            chats_inactive: chats.1,
            window_errors: ratio.0,
            window_messages: ratio.1,
        }
    }

    /// The seed's formula, in floating point, for comparison.
    fn seed_score(i: &HealthInputs) -> i64 {
        let mut score = 100i64;
        if !i.running {
            score -= 40;
        } else if i.listener_errors > 10 {
            score -= 20;
        } else if i.listener_errors > 5 {
            score -= 10;
        }
        if i.clients_total > 0 {
            let connected =
                (i.clients_total - i.clients_disconnected) as f64 / i.clients_total as f64;
            score -= ((1.0 - connected) * 30.0) as i64;
        }
        if i.chats_total > 0 {
            let active = (i.chats_total - i.chats_inactive) as f64 / i.chats_total as f64;
            score -= ((1.0 - active) * 20.0) as i64;
        }
        let rate = i.window_errors as f64 / i.window_messages.max(1) as f64;
        if rate > 0.10 {
            score -= 10;
        } else if rate > 0.05 {
            score -= 5;
        }
        score.max(0)
    }

    #[test]
    fn score_table() {
        // (inputs, score, status, deductions listener/clients/listeners/error_rate)
        let cases = [
            (
                inputs(true, 0, (0, 0), (0, 0), (0, 0)),
                100,
                Status::Healthy,
                [0, 0, 0, 0],
            ),
            (
                inputs(false, 0, (0, 0), (0, 0), (0, 0)),
                60,
                Status::Warning,
                [40, 0, 0, 0],
            ),
            (
                inputs(true, 5, (1, 0), (1, 0), (0, 100)),
                100,
                Status::Healthy,
                [0, 0, 0, 0],
            ),
            (
                inputs(true, 6, (1, 0), (1, 0), (0, 100)),
                90,
                Status::Healthy,
                [10, 0, 0, 0],
            ),
            (
                inputs(true, 10, (1, 0), (1, 0), (0, 100)),
                90,
                Status::Healthy,
                [10, 0, 0, 0],
            ),
            (
                inputs(true, 11, (1, 0), (1, 0), (0, 100)),
                80,
                Status::Healthy,
                [20, 0, 0, 0],
            ),
            // 5 clients, 4 connected: 30 / 5 = 6 points (the seed takes 5).
            (
                inputs(true, 0, (5, 1), (0, 0), (0, 0)),
                94,
                Status::Healthy,
                [0, 6, 0, 0],
            ),
            (
                inputs(true, 0, (3, 1), (0, 0), (0, 0)),
                90,
                Status::Healthy,
                [0, 10, 0, 0],
            ),
            (
                inputs(true, 0, (3, 3), (0, 0), (0, 0)),
                70,
                Status::Warning,
                [0, 30, 0, 0],
            ),
            // 3 chats, 1 inactive: 20 / 3 = 6 points.
            (
                inputs(true, 0, (1, 0), (3, 1), (0, 0)),
                94,
                Status::Healthy,
                [0, 0, 6, 0],
            ),
            (
                inputs(true, 0, (1, 0), (10, 10), (0, 0)),
                80,
                Status::Healthy,
                [0, 0, 20, 0],
            ),
            // ratio exactly 0.05 and 0.10 deduct nothing extra; just above does.
            (
                inputs(true, 0, (0, 0), (0, 0), (5, 100)),
                100,
                Status::Healthy,
                [0, 0, 0, 0],
            ),
            (
                inputs(true, 0, (0, 0), (0, 0), (6, 100)),
                95,
                Status::Healthy,
                [0, 0, 0, 5],
            ),
            (
                inputs(true, 0, (0, 0), (0, 0), (10, 100)),
                95,
                Status::Healthy,
                [0, 0, 0, 5],
            ),
            (
                inputs(true, 0, (0, 0), (0, 0), (11, 100)),
                90,
                Status::Healthy,
                [0, 0, 0, 10],
            ),
            // no messages: denominator 1, any error is a ratio > 0.10.
            (
                inputs(true, 1, (0, 0), (0, 0), (1, 0)),
                90,
                Status::Healthy,
                [0, 0, 0, 10],
            ),
            (
                inputs(true, 11, (2, 1), (4, 1), (30, 100)),
                50,
                Status::Critical,
                [20, 15, 5, 10],
            ),
            (
                inputs(false, 50, (4, 4), (5, 5), (50, 1)),
                0,
                Status::Critical,
                [40, 30, 20, 10],
            ),
            (
                inputs(true, 0, (5, 1), (5, 1), (0, 0)),
                90,
                Status::Healthy,
                [0, 6, 4, 0],
            ),
            (
                inputs(true, 6, (10, 3), (7, 2), (1, 15)),
                71,
                Status::Warning,
                [10, 9, 5, 5],
            ),
            // The README's worked example.
            (
                inputs(true, 7, (5, 1), (7, 2), (7, 100)),
                74,
                Status::Warning,
                [10, 6, 5, 5],
            ),
        ];
        for (i, (input, score, status, d)) in cases.iter().enumerate() {
            let health = compute(input);
            assert_eq!(health.score, *score, "case {i}: {input:?}");
            assert_eq!(health.status, *status, "case {i}");
            let got = health.deductions;
            assert_eq!(
                [got.listener, got.clients, got.listeners, got.error_rate],
                *d,
                "case {i}"
            );
            if health.score > 0 {
                assert_eq!(health.score + d.iter().sum::<u32>(), 100, "case {i}: sum");
            }
        }
    }

    #[test]
    fn exact_formula_differs_from_the_seed_where_floats_truncate() {
        let five_clients_one_down = inputs(true, 0, (5, 1), (0, 0), (0, 0));
        assert_eq!(seed_score(&five_clients_one_down), 95);
        assert_eq!(compute(&five_clients_one_down).score, 94);

        // Find every small case where they differ and check the exact one is never higher
        // than the integer definition allows: the deduction is floor(part × w / total).
        let mut differing = 0;
        for total in 1..=12u64 {
            for part in 0..=total {
                let i = inputs(true, 0, (total, part), (0, 0), (0, 0));
                let exact = compute(&i);
                assert_eq!(u64::from(exact.deductions.clients), part * 30 / total);
                if seed_score(&i) != i64::from(exact.score) {
                    differing += 1;
                }
            }
        }
        assert!(differing > 0, "the float formula should differ somewhere");
    }

    #[test]
    fn bands() {
        let status = |score: u32| {
            let lost = 100 - score;
            // Build a score from the listener and clients deductions alone.
            let i = HealthInputs {
                running: true,
                clients_total: 30,
                clients_disconnected: u64::from(lost),
                ..Default::default()
            };
            compute(&i).status
        };
        assert_eq!(status(80), Status::Healthy);
        assert_eq!(status(79), Status::Warning);
        assert_eq!(status(70), Status::Warning);
    }
}
