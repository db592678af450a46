//! Medians, the markdown table and the gnuplot PNG.
use crate::scenario::{Sample, Scenario};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::process::Command;

pub type Results = BTreeMap<Scenario, Vec<Sample>>;

/// (median, min, max); the median of an even count is the mean of the middle two.
pub fn spread(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((med, v[0], v[n - 1]))
}

fn secs(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Option<(f64, f64, f64)> {
    spread(samples.iter().filter_map(f).collect())
}

fn fmt_spread(s: Option<(f64, f64, f64)>) -> String {
    s.map(|(m, lo, hi)| format!("{m:.2} ({lo:.2}–{hi:.2})"))
        .unwrap_or_else(|| "—".into())
}

fn mb(b: f64) -> String {
    format!("{:.1} MB", b / 1e6)
}

/// Median of a per-scenario figure.
pub fn median(r: &Results, s: Scenario, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    secs(r.get(&s)?, f).map(|x| x.0)
}

pub fn ready(s: &Sample) -> Option<f64> {
    s.ready.map(|d| d.as_secs_f64())
}

pub fn serving(s: &Sample) -> Option<f64> {
    Some(s.serving.as_secs_f64())
}

/// The results table; `layer_bytes` maps each scenario to the layer bytes of the image it pulls.
pub fn table(r: &Results, layer_bytes: &BTreeMap<Scenario, u64>) -> String {
    let mut t = String::from(
        "| scenario | runs | to `ready`, s: median (min–max) | to `serving`, s: median (min–max) \
         | received before `ready` (median) | received by `serving` (median) | ÷ image layer bytes |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (s, samples) in r {
        let before = secs(samples, |x| x.bytes_before_ready.map(|b| b as f64));
        let total = secs(samples, |x| Some(x.bytes_total as f64))
            .map(|x| x.0)
            .unwrap_or(0.0);
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {:.3} |",
            s.label(),
            samples.len(),
            fmt_spread(secs(samples, ready)),
            fmt_spread(secs(samples, serving)),
            before.map(|b| mb(b.0)).unwrap_or_else(|| "—".into()),
            mb(total),
            total / layer_bytes[s] as f64,
        );
    }
    t
}

/// Ratios the targets are stated in, from the medians of this run.
pub fn ratios(r: &Results) -> String {
    let mut t = String::new();
    let m = |s, f: fn(&Sample) -> Option<f64>| median(r, s, f);
    let line = |t: &mut String, what: &str, a: Option<f64>, b: Option<f64>| {
        if let (Some(a), Some(b)) = (a, b) {
            let _ = writeln!(t, "- {what}: {:.3}", a / b);
        }
    };
    use Scenario::*;
    line(
        &mut t,
        "streamsnap ÷ overlayfs, time to `ready`",
        m(Streamsnap, ready),
        m(Overlay, ready),
    );
    line(
        &mut t,
        "streamsnap ÷ overlayfs, time to `serving`",
        m(Streamsnap, serving),
        m(Overlay, serving),
    );
    line(
        &mut t,
        "streamsnap `serving` ÷ raw curl of all blobs",
        m(Streamsnap, serving),
        m(Curl, serving),
    );
    // The containerd a user would pick instead: whichever served sooner in this run.
    let better = [Overlay, Overlay21]
        .into_iter()
        .filter_map(|s| Some((s, m(s, serving)?)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(s, _)| s);
    if let Some(b) = better {
        let name = b.short();
        line(
            &mut t,
            &format!("streamsnap ÷ the better containerd ({name}), time to `ready`"),
            m(Streamsnap, ready),
            m(b, ready),
        );
        line(
            &mut t,
            &format!("streamsnap ÷ the better containerd ({name}), time to `serving`"),
            m(Streamsnap, serving),
            m(b, serving),
        );
    }
    line(
        &mut t,
        "streamsnap ÷ stargz snapshotter, time to `ready`",
        m(Streamsnap, ready),
        m(Stargz, ready),
    );
    line(
        &mut t,
        "streamsnap ÷ stargz snapshotter, time to `serving`",
        m(Streamsnap, serving),
        m(Stargz, serving),
    );
    line(
        &mut t,
        "unmodified gzip + index ÷ eStargz, time to `ready`",
        m(GzipIndex, ready),
        m(Streamsnap, ready),
    );
    line(
        &mut t,
        "unmodified gzip + index ÷ overlayfs, time to `serving`",
        m(GzipIndex, serving),
        m(Overlay, serving),
    );
    for (s, what) in [
        (GzipFirst, "gzip, no index, first node"),
        (GzipSecond, "gzip, second node"),
    ] {
        for (time, f) in [("ready", ready as fn(&Sample) -> Option<f64>), ("serving", serving)] {
            line(
                &mut t,
                &format!("{what} ÷ overlayfs, time to `{time}`"),
                m(s, f),
                m(Overlay, f),
            );
        }
    }
    t
}

/// Each streamsnap scenario's `serving` time against the floor of its own bytes: what it
/// received by `serving` at the rate the raw curl reached in the same run (medians).
pub fn floor(r: &Results) -> String {
    let mut t = String::new();
    let rate = |x: &Sample| Some(x.bytes_total as f64 / x.serving.as_secs_f64());
    let Some(link) = median(r, Scenario::Curl, rate) else {
        return t;
    };
    for s in [
        Scenario::Streamsnap,
        Scenario::GzipIndex,
        Scenario::GzipSecond,
        Scenario::Profile,
    ] {
        let (Some(bytes), Some(secs)) = (median(r, s, |x| Some(x.bytes_total as f64)), median(r, s, serving)) else {
            continue;
        };
        let floor = bytes / link;
        let _ = writeln!(
            t,
            "- streamsnap `serving` ÷ floor, {}: {:.3} (floor {floor:.2} s: {} received at curl's {:.0} MB/s)",
            s.short(),
            secs / floor,
            mb(bytes),
            link / 1e6
        );
    }
    t
}

/// The profile scenario against cold streamsnap and against what start-up reads.
pub fn profile(r: &Results, startup_bytes: u64) -> String {
    let mut t = String::new();
    let m = |s, f: fn(&Sample) -> Option<f64>| median(r, s, f);
    if let (Some(p), Some(c)) = (m(Scenario::Profile, ready), m(Scenario::Streamsnap, ready)) {
        let _ = writeln!(
            t,
            "- streamsnap + profile ÷ streamsnap cold, time to `ready`: {:.3}",
            p / c
        );
    }
    let before = |x: &Sample| x.bytes_before_ready.map(|b| b as f64);
    if let Some(b) = m(Scenario::Profile, before) {
        let _ = writeln!(
            t,
            "- streamsnap + profile, received before `ready` ÷ file bytes start-up read ({startup_bytes}): {:.3}",
            b / startup_bytes as f64
        );
    }
    t
}

/// Warm reads of one weight file, MB/s, per scenario that measured one.
pub fn warm(r: &Results) -> String {
    let mut t = String::new();
    let speed = |s: Scenario| {
        let v: Vec<f64> = r
            .get(&s)?
            .iter()
            .filter_map(|x| x.warm_read)
            .map(|(b, secs)| b as f64 / secs / 1e6)
            .collect();
        spread(v).map(|x| x.0)
    };
    if let (Some(o), Some(l)) = (speed(Scenario::Overlay), speed(Scenario::Streamsnap)) {
        let _ = writeln!(
            t,
            "- warm read of one fully cached weight file, page cache dropped first (median of 5 reads in new containers): overlayfs {o:.0} MB/s, \
             streamsnap {l:.0} MB/s, ratio {:.3}",
            l / o
        );
        if let Some(g) = speed(Scenario::GzipIndex) {
            let _ = writeln!(t, "- the same through a gzip index: {g:.0} MB/s, ratio {:.3}", g / o);
        }
        if let Some(z) = speed(Scenario::Stargz) {
            let _ = writeln!(
                t,
                "- the same through the stargz snapshotter: {z:.0} MB/s, ratio {:.3}",
                z / o
            );
        }
    }
    t
}

/// The re-read of all weights right after start-up, MB/s, against overlayfs (containerd 1.6).
pub fn reread(r: &Results) -> String {
    let speed = |s: Scenario| median(r, s, |x| x.reread.map(|(b, secs)| b as f64 / secs / 1e6));
    let o = speed(Scenario::Overlay);
    let mut lines = String::new();
    for s in [
        Scenario::Overlay,
        Scenario::Overlay21,
        Scenario::Streamsnap,
        Scenario::GzipIndex,
        Scenario::GzipFirst,
        Scenario::GzipSecond,
        Scenario::Stargz,
    ] {
        let Some(v) = speed(s) else { continue };
        let ratio = o.map(|o| format!(", {:.3}", v / o)).unwrap_or_default();
        let _ = writeln!(lines, "  - {}: {v:.0} MB/s{ratio}", s.short());
    }
    if lines.is_empty() {
        return lines;
    }
    format!(
        "- re-read of all weights right after start-up (registry quiet for 5 s, `posix_fadvise(DONTNEED)` on every file \
         under the snapshotter's and containerd's roots, `cat /models/*` in a new container, timed inside it; median of {} \
         re-reads per run), MB/s and speed ÷ overlayfs (1.6):\n{lines}",
        crate::reread::REREADS
    )
}

/// Peak resident memory and CPU time of each snapshotter daemon (median of the runs).
pub fn memory(r: &Results) -> String {
    let rss = |s: Scenario| median(r, s, |x| x.peak_rss.map(|b| b as f64));
    let cpu = |s: Scenario| median(r, s, |x| x.cpu_serving);
    let cpu_stop = |s: Scenario| median(r, s, |x| x.cpu_secs);
    let mut t = String::new();
    for s in [
        Scenario::Streamsnap,
        Scenario::GzipIndex,
        Scenario::GzipFirst,
        Scenario::GzipSecond,
        Scenario::Profile,
        Scenario::Stargz,
    ] {
        if let Some(b) = rss(s) {
            let _ = writeln!(t, "- daemon peak RSS, {}: {}", s.label(), mb(b));
        }
        if let (Some(c), Some(stop)) = (cpu(s), cpu_stop(s)) {
            let _ = writeln!(
                t,
                "- daemon CPU (user + system), {}: {c:.2} s to `serving`, {stop:.2} s to its stop",
                s.label()
            );
        }
    }
    if let (Some(a), Some(b)) = (rss(Scenario::Streamsnap), rss(Scenario::Stargz)) {
        let _ = writeln!(t, "- streamsnap ÷ stargz snapshotter, daemon peak RSS: {:.3}", a / b);
    }
    if let (Some(a), Some(b)) = (cpu(Scenario::Streamsnap), cpu(Scenario::Stargz)) {
        let _ = writeln!(
            t,
            "- streamsnap ÷ stargz snapshotter, daemon CPU to `serving`: {:.3}",
            a / b
        );
    }
    t
}

/// Bar chart of median time to ready and to serving, min–max as error bars (log scale).
pub fn plot(r: &Results, title: &str, png: &Path) {
    let dat = png.with_extension("dat");
    let mut d = String::new();
    for (s, samples) in r {
        let (rm, rl, rh) = secs(samples, ready).unwrap_or((f64::NAN, f64::NAN, f64::NAN));
        let (sm, sl, sh) = secs(samples, serving).unwrap();
        let _ = writeln!(d, "\"{}\" {rm} {rl} {rh} {sm} {sl} {sh}", s.short());
    }
    std::fs::write(&dat, d).unwrap();
    let script = format!(
        "set terminal pngcairo size 1000,560 noenhanced\nset output '{png}'\nset title '{title}'\n\
         set xlabel 'eStargz, gzip + index, eStargz + profile: streamsnap lazy pulls'\n\
         set ylabel 'seconds from pull start (log scale)'\nset logscale y\nset yrange [0.1:*]\nset grid ytics\n\
         set style data histograms\nset style histogram errorbars gap 2 lw 1\nset style fill solid 0.6 border -1\n\
         set key top left\n\
         plot '{dat}' using 2:3:4:xtic(1) title 'ready', '' using 5:6:7 title 'serving'\n",
        png = png.display(),
        dat = dat.display(),
    );
    let gp = png.with_extension("gp");
    std::fs::write(&gp, script).unwrap();
    let out = Command::new("gnuplot")
        .arg(&gp)
        .output()
        .expect("run gnuplot (apt-get install gnuplot-nox)");
    assert!(
        out.status.success(),
        "gnuplot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
