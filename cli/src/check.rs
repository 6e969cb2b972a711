//! `moe check`: golden cases on a backend, or on in-process expert-parallel ranks. Every
//! case gets a line; a case that cannot be read or run is a failed case, never the end of
//! the run.

use crate::backends::{dispatch, BackendArgs, BackendKind, OnBackend};
use crate::bench::WeightDtype;
use crate::error::{CliError, CliResult};
use crate::out;
use moe_engine::golden::{self, CaseResult};
use moe_engine::{Backend, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `moe check`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    backend: BackendArgs,
    /// Run every case on N in-process ranks holding the whole batch, experts spread over
    /// them (N must divide each case's expert count); every rank must match. 1: one rank.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    ep: u64,
    /// With --ep: ranks per simulated node; the exchange then runs hierarchically (within
    /// nodes, then across). 0: one flat exchange.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1024))]
    ep_per_node: u64,
    /// Seconds a rank waits for its peers before the collective fails (with --ep), 1 to
    /// 604800 (a week).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    ep_timeout: u64,
    /// Storage dtype of the expert weights (the router stays f32). With f16 or bf16 the
    /// float outputs are held to that type's product tolerance; routing stays exact;
    /// training traces are skipped (they replay in f32). Not with --ep.
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    weights: WeightDtype,
    /// Print every compared output, not just the worst error.
    #[arg(long, short)]
    verbose: bool,
    /// Case folders or folders of cases.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

/// Runs the cases; exit status 0 only when every case passed.
pub fn run(a: Args) -> CliResult<ExitCode> {
    if a.ep_per_node > 0 && (a.ep == 1 || !a.ep.is_multiple_of(a.ep_per_node)) {
        return Err(CliError::flag(
            "--ep-per-node",
            format!("{} ranks per node must divide --ep {} (and --ep must be above 1)", a.ep_per_node, a.ep),
        ));
    }
    if a.ep > 1 && a.weights != WeightDtype::F32 {
        return Err(CliError::flag("--weights", "expert-parallel runs check f32 weights only; drop --ep or --weights"));
    }
    let threads = (a.ep > 1).then_some(1);
    dispatch(&a.backend, BackendKind::Cpu, threads, Check { a: &a })
}

struct Check<'a> {
    a: &'a Args,
}

/// Counts of passed and failed cases.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

impl OnBackend for Check<'_> {
    type Out = ExitCode;

    fn run<B: Backend>(self, kind: BackendKind, open: &(dyn Fn(usize) -> Result<B> + Sync)) -> CliResult<ExitCode> {
        let a = self.a;
        let single = if a.ep == 1 {
            let b = open(0)?;
            if kind != BackendKind::Cpu {
                eprintln!("{} on {}", kind.name(), b.capabilities().device);
            }
            Some(b)
        } else {
            None
        };
        let mut tally = Tally::default();
        for path in &a.paths {
            let cases = match golden::discover(path) {
                Ok(c) => c,
                Err(e) => {
                    fail_line(&mut tally, &path.display().to_string(), &e.into())?;
                    continue;
                }
            };
            let weights = a.weights.dtype();
            for dir in &cases {
                let shown = dir.display().to_string();
                if weights != moe_engine::DType::F32 && golden::is_trace(dir) {
                    out!(
                        "SKIP {shown:<40} a training trace: it replays in f32 (--weights {weights} checks inference)"
                    )?;
                    continue;
                }
                let outcome = guarded(|| match &single {
                    Some(b) => golden::run_case_in(b, dir, weights).map(|r| vec![r]),
                    None => golden::run_case_ep(
                        open,
                        dir,
                        a.ep as usize,
                        a.ep_per_node as usize,
                        Duration::from_secs(a.ep_timeout),
                    ),
                });
                match outcome {
                    Ok(ranks) => case_lines(&mut tally, &ranks, a)?,
                    Err(e) => fail_line(&mut tally, &shown, &e.into())?,
                }
            }
        }
        out!("{} passed, {} failed", tally.passed, tally.failed)?;
        Ok(if tally.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    }
}

/// Runs one case, turning a panic (a bug: the engine returns errors for bad input) into an
/// internal error of that case, so the other cases still run.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(moe_engine::Error::Internal(format!("the case hit a bug in moe-engine (please report it): {msg}")))
    })
}

fn fail_line(t: &mut Tally, what: &str, e: &CliError) -> CliResult<()> {
    t.failed += 1;
    let report = e.report().replace('\n', "\n    ");
    out!("FAIL {what:<40} {report}")?;
    Ok(())
}

/// The line of one case (every rank of it must pass), then the failing or, with
/// `--verbose`, every compared output.
fn case_lines(t: &mut Tally, ranks: &[CaseResult], a: &Args) -> CliResult<()> {
    let ok = !ranks.is_empty() && ranks.iter().all(|r| r.pass);
    let worst = ranks.iter().map(|r| r.worst_rel_l2).fold(0.0, f64::max);
    let first = ranks.first();
    let (name, kind) = first.map_or((String::new(), String::new()), |r| (r.name.clone(), r.kind.clone()));
    let exact_bad: Vec<String> = ranks
        .iter()
        .flat_map(|r| &r.outputs)
        .filter(|o| o.exact && !o.pass)
        .map(|o| format!("{} ({} differ)", o.name, o.error))
        .collect();
    let status = if ok { "PASS" } else { "FAIL" };
    let mut line = format!("{status} {name:<40} {kind:<22} worst rel_l2 {worst:.2e}");
    let grad = ranks.iter().filter_map(|r| r.worst_grad_rel_l2).reduce(f64::max);
    if let Some(g) = grad {
        line.push_str(&format!(", gradients {g:.2e}"));
    }
    if ranks.len() > 1 {
        line.push_str(&format!(" over {} ranks", ranks.len()));
    }
    if !exact_bad.is_empty() {
        line.push_str(&format!("; exact mismatch: {}", exact_bad.join(", ")));
    }
    if let Some(skipped) = first.filter(|r| !r.not_compared.is_empty()) {
        line.push_str(&format!("; not compared: {}", skipped.not_compared.join(", ")));
    }
    out!("{line}")?;
    if a.verbose || !ok {
        for (rank, r) in ranks.iter().enumerate() {
            let who = if ranks.len() > 1 { format!("rank {rank} ") } else { String::new() };
            for o in r.outputs.iter().filter(|o| a.verbose || !o.pass) {
                let what = if o.exact { format!("{} mismatches", o.error) } else { format!("rel_l2 {:.3e}", o.error) };
                out!("    {who}{:<14} {:<22} {}", o.name, what, if o.pass { "ok" } else { "FAIL" })?;
            }
        }
    }
    if ok {
        t.passed += 1;
    } else {
        t.failed += 1;
    }
    Ok(())
}
