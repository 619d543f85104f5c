//! `strata plan`: reads a Dockerfile and prints the stage instances a build would run.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use strata_coordinator::placement::{Emulation, place_all};
use strata_shared::dag;
use strata_shared::dockerfile::Dockerfile;
use strata_shared::dockerfile::stages::BuildOptions;
use strata_shared::platform::Platform;

/// What `strata build` and `strata plan` both take: the Dockerfile, its context, and what
/// selects the stages and platforms to build.
#[derive(Debug, Args)]
pub struct DockerfileArgs {
    /// The build context directory.
    #[arg(default_value = ".")]
    pub context: PathBuf,
    /// The Dockerfile (default: CONTEXT/Dockerfile; `-` reads standard input).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// The stage to build (default: the last one).
    #[arg(long)]
    pub target: Option<String>,
    /// A build argument, `KEY=VALUE`, or `KEY` to take the value from the environment.
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Target platforms, comma-separated or repeated (default: this machine's).
    #[arg(long = "platform", value_delimiter = ',')]
    pub platforms: Vec<String>,
    /// Whether stages of a platform this machine cannot run natively may run under QEMU.
    #[arg(long, default_value = "allow", value_parser = ["allow", "deny"])]
    pub emulation: String,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    dockerfile: DockerfileArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
    Dot,
}

/// Reads the Dockerfile named by `-f`/the context, returning its display name and text. With no
/// `-f`, the context's `Dockerfile`, else its `dockerfile` (BuildKit's fallback).
pub fn read_dockerfile(context: &Path, file: Option<&Path>) -> Result<(String, String)> {
    let path = match file {
        Some(p) if p == Path::new("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the Dockerfile from standard input")?;
            return Ok(("<stdin>".into(), s));
        }
        Some(p) => p.to_path_buf(),
        None => {
            let upper = context.join("Dockerfile");
            let lower = context.join("dockerfile");
            if !upper.exists() && lower.exists() {
                lower
            } else {
                upper
            }
        }
    };
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok((
        path.display().to_string(),
        String::from_utf8_lossy(&bytes).into_owned(),
    ))
}

/// The ignore file named after the Dockerfile at `dockerfile` (`Dockerfile.dockerignore`
/// beside it), which BuildKit prefers to the context's `.dockerignore`; `None` when there is
/// none (or the Dockerfile came from standard input).
pub fn dockerignore_for(dockerfile: &str) -> Result<Option<String>> {
    if dockerfile == "<stdin>" {
        return Ok(None);
    }
    let path = PathBuf::from(format!("{dockerfile}.dockerignore"));
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("reading {}: {e}", path.display())),
    }
}

/// `KEY=VALUE` pairs; a bare `KEY` takes its value from the environment and is skipped when
/// the environment has none, as Docker does.
pub fn parse_build_args(raw: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in raw {
        match a.split_once('=') {
            Some(("", _)) => bail!("invalid --build-arg {a:?}: the name is empty"),
            Some((k, v)) => {
                out.insert(k.to_string(), v.to_string());
            }
            None => {
                if let Ok(v) = std::env::var(a) {
                    out.insert(a.clone(), v);
                }
            }
        }
    }
    Ok(out)
}

/// Parses `--platform` values; none means this machine's platform.
pub fn parse_platforms(raw: &[String]) -> Result<Vec<Platform>> {
    if raw.is_empty() {
        return Ok(vec![Platform::host()]);
    }
    let mut out: Vec<Platform> = Vec::new();
    for p in raw {
        let p: Platform = p.trim().parse().map_err(|e| anyhow!("--platform: {e}"))?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

pub fn run(args: PlanArgs) -> Result<()> {
    let (name, source) =
        read_dockerfile(&args.dockerfile.context, args.dockerfile.file.as_deref())?;
    let df = Dockerfile::parse(&source).map_err(|e| anyhow!(e.render(&name, &source)))?;
    for w in &df.ast.warnings {
        eprintln!("warning: {name}:{}: {}", w.line, w.message);
    }
    if let Some(note) = df.frontend_note() {
        eprintln!("note: {note}");
    }
    let opts = BuildOptions {
        build_args: parse_build_args(&args.dockerfile.build_args)?,
        target: args.dockerfile.target,
    };
    let platforms = parse_platforms(&args.dockerfile.platforms)?;
    let mut plan = dag::plan(&df, &opts, &Platform::host(), &platforms)
        .map_err(|e| anyhow!(e.render(&name, &source)))?;
    let emulation: Emulation = args
        .dockerfile
        .emulation
        .parse()
        .map_err(|e: String| anyhow!("--emulation: {e}"))?;
    // A plan answers for every stage: those no worker runs are marked, not refused.
    place_all(&mut plan, &[crate::build::local_worker()], emulation);
    match args.format {
        Format::Text => print!("{}", plan.to_text()),
        Format::Json => println!("{}", plan.to_json()),
        Format::Dot => print!("{}", plan.to_dot()),
    }
    Ok(())
}
