//! `fleetml-monitor`: the statistics the agent keeps about every prediction, in fixed
//! memory and without allocating — `#![no_std]`, `heapless` containers sized at compile
//! time — so the same core could run on a microcontroller.
//!
//! A [`Monitor`] watches one model. Per window (closed after `max_predictions`
//! predictions or `max_duration_ms`, whichever comes first) it counts, per feature, the
//! values falling in each reference bin, missing values, values outside the reference
//! range and unseen categories; the predictions' class (or score) bins; predictions that
//! were never made, by reason; latency and lag histograms; outages. Closing a window
//! computes PSI, KS, JS, chi-square and the Wasserstein distance against the reference
//! ([`stats`]), updates alerts
//! with hysteresis, and returns a [`WindowReport`]. Optionally it also watches each
//! row's reconstruction error under the bundle's principal components
//! ([`multivariate`]) and estimates the window's accuracy from the predictions'
//! confidence ([`performance`]).
//!
//! Memory: [`Monitor`] is a fixed-size value (`core::mem::size_of::<Monitor>()`: 66,112
//! bytes with the default capacities on x86_64), of which each feature slot takes
//! [`FEATURE_BYTES`] = 1,226 bytes (reference edges, proportions, bin means and
//! calibrated thresholds; the window's counts and per-bin sums; alert state).

#![no_std]

#[cfg(feature = "profile")]
extern crate std;

pub mod histogram;
pub mod multivariate;
pub mod performance;
#[cfg(feature = "profile")]
pub mod profile;
pub mod stats;

use heapless::Vec;

pub use histogram::Histogram;
pub use multivariate::Pca;
pub use performance::Cbpe;

/// Features one monitor can watch.
pub const MAX_FEATURES: usize = 48;
/// Bins per feature: numeric quantile bins, or categories plus "other".
pub const MAX_BINS: usize = 24;
/// Outages kept per window.
pub const MAX_OUTAGES: usize = 8;
/// Window sizes a feature's calibrated thresholds are given for.
pub const MAX_LIMITS: usize = 8;
/// Alert transitions one window can report: one per feature, and the prediction,
/// missing predictions, lag, reconstruction error and estimated accuracy.
pub const MAX_EVENTS: usize = MAX_FEATURES + 5;
/// Bins a window report names as having moved most.
pub const TOP_SHIFTS: usize = 3;

/// A bin whose share moved: the window's share against the reference's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shift {
    /// The bin (numeric: `(edgeᵢ₋₁, edgeᵢ]`; categorical: the category, the last one
    /// being "other").
    pub bin: u8,
    pub current: f64,
    pub reference: f64,
}

/// Thresholds calibrated for windows of `size` values (`chi2_p` 0 where it does not
/// apply).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub size: u32,
    pub psi: f64,
    pub js: f64,
    pub chi2_p: f64,
}
/// Bytes one feature slot takes (reference + window state + alert state).
pub const FEATURE_BYTES: usize = core::mem::size_of::<Reference>()
    + core::mem::size_of::<FeatureState>()
    + core::mem::size_of::<Alert>();

/// What a feature's values are compared as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Numeric,
    Categorical,
}

/// A reference distribution: bin edges (numeric) and the proportion in each bin.
#[derive(Debug, Clone)]
pub struct Reference {
    kind: Kind,
    /// Interior edges; bin `i` holds `(edges[i-1], edges[i]]`.
    edges: Vec<f64, MAX_BINS>,
    /// Proportion of the reference in each bin (sums to 1).
    q: Vec<f64, MAX_BINS>,
    min: f64,
    max: f64,
    /// Standard deviation (numeric): the unit of the normed Wasserstein distance.
    std: f64,
    /// The mean of the reference's values in each bin (numeric).
    means: Vec<f64, MAX_BINS>,
    /// Thresholds calibrated per window size, ascending (none: the fixed ones).
    limits: Vec<Limit, MAX_LIMITS>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferenceError {
    /// More bins than [`MAX_BINS`].
    TooManyBins(usize),
    /// `counts` must have one more entry than `edges`.
    Shape,
    /// No reference observations at all.
    Empty,
    /// More features than [`MAX_FEATURES`].
    TooManyFeatures(usize),
    /// Calibrated thresholds out of order, out of range or more than [`MAX_LIMITS`].
    Limits,
}

impl core::fmt::Display for ReferenceError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ReferenceError::TooManyBins(n) => {
                write!(f, "{n} bins; the monitoring core holds at most {MAX_BINS}")
            }
            ReferenceError::Shape => f.write_str("bin counts do not match the bin edges"),
            ReferenceError::Empty => f.write_str("the reference has no observations"),
            ReferenceError::TooManyFeatures(n) => write!(
                f,
                "{n} features; the monitoring core holds at most {MAX_FEATURES}"
            ),
            ReferenceError::Limits => write!(
                f,
                "calibrated thresholds must be positive, for at most {MAX_LIMITS} ascending window sizes"
            ),
        }
    }
}

impl Reference {
    /// A numeric reference: `counts[i]` values in `(edges[i-1], edges[i]]` with mean
    /// `means[i]` (empty: the bins' midpoints), observed range `[min, max]`, standard
    /// deviation `std`.
    pub fn numeric(
        edges: &[f64],
        counts: &[u64],
        means: &[f64],
        (min, max): (f64, f64),
        std: f64,
    ) -> Result<Reference, ReferenceError> {
        if counts.len() != edges.len() + 1 || !(means.is_empty() || means.len() == counts.len()) {
            return Err(ReferenceError::Shape);
        }
        let too_many = ReferenceError::TooManyBins(counts.len());
        let mut bin_means = Vec::new();
        for i in 0..counts.len() {
            let low = if i == 0 { min } else { edges[i - 1] };
            let high = if i == edges.len() { max } else { edges[i] };
            let mean = means.get(i).copied().unwrap_or((low + high) / 2.0);
            bin_means.push(mean).map_err(|_| too_many)?;
        }
        Ok(Reference {
            kind: Kind::Numeric,
            edges: Vec::from_slice(edges).map_err(|_| too_many)?,
            q: proportions(counts)?,
            min,
            max,
            std,
            means: bin_means,
            limits: Vec::new(),
        })
    }

    /// A categorical reference: `counts` per category, the last entry being "other".
    pub fn categorical(counts: &[u64]) -> Result<Reference, ReferenceError> {
        if counts.is_empty() {
            return Err(ReferenceError::Shape);
        }
        Ok(Reference {
            kind: Kind::Categorical,
            edges: Vec::new(),
            q: proportions(counts)?,
            min: f64::NEG_INFINITY,
            max: f64::INFINITY,
            std: 0.0,
            means: Vec::new(),
            limits: Vec::new(),
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn bins(&self) -> usize {
        self.q.len()
    }

    pub fn proportions(&self) -> &[f64] {
        &self.q
    }

    /// The bin of a numeric value: the number of edges strictly below it.
    pub fn bin(&self, value: f64) -> usize {
        self.edges.partition_point(|e| *e < value)
    }

    /// This reference with thresholds calibrated per window size (sizes ascending and
    /// distinct, every threshold positive and finite).
    pub fn with_limits(mut self, limits: &[Limit]) -> Result<Reference, ReferenceError> {
        let valid = |x: f64| x.is_finite() && x > 0.0;
        if limits.windows(2).any(|w| w[0].size >= w[1].size)
            || !limits.iter().all(|l| {
                l.size > 0
                    && valid(l.psi)
                    && valid(l.js)
                    && l.chi2_p.is_finite()
                    && (0.0..1.0).contains(&l.chi2_p)
            })
        {
            return Err(ReferenceError::Limits);
        }
        self.limits = Vec::from_slice(limits).map_err(|_| ReferenceError::Limits)?;
        Ok(self)
    }

    /// The calibrated thresholds for a window of `n` values: between two calibrated
    /// sizes, interpolated linearly in `log n` against the logarithm of each threshold (the
    /// statistics' spread under no drift falls as a power of `n`); beyond them, the
    /// nearest size's. `None` when the reference has none.
    pub fn limits_at(&self, n: u32) -> Option<Limit> {
        let first = *self.limits.first()?;
        let last = *self.limits.last()?;
        if n <= first.size {
            return Some(Limit { size: n, ..first });
        }
        if n >= last.size {
            return Some(Limit { size: n, ..last });
        }
        let i = self.limits.partition_point(|l| l.size < n);
        let (a, b) = (self.limits[i - 1], self.limits[i]);
        let t = (libm::log(f64::from(n)) - libm::log(f64::from(a.size)))
            / (libm::log(f64::from(b.size)) - libm::log(f64::from(a.size)));
        let between = |x: f64, y: f64| {
            if x > 0.0 && y > 0.0 {
                libm::exp(libm::log(x) + t * (libm::log(y) - libm::log(x)))
            } else {
                x + t * (y - x)
            }
        };
        Some(Limit {
            size: n,
            psi: between(a.psi, b.psi),
            js: between(a.js, b.js),
            chi2_p: between(a.chi2_p, b.chi2_p),
        })
    }

    /// The figures of one window of `values` against this reference, computed exactly as
    /// a [`Monitor`] computes them (the builder calibrates thresholds with it).
    pub fn window(&self, values: impl IntoIterator<Item = Observation>) -> FeatureReport {
        let mut state = FeatureState::default();
        let mut inputs = 0u32;
        for v in values {
            state.observe(self, v);
            inputs += 1;
        }
        state.report(self, inputs)
    }
}

fn proportions(counts: &[u64]) -> Result<Vec<f64, MAX_BINS>, ReferenceError> {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return Err(ReferenceError::Empty);
    }
    let mut q = Vec::new();
    for &c in counts {
        q.push(c as f64 / n as f64)
            .map_err(|_| ReferenceError::TooManyBins(counts.len()))?;
    }
    Ok(q)
}

/// One feature value of one prediction, as the monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    /// A numeric value (NaN counts as missing).
    Number(f64),
    /// A known category, by its index in the schema's list.
    Category(usize),
    /// A category the schema does not list (counted in "other").
    Unseen,
    /// No value.
    Missing,
}

/// Why an input got no prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissReason {
    InvalidInput = 0,
    ModelNotLoaded = 1,
    BackendError = 2,
    BackendPanic = 3,
    Timeout = 4,
    Shed = 5,
    /// Declared as expected (`POST /v1/expect`) and not predicted by its deadline.
    ExpectedNotPredicted = 6,
}

pub const MISS_REASONS: usize = 7;

impl MissReason {
    pub const ALL: [MissReason; MISS_REASONS] = [
        MissReason::InvalidInput,
        MissReason::ModelNotLoaded,
        MissReason::BackendError,
        MissReason::BackendPanic,
        MissReason::Timeout,
        MissReason::Shed,
        MissReason::ExpectedNotPredicted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MissReason::InvalidInput => "invalid_input",
            MissReason::ModelNotLoaded => "model_not_loaded",
            MissReason::BackendError => "backend_error",
            MissReason::BackendPanic => "backend_panic",
            MissReason::Timeout => "timeout",
            MissReason::Shed => "shed",
            MissReason::ExpectedNotPredicted => "expected_not_predicted",
        }
    }
}

/// When a window closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    pub max_predictions: u32,
    pub max_duration_ms: u64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            max_predictions: 1000,
            max_duration_ms: 300_000,
        }
    }
}

/// Alert thresholds; a subject alerts after `windows` consecutive windows past a
/// threshold and recovers after `windows` consecutive windows within all of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub psi: f64,
    pub js: f64,
    /// Categorical features and class predictions: drifting when the chi-square p-value
    /// is below this.
    pub chi2_p: f64,
    /// Share of a window's values that are categories the reference never saw (for a
    /// numeric feature: values that are not numbers): drifting above this. They are left
    /// out of the chi-square test, which compares only categories the reference has.
    pub unseen_rate: f64,
    /// Missed predictions / (predictions + missed).
    pub missing_rate: f64,
    /// 95th percentile of the prediction lag.
    pub lag_p95_ms: u64,
    /// Estimated accuracy (classifiers with a calibration map) below which the model
    /// alerts; `None`: the limit calibrated for the window size.
    pub min_estimated_accuracy: Option<f64>,
    /// Which of `psi`, `js` and `chi2_p` were set explicitly: those hold for every
    /// feature; the others give way to a feature's calibrated thresholds when it has some.
    pub fixed: Fixed,
    /// Windows with fewer predictions than this are reported but do not move alerts.
    pub min_predictions: u32,
    pub windows: u8,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            psi: 0.2,
            js: 0.1,
            chi2_p: 0.01,
            unseen_rate: 0.05,
            missing_rate: 0.05,
            lag_p95_ms: 300_000,
            min_estimated_accuracy: None,
            fixed: Fixed::default(),
            min_predictions: 100,
            windows: 3,
        }
    }
}

/// Thresholds set explicitly (they win over calibrated ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fixed {
    pub psi: bool,
    pub js: bool,
    pub chi2_p: bool,
}

impl Thresholds {
    /// The thresholds for a window of `n` values of a feature with `reference`.
    pub fn for_window(&self, reference: &Reference, n: u32) -> Thresholds {
        let mut t = *self;
        if let Some(l) = reference.limits_at(n) {
            if !self.fixed.psi {
                t.psi = l.psi;
            }
            if !self.fixed.js {
                t.js = l.js;
            }
            if !self.fixed.chi2_p && l.chi2_p > 0.0 {
                t.chi2_p = l.chi2_p;
            }
        }
        t
    }
}

#[derive(Debug, Clone)]
struct FeatureState {
    counts: [u32; MAX_BINS],
    /// The sum of the numeric values in each bin.
    sums: [f64; MAX_BINS],
    /// Lowest and highest numeric value binned.
    low: f64,
    high: f64,
    missing: u32,
    out_of_range: u32,
    unseen: u32,
    attribution_sum: f64,
    attributions: u32,
}

impl Default for FeatureState {
    fn default() -> Self {
        FeatureState {
            counts: [0; MAX_BINS],
            sums: [0.0; MAX_BINS],
            low: f64::INFINITY,
            high: f64::NEG_INFINITY,
            missing: 0,
            out_of_range: 0,
            unseen: 0,
            attribution_sum: 0.0,
            attributions: 0,
        }
    }
}

impl FeatureState {
    fn observe(&mut self, reference: &Reference, value: Observation) {
        let last = reference.bins() - 1;
        match (reference.kind, value) {
            (_, Observation::Missing) => self.missing += 1,
            (_, Observation::Number(v)) if v.is_nan() => self.missing += 1,
            (Kind::Numeric, Observation::Number(v)) => {
                if v < reference.min || v > reference.max {
                    self.out_of_range += 1;
                }
                self.low = self.low.min(v);
                self.high = self.high.max(v);
                let bin = reference.bin(v);
                self.counts[bin] += 1;
                self.sums[bin] += v;
            }
            (Kind::Categorical, Observation::Category(i)) if i < last => self.counts[i] += 1,
            (Kind::Categorical, Observation::Number(v)) if v >= 0.0 && (v as usize) < last => {
                self.counts[v as usize] += 1
            }
            (Kind::Categorical, _) | (Kind::Numeric, _) => {
                self.unseen += 1;
                self.counts[last] += 1;
            }
        }
    }

    /// The window's figures; rates are over `inputs` (predicted plus invalid inputs).
    fn report(&self, reference: &Reference, inputs: u32) -> FeatureReport {
        let counts = &self.counts[..reference.bins()];
        let q = reference.proportions();
        let rate = |k: u32| {
            if inputs == 0 {
                0.0
            } else {
                k as f64 / inputs as f64
            }
        };
        let chi = match reference.kind {
            Kind::Categorical => stats::chi_square(counts, q),
            Kind::Numeric => None,
        };
        FeatureReport {
            values: counts.iter().sum(),
            missing_rate: rate(self.missing),
            out_of_range_rate: rate(self.out_of_range),
            unseen_rate: rate(self.unseen),
            psi: stats::psi(counts, q),
            ks: (reference.kind == Kind::Numeric).then(|| stats::ks(counts, q)),
            js: stats::js(counts, q),
            chi2_p: chi.map(|(_, p)| p),
            chi2: chi.map(|(x2, _)| x2),
            wasserstein: match reference.kind {
                Kind::Numeric => stats::wasserstein(
                    counts,
                    &self.sums[..reference.bins()],
                    q,
                    stats::Support {
                        edges: &reference.edges,
                        means: &reference.means,
                        reference: (reference.min, reference.max),
                        window: (self.low, self.high),
                        std: reference.std,
                    },
                )
                .map(|(w, _)| w),
                Kind::Categorical => None,
            },
            usefulness: (self.attributions > 0)
                .then(|| self.attribution_sum / self.attributions as f64),
            moved: moved(counts, q),
            drifting: false,
        }
    }
}

/// The [`TOP_SHIFTS`] bins whose share differs most from the reference's (none without
/// values; bins that did not move are left out).
fn moved(counts: &[u32], q: &[f64]) -> [Option<Shift>; TOP_SHIFTS] {
    let mut top = [None; TOP_SHIFTS];
    let n: f64 = counts.iter().map(|&c| f64::from(c)).sum();
    if n == 0.0 {
        return top;
    }
    let gap = |s: &Option<Shift>| s.map_or(0.0, |s| libm::fabs(s.current - s.reference));
    for (i, (&c, &q)) in counts.iter().zip(q).enumerate() {
        let shift = Some(Shift {
            bin: i as u8,
            current: f64::from(c) / n,
            reference: q,
        });
        let g = gap(&shift);
        if g == 0.0 {
            continue;
        }
        if let Some(at) = top.iter().position(|t| g > gap(t)) {
            top.copy_within(at..TOP_SHIFTS - 1, at + 1);
            top[at] = shift;
        }
    }
    top
}

/// Drift of one feature (or of the predictions) in one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureReport {
    /// Values binned (not missing).
    pub values: u32,
    pub missing_rate: f64,
    /// Outside the reference's observed `[min, max]`.
    pub out_of_range_rate: f64,
    pub unseen_rate: f64,
    pub psi: f64,
    /// Numeric only (at the reference quantile edges; see [`stats`]).
    pub ks: Option<f64>,
    pub js: f64,
    /// Categorical only.
    pub chi2_p: Option<f64>,
    /// The chi-square statistic `chi2_p` is the p-value of (the builder's calibration
    /// adjusts it for the reference's own sampling error).
    pub chi2: Option<f64>,
    /// Numeric only: in reference standard deviations (see [`stats`]).
    pub wasserstein: Option<f64>,
    /// The bins whose share moved most, largest move first (what an alert says moved).
    pub moved: [Option<Shift>; TOP_SHIFTS],
    /// Mean |attribution| over the window's explained predictions.
    pub usefulness: Option<f64>,
    /// The alert state after this window.
    pub drifting: bool,
}

impl FeatureReport {
    fn past(&self, t: &Thresholds) -> bool {
        self.psi > t.psi
            || self.js > t.js
            || self.chi2_p.is_some_and(|p| p < t.chi2_p)
            || self.unseen_rate > t.unseen_rate
    }
}

/// p50, p95 and p99 of a histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quantiles {
    pub p50: Option<u64>,
    pub p95: Option<u64>,
    pub p99: Option<u64>,
}

impl Quantiles {
    fn of(h: &Histogram) -> Quantiles {
        Quantiles {
            p50: h.quantile(0.50),
            p95: h.quantile(0.95),
            p99: h.quantile(0.99),
        }
    }
}

/// A stretch in which inputs arrived (or were expected) and none got a prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    pub start_ms: u64,
    /// `None` while it lasts.
    pub end_ms: Option<u64>,
    pub missed: u32,
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A feature, by its index.
    Feature(usize),
    Prediction,
    MissingPredictions,
    Lag,
    /// The reconstruction error of the numeric features together ([`Pca`]).
    Multivariate,
    /// The accuracy estimated from the predictions' confidence ([`Cbpe`]).
    EstimatedAccuracy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Raised,
    Recovered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertEvent {
    pub subject: Subject,
    pub transition: Transition,
}

#[derive(Debug, Clone, Copy, Default)]
struct Alert {
    active: bool,
    streak: u8,
}

impl Alert {
    /// Feeds one window's verdict; returns a transition when the state flips.
    fn update(&mut self, past: bool, windows: u8) -> Option<Transition> {
        if past != self.active {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.streak = 0;
        }
        if self.streak >= windows.max(1) {
            self.active = past;
            self.streak = 0;
            return Some(if past {
                Transition::Raised
            } else {
                Transition::Recovered
            });
        }
        None
    }
}

/// A subject's window figures and the alert transition they caused, if any.
struct Closed {
    report: FeatureReport,
    transition: Option<Transition>,
}

impl Closed {
    /// The report, after queueing the transition (if any) as an event of `subject`.
    fn then_raise(
        self,
        subject: Subject,
        events: &mut Vec<AlertEvent, MAX_EVENTS>,
    ) -> FeatureReport {
        if let Some(transition) = self.transition {
            let _ = events.push(AlertEvent {
                subject,
                transition,
            });
        }
        self.report
    }
}

/// Closes one subject's window of `inputs` values: its figures against the thresholds
/// for that many (moving its alert only when the window `counted`), and a fresh state.
fn close_subject(
    reference: &Reference,
    state: &mut FeatureState,
    alert: &mut Alert,
    inputs: u32,
    t: &Thresholds,
    counted: bool,
) -> Closed {
    let mut report = state.report(reference, inputs);
    let limits = t.for_window(reference, inputs);
    let transition = if counted {
        alert.update(report.past(&limits), t.windows)
    } else {
        None
    };
    report.drifting = alert.active;
    *state = FeatureState::default();
    Closed { report, transition }
}

/// Everything a closed window says.
#[derive(Debug, Clone)]
pub struct WindowReport {
    /// Windows closed before this one.
    pub seq: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub predictions: u32,
    pub features: Vec<FeatureReport, MAX_FEATURES>,
    pub prediction: Option<FeatureReport>,
    pub missed: [u32; MISS_REASONS],
    pub latency_us: Quantiles,
    pub lag_ms: Quantiles,
    /// Rows per batch the dynamic batcher ran (count 0 when the model is not batched).
    pub batch_rows: Quantiles,
    pub outages: Vec<Outage, MAX_OUTAGES>,
    /// Outages beyond [`MAX_OUTAGES`] in this window (counted, not listed).
    pub outages_dropped: u32,
    pub events: Vec<AlertEvent, MAX_EVENTS>,
    /// The reconstruction error's drift, when the model has a multivariate reference.
    pub multivariate: Option<FeatureReport>,
    /// Estimated accuracy of the window's predictions and the limit it was held to, when
    /// the model has a calibration map and the window saw confidences.
    pub estimated_accuracy: Option<Estimate>,
    /// Whether the estimated accuracy alerts after this window (also in a window that
    /// saw no confidences, which leaves the alert as it was).
    pub accuracy_alert: bool,
    /// Subjects alerting after this window.
    pub missing_alert: bool,
    pub lag_alert: bool,
}

impl WindowReport {
    pub fn missed_total(&self) -> u32 {
        self.missed.iter().sum()
    }

    /// Missed / (predictions + missed).
    pub fn missing_prediction_rate(&self) -> f64 {
        let missed = self.missed_total();
        let all = self.predictions + missed;
        if all == 0 {
            0.0
        } else {
            missed as f64 / all as f64
        }
    }
}

/// A window's estimated accuracy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub accuracy: f64,
    /// The limit below which it alerts (explicit or calibrated), if any.
    pub limit: Option<f64>,
    /// Predictions it is estimated over.
    pub predictions: u32,
    /// The alert state after this window.
    pub alerting: bool,
}

/// The window state of the accuracy estimate.
#[derive(Debug, Clone)]
struct Performance {
    cbpe: Cbpe,
    sum: f64,
    count: u32,
    alert: Alert,
}

/// The monitor of one model.
#[derive(Debug, Clone)]
pub struct Monitor {
    references: Vec<Reference, MAX_FEATURES>,
    states: Vec<FeatureState, MAX_FEATURES>,
    alerts: Vec<Alert, MAX_FEATURES>,
    prediction: Option<(Reference, FeatureState, Alert)>,
    multivariate: Option<(Pca, Reference, FeatureState, Alert)>,
    performance: Option<Performance>,
    missing_alert: Alert,
    lag_alert: Alert,
    config: WindowConfig,
    thresholds: Thresholds,
    seq: u64,
    start_ms: Option<u64>,
    predictions: u32,
    missed: [u32; MISS_REASONS],
    latency_us: Histogram,
    lag_ms: Histogram,
    batch_rows: Histogram,
    outages: Vec<Outage, MAX_OUTAGES>,
    outages_dropped: u32,
    /// The outage in progress, if inputs are being missed since the last prediction.
    open_outage: Option<Outage>,
}

impl Monitor {
    /// A monitor for features with these references and, optionally, the prediction
    /// distribution's reference.
    pub fn new(
        features: &[Reference],
        prediction: Option<Reference>,
        config: WindowConfig,
        thresholds: Thresholds,
    ) -> Result<Monitor, ReferenceError> {
        let too_many = ReferenceError::TooManyFeatures(features.len());
        let mut states = Vec::new();
        let mut alerts = Vec::new();
        for _ in features {
            states.push(FeatureState::default()).map_err(|_| too_many)?;
            alerts.push(Alert::default()).map_err(|_| too_many)?;
        }
        Ok(Monitor {
            references: Vec::from_slice(features).map_err(|_| too_many)?,
            states,
            alerts,
            prediction: prediction.map(|r| (r, FeatureState::default(), Alert::default())),
            multivariate: None,
            performance: None,
            missing_alert: Alert::default(),
            lag_alert: Alert::default(),
            config,
            thresholds,
            seq: 0,
            start_ms: None,
            predictions: 0,
            missed: [0; MISS_REASONS],
            latency_us: Histogram::default(),
            lag_ms: Histogram::default(),
            batch_rows: Histogram::default(),
            outages: Vec::new(),
            outages_dropped: 0,
            open_outage: None,
        })
    }

    pub fn features(&self) -> usize {
        self.references.len()
    }

    /// Also watches the rows' reconstruction error under `pca` against `reference` (the
    /// error's distribution on the reference rows, with its calibrated thresholds).
    pub fn with_multivariate(mut self, pca: Pca, reference: Reference) -> Monitor {
        self.multivariate = Some((pca, reference, FeatureState::default(), Alert::default()));
        self
    }

    /// Also estimates each window's accuracy from the confidences given to
    /// [`Self::confidence`].
    pub fn with_performance(mut self, cbpe: Cbpe) -> Monitor {
        self.performance = Some(Performance {
            cbpe,
            sum: 0.0,
            count: 0,
            alert: Alert::default(),
        });
        self
    }

    /// Records the confidence (the winning class's score) of the prediction about to be
    /// given to [`Self::observe`].
    pub fn confidence(&mut self, confidence: f64) {
        if let Some(p) = &mut self.performance
            && confidence.is_finite()
        {
            p.sum += p.cbpe.expected(confidence);
            p.count += 1;
        }
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// Records that the dynamic batcher ran a batch of `rows` rows (its predictions are
    /// recorded one by one with [`Self::observe`]).
    pub fn batched(&mut self, rows: u32) {
        self.batch_rows.record(u64::from(rows));
    }

    /// Records one prediction: its feature values (in reference order; extra values are
    /// ignored, absent ones count as missing), the predicted class (or score) as an
    /// observation of the prediction reference, its latency and, when the event carried
    /// a timestamp, its lag. Returns the window's report if this closed it.
    pub fn observe(
        &mut self,
        now_ms: u64,
        values: &[Observation],
        prediction: Option<Observation>,
        latency_us: u64,
        lag_ms: Option<u64>,
    ) -> Option<WindowReport> {
        self.start_ms.get_or_insert(now_ms);
        for (i, (reference, state)) in self.references.iter().zip(&mut self.states).enumerate() {
            state.observe(
                reference,
                values.get(i).copied().unwrap_or(Observation::Missing),
            );
        }
        if let (Some((reference, state, _)), Some(p)) = (&mut self.prediction, prediction) {
            state.observe(reference, p);
        }
        if let Some((pca, reference, state, _)) = &mut self.multivariate {
            let error = pca
                .error(values)
                .map_or(Observation::Missing, Observation::Number);
            state.observe(reference, error);
        }
        self.predictions += 1;
        self.latency_us.record(latency_us);
        if let Some(lag) = lag_ms {
            self.lag_ms.record(lag);
        }
        if let Some(mut outage) = self.open_outage.take() {
            outage.end_ms = Some(now_ms);
            self.keep_outage(outage);
        }
        if self.predictions >= self.config.max_predictions {
            return Some(self.close(now_ms));
        }
        None
    }

    /// Records `count` inputs that got no prediction.
    pub fn missed(&mut self, now_ms: u64, reason: MissReason, count: u32) {
        self.start_ms.get_or_insert(now_ms);
        self.missed[reason as usize] = self.missed[reason as usize].saturating_add(count);
        let outage = self.open_outage.get_or_insert(Outage {
            start_ms: now_ms,
            end_ms: None,
            missed: 0,
        });
        outage.missed = outage.missed.saturating_add(count);
    }

    /// Records a feature value that made its input invalid (and so got no prediction):
    /// a number outside the schema's range counts as out of range, a category the
    /// schema does not list as unseen. Rates are over all inputs received (predicted
    /// plus invalid).
    pub fn rejected(&mut self, feature: usize, value: Observation) {
        if let Some(state) = self.states.get_mut(feature) {
            match value {
                Observation::Number(v) if !v.is_nan() => state.out_of_range += 1,
                Observation::Unseen => state.unseen += 1,
                _ => {}
            }
        }
    }

    /// Adds one explained prediction's attributions (per feature, reference order) to the
    /// window's feature-usefulness summary.
    pub fn attributions(&mut self, attributions: &[f64]) {
        for (state, a) in self.states.iter_mut().zip(attributions) {
            if a.is_finite() {
                state.attribution_sum += libm::fabs(*a);
                state.attributions += 1;
            }
        }
    }

    /// Closes the window if it has lasted `max_duration_ms` and saw anything.
    pub fn tick(&mut self, now_ms: u64) -> Option<WindowReport> {
        let start = self.start_ms?;
        if now_ms.saturating_sub(start) >= self.config.max_duration_ms {
            return Some(self.close(now_ms));
        }
        None
    }

    fn keep_outage(&mut self, outage: Outage) {
        if self.outages.push(outage).is_err() {
            self.outages_dropped += 1;
        }
    }

    /// Closes the window now and returns its report.
    pub fn close(&mut self, now_ms: u64) -> WindowReport {
        let t = self.thresholds;
        let counted = self.predictions >= t.min_predictions;
        let mut events = Vec::new();
        let mut features = Vec::new();
        let inputs = self.predictions + self.missed[MissReason::InvalidInput as usize];
        for (i, ((reference, state), alert)) in self
            .references
            .iter()
            .zip(&mut self.states)
            .zip(&mut self.alerts)
            .enumerate()
        {
            // Calibrated by rows: the window's inputs, missing values included.
            let report = close_subject(reference, state, alert, inputs, &t, counted)
                .then_raise(Subject::Feature(i), &mut events);
            let _ = features.push(report);
        }
        let predictions = self.predictions;
        let prediction = self.prediction.as_mut().map(|(reference, state, alert)| {
            close_subject(reference, state, alert, predictions, &t, counted)
                .then_raise(Subject::Prediction, &mut events)
        });
        let multivariate = self
            .multivariate
            .as_mut()
            .map(|(_, reference, state, alert)| {
                close_subject(reference, state, alert, predictions, &t, counted)
                    .then_raise(Subject::Multivariate, &mut events)
            });
        let estimated_accuracy = match &mut self.performance {
            Some(p) if p.count > 0 => {
                let accuracy = p.sum / f64::from(p.count);
                let limit = t
                    .min_estimated_accuracy
                    .or_else(|| p.cbpe.limit_at(p.count));
                let below = limit.is_some_and(|l| accuracy < l);
                if counted && let Some(transition) = p.alert.update(below, t.windows) {
                    let _ = events.push(AlertEvent {
                        subject: Subject::EstimatedAccuracy,
                        transition,
                    });
                }
                let estimate = Estimate {
                    accuracy,
                    limit,
                    predictions: p.count,
                    alerting: p.alert.active,
                };
                p.sum = 0.0;
                p.count = 0;
                Some(estimate)
            }
            _ => None,
        };
        let accuracy_alert = self.performance.as_ref().is_some_and(|p| p.alert.active);
        let mut outages = core::mem::take(&mut self.outages);
        if let Some(open) = self.open_outage
            && outages.push(open).is_err()
        {
            self.outages_dropped += 1;
        }
        let mut report = WindowReport {
            seq: self.seq,
            start_ms: self.start_ms.unwrap_or(now_ms),
            end_ms: now_ms,
            predictions: self.predictions,
            features,
            prediction,
            missed: self.missed,
            latency_us: Quantiles::of(&self.latency_us),
            lag_ms: Quantiles::of(&self.lag_ms),
            batch_rows: Quantiles::of(&self.batch_rows),
            outages,
            outages_dropped: self.outages_dropped,
            events,
            multivariate,
            estimated_accuracy,
            accuracy_alert,
            missing_alert: false,
            lag_alert: false,
        };
        let missing_past = report.missing_prediction_rate() > t.missing_rate;
        if (counted || report.missed_total() >= t.min_predictions)
            && let Some(transition) = self.missing_alert.update(missing_past, t.windows)
        {
            let _ = report.events.push(AlertEvent {
                subject: Subject::MissingPredictions,
                transition,
            });
        }
        if counted
            && let Some(p95) = report.lag_ms.p95
            && let Some(transition) = self.lag_alert.update(p95 > t.lag_p95_ms, t.windows)
        {
            let _ = report.events.push(AlertEvent {
                subject: Subject::Lag,
                transition,
            });
        }
        report.missing_alert = self.missing_alert.active;
        report.lag_alert = self.lag_alert.active;

        self.seq += 1;
        // An outage still going on carries into the next window.
        self.start_ms = self.open_outage.map(|o| o.start_ms.max(now_ms));
        self.predictions = 0;
        self.missed = [0; MISS_REASONS];
        self.latency_us.clear();
        self.lag_ms.clear();
        self.batch_rows.clear();
        self.outages_dropped = 0;
        report
    }
}
