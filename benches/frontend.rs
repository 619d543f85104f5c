//! Frontend speed: parse and plan a generated Dockerfile of 2,000 stages and 20,000
//! instructions. Prints the time per run (criterion) and the memory one run allocates
//! (peak live bytes and total bytes, from a counting allocator).
//!
//! Run: `cargo bench --bench frontend`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use strata_shared::dag;
use strata_shared::dockerfile::Dockerfile;
use strata_shared::dockerfile::stages::BuildOptions;
use strata_shared::platform::Platform;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        TOTAL.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const STAGES: usize = 2_000;

/// 2,000 stages of 10 instructions each (FROM included): ARG, ENV, WORKDIR, COPY from the
/// context, COPY --from two earlier stages, RUN with a cache mount, LABEL, a heredoc RUN.
/// The last stage copies from every 50th stage, so most of the graph is reachable.
fn generate() -> String {
    let mut s =
        String::from("# syntax=docker/dockerfile:1\nARG BASE=busybox:1.36\nARG VERSION=1.0\n");
    for i in 0..STAGES {
        let _ = writeln!(s, "FROM ${{BASE}} AS s{i}");
        let _ = writeln!(s, "ARG VERSION");
        let _ = writeln!(s, "ENV APP_HOME=/app/{i} PATH=/app/{i}/bin:$PATH");
        let _ = writeln!(s, "WORKDIR $APP_HOME");
        let _ = writeln!(s, "COPY --chown=1000:1000 src/{i}/ ./src/");
        if i >= 2 {
            let _ = writeln!(
                s,
                "COPY --from=s{} /app/{}/out /deps/{}",
                i - 1,
                i - 1,
                i - 1
            );
            let _ = writeln!(
                s,
                "COPY --from=s{} /app/{}/out /deps/{}",
                i / 2,
                i / 2,
                i / 2
            );
        } else {
            let _ = writeln!(s, "COPY README /deps/README");
            let _ = writeln!(s, "COPY LICENSE /deps/LICENSE");
        }
        let _ = writeln!(
            s,
            "RUN --mount=type=cache,target=/root/.cache,id=c{i} \\\n    make -C src \\\n      VERSION=$VERSION out"
        );
        let _ = writeln!(s, "LABEL stage=\"{i}\" version=\"${{VERSION}}\"");
        let _ = writeln!(s, "RUN <<EOF\nset -e\necho building {i}\nEOF");
    }
    s.push_str("FROM ${BASE}\n");
    for i in (0..STAGES).step_by(50) {
        let _ = writeln!(s, "COPY --from=s{i} /app/{i}/out /out/{i}");
    }
    s
}

fn parse_and_plan(src: &str, platforms: &[Platform]) -> usize {
    let df = Dockerfile::parse(src).expect("parses");
    let plan =
        dag::plan(&df, &BuildOptions::default(), &Platform::host(), platforms).expect("plans");
    plan.instances.len()
}

fn bench(c: &mut Criterion) {
    let src = generate();
    let df = Dockerfile::parse(&src).expect("parses");
    let instructions: usize = df.parsed.stages.iter().map(|s| s.commands.len() + 1).sum();
    let one = [Platform::host()];
    let two: Vec<Platform> = ["linux/amd64", "linux/arm64"]
        .iter()
        .map(|p| p.parse().expect("platform"))
        .collect();

    let live_before = LIVE.load(Ordering::Relaxed);
    PEAK.store(live_before, Ordering::Relaxed);
    let total_before = TOTAL.load(Ordering::Relaxed);
    let started = Instant::now();
    let instances = parse_and_plan(&src, &one);
    let elapsed = started.elapsed();
    let peak = PEAK.load(Ordering::Relaxed) - live_before;
    let total = TOTAL.load(Ordering::Relaxed) - total_before;
    println!(
        "frontend: {} stages, {instructions} instructions, {} bytes of Dockerfile -> {instances} stage instances",
        df.parsed.stages.len(),
        src.len()
    );
    println!(
        "frontend: one cold parse+plan {:.1} ms, peak {:.1} MiB live, {:.1} MiB allocated in all",
        elapsed.as_secs_f64() * 1e3,
        peak as f64 / (1 << 20) as f64,
        total as f64 / (1 << 20) as f64
    );
    drop(df);

    let mut g = c.benchmark_group("frontend");
    g.sample_size(20);
    g.bench_function("parse 2000 stages", |b| {
        b.iter(|| Dockerfile::parse(&src).expect("parses"))
    });
    g.bench_function("parse+plan 2000 stages, 1 platform", |b| {
        b.iter(|| parse_and_plan(&src, &one))
    });
    g.bench_function("parse+plan 2000 stages, 2 platforms", |b| {
        b.iter(|| parse_and_plan(&src, &two))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
