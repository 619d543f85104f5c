//! Stages with their arguments resolved, for one target platform.
//!
//! BuildKit's rules, reproduced here:
//! - global `ARG`s (before the first `FROM`) are evaluated in order, a `--build-arg` overriding
//!   a default; they are visible in `FROM` lines only, and inside a stage only once it
//!   re-declares them with a bare `ARG NAME`;
//! - the automatic platform arguments (`BUILDPLATFORM`, `BUILDOS`, `BUILDARCH`, `BUILDVARIANT`,
//!   `TARGETPLATFORM`, `TARGETOS`, `TARGETARCH`, `TARGETVARIANT`) are global arguments too;
//! - a `FROM` names an earlier stage by its (lower-case) name, `scratch`, or else an image;
//! - `COPY --from` names a stage by name (any case) or index, or else an image; `RUN --mount
//!   from=` names a stage by name, or else an image; neither is ever expanded;
//! - the default target is the last stage; stage names are matched case-insensitively;
//! - a stage that depends on itself through any chain is an error; a reachable stage that uses
//!   a later stage is an error.
//!
//! [`Scope`] then walks a stage's instructions with BuildKit's expansion rules: which
//! instructions expand their words (ENV, LABEL, ADD, COPY, WORKDIR, USER, VOLUME, STOPSIGNAL,
//! EXPOSE, ARG defaults, mount options) and which leave them to the shell at run time (RUN,
//! CMD, ENTRYPOINT, SHELL, HEALTHCHECK).

use std::collections::{BTreeMap, BTreeSet};

use super::instructions::{Command, Instruction, Mount, SourceContent};
use super::shell::{Env, Lexer};
use super::{Dockerfile, FrontendError, Range, suggest};
use crate::platform::Platform;
use crate::reference::ImageRef;

/// What a build is asked for, apart from the platforms.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct BuildOptions {
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--target`; the last stage when `None`.
    pub target: Option<String>,
}

/// An ordered list of variables; setting one that exists replaces it in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvList(Vec<(String, String)>);

impl EnvList {
    pub fn set(&mut self, key: &str, value: &str) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => self.0.push((key.to_string(), value.to_string())),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }

    /// Reads `KEY=value` strings (an image config's `Env`); an entry without `=` is a key with
    /// an empty value.
    pub fn from_strings<S: AsRef<str>>(entries: &[S]) -> Self {
        let mut env = EnvList::default();
        for e in entries {
            let (k, v) = e.as_ref().split_once('=').unwrap_or((e.as_ref(), ""));
            env.set(k, v);
        }
        env
    }

    /// The pairs, in order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    /// `KEY=value` strings, as an image config or a process environment wants them.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}

impl Env for EnvList {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The platform arguments BuildKit defines for every build.
pub fn platform_args(build: &Platform, target: &Platform) -> EnvList {
    let mut env = EnvList::default();
    for (prefix, p) in [("BUILD", build), ("TARGET", target)] {
        env.set(&format!("{prefix}PLATFORM"), &p.to_string());
        env.set(&format!("{prefix}OS"), &p.os);
        env.set(&format!("{prefix}ARCH"), &p.architecture);
        env.set(&format!("{prefix}VARIANT"), &p.variant);
    }
    env
}

/// Names of the automatic target-platform arguments.
pub const TARGET_ARGS: [&str; 4] = ["TARGETPLATFORM", "TARGETOS", "TARGETARCH", "TARGETVARIANT"];

/// Where a stage, a `COPY --from` or a mount takes its files from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// An earlier (or, in error, later) stage, by index.
    Stage(usize),
    /// An image from a registry.
    Image(ImageRef),
    /// The empty filesystem.
    Scratch,
}

/// How a stage uses another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DependencyKind {
    From,
    CopyFrom,
    MountFrom,
}

/// One use of another stage or an image by a stage's instructions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub source: Source,
    pub kind: DependencyKind,
    pub range: Range,
}

/// A stage after argument resolution for one target platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedStage {
    pub index: usize,
    /// `AS` name, lower case.
    pub name: Option<String>,
    /// The expanded `FROM` argument.
    pub base_name: String,
    pub base: Source,
    /// The platform the stage runs for: its `--platform`, or the target platform.
    pub platform: Platform,
    /// Whether `--platform` set it.
    pub explicit_platform: bool,
    /// `COPY --from` and `RUN --mount from=` uses, in order.
    pub uses: Vec<Dependency>,
    /// The arguments the stage declares, with the values they take.
    pub args: Vec<(String, Option<String>)>,
    /// Steps BuildKit would number `[n/m]`: pulling the base image, and each ADD, COPY, RUN
    /// and WORKDIR.
    pub steps: usize,
    /// Whether it runs a command (a RUN): only then does it need a worker that executes its
    /// platform. Copying files and pulling an image work for any platform.
    pub executes: bool,
    pub range: Range,
}

impl ResolvedStage {
    /// The name progress output uses: the `AS` name or `stage-N`.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", self.index))
    }

    /// Every stage or image this stage needs, its base first.
    pub fn dependencies(&self) -> impl Iterator<Item = &Source> {
        std::iter::once(&self.base).chain(self.uses.iter().map(|d| &d.source))
    }
}

/// A Dockerfile resolved for one target platform.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub target_platform: Platform,
    pub build_platform: Platform,
    /// Global arguments (platform arguments included) after `--build-arg` overrides.
    pub global_args: EnvList,
    pub stages: Vec<ResolvedStage>,
    /// Index of the target stage.
    pub target: usize,
}

impl Resolution {
    /// Indices of the stages the target needs, the target included, in Dockerfile order.
    pub fn reachable(&self) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![self.target];
        while let Some(i) = todo.pop() {
            if !seen.insert(i) {
                continue;
            }
            for s in self.stages[i].dependencies() {
                if let Source::Stage(j) = s {
                    todo.push(*j);
                }
            }
        }
        seen
    }
}

/// Resolves stages, arguments and references for one target platform.
pub fn resolve(
    df: &Dockerfile,
    opts: &BuildOptions,
    build_platform: &Platform,
    target_platform: &Platform,
) -> Result<Resolution, FrontendError> {
    let lexer = Lexer::new(df.ast.escape);
    let mut global = platform_args(build_platform, target_platform);
    for (defs, range) in &df.parsed.meta_args {
        for def in defs {
            let value = match (opts.build_args.get(&def.key), &def.default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(d)) => Some(
                    lexer
                        .process_word(d, &global)
                        .map_err(|e| FrontendError::at(*range, e.to_string()))?,
                ),
                (None, None) => None,
            };
            if let Some(v) = value {
                global.set(&def.key, &v);
            }
        }
    }

    let stage_defs = &df.parsed.stages;
    let mut stages: Vec<ResolvedStage> = Vec::with_capacity(stage_defs.len());
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    for (index, st) in stage_defs.iter().enumerate() {
        let at = |m: String| FrontendError::at(st.range, m);
        let expanded = lexer
            .process_word_with_matches(&st.base, &global)
            .map_err(|e| at(e.to_string()))?;
        let base_name = expanded.result;
        if base_name.is_empty() {
            return Err(at(format!(
                "base name ({}) should not be blank{}",
                st.base,
                undefined_hint(&expanded.unmatched)
            )));
        }
        let base = match by_name.get(&base_name) {
            Some(&i) => Source::Stage(i),
            None if base_name == "scratch" => Source::Scratch,
            None => Source::Image(ImageRef::parse(&base_name).map_err(|e| {
                let stage_hint = by_name
                    .keys()
                    .find(|n| n.eq_ignore_ascii_case(&base_name))
                    .map(|n| format!(" (stage names are lower case: did you mean {n:?}?)"))
                    .unwrap_or_default();
                at(format!(
                    "base name {:?}: {e}{}{stage_hint}",
                    st.base,
                    undefined_hint(&expanded.unmatched)
                ))
            })?),
        };
        let (platform, explicit_platform) = match &st.platform {
            None => match &base {
                Source::Stage(i) => (stages[*i].platform.clone(), stages[*i].explicit_platform),
                _ => (target_platform.clone(), false),
            },
            Some(expr) => {
                let p = lexer
                    .process_word_with_matches(expr, &global)
                    .map_err(|e| {
                        at(format!(
                            "failed to process arguments for platform {expr}: {e}"
                        ))
                    })?;
                if p.result.is_empty() {
                    return Err(at(format!(
                        "empty platform value from expression {expr}{}",
                        undefined_hint(&p.unmatched)
                    )));
                }
                let parsed: Platform = p
                    .result
                    .parse()
                    .map_err(|e| at(format!("failed to parse platform {expr}: {e}")))?;
                (parsed, true)
            }
        };
        let steps = usize::from(matches!(base, Source::Image(_)))
            + st.commands
                .iter()
                .filter(|c| {
                    matches!(
                        c.command,
                        Command::Add(_) | Command::Copy(_) | Command::Run(_) | Command::Workdir(_)
                    )
                })
                .count();
        let executes = st
            .commands
            .iter()
            .any(|c| matches!(c.command, Command::Run(_)));
        stages.push(ResolvedStage {
            index,
            name: st.name.clone(),
            base_name,
            base,
            platform,
            explicit_platform,
            uses: Vec::new(),
            args: Vec::new(),
            steps,
            executes,
            range: st.range,
        });
        if let Some(n) = &st.name {
            by_name.insert(n.clone(), index);
        }
    }

    // References from instructions see every stage, earlier or later.
    for (index, st) in stage_defs.iter().enumerate() {
        let mut uses = Vec::new();
        for ins in &st.commands {
            match &ins.command {
                Command::Copy(c) => {
                    if let Some(from) = &c.from {
                        let source = match from.parse::<usize>() {
                            Ok(i) if i < stage_defs.len() => Source::Stage(i),
                            Ok(i) => {
                                return Err(FrontendError::at(
                                    ins.range,
                                    format!(
                                        "invalid stage index {i}: the Dockerfile has {} stages",
                                        stage_defs.len()
                                    ),
                                ));
                            }
                            Err(_) => named_source(from, &by_name, ins.range)?,
                        };
                        uses.push(Dependency {
                            source,
                            kind: DependencyKind::CopyFrom,
                            range: ins.range,
                        });
                    }
                }
                Command::Run(r) => {
                    for m in &r.mounts {
                        if let Some(from) = &m.from {
                            uses.push(Dependency {
                                source: named_source(from, &by_name, ins.range)?,
                                kind: DependencyKind::MountFrom,
                                range: ins.range,
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        stages[index].uses = uses;
    }

    check_cycles(&stages)?;

    let target = match &opts.target {
        None => stages.len() - 1,
        Some(t) => *by_name.get(&t.to_lowercase()).ok_or_else(|| {
            let names: Vec<&str> = by_name.keys().map(String::as_str).collect();
            let hint = suggest(t, names.iter().copied())
                .map(|s| format!(" (did you mean {s:?}?)"))
                .unwrap_or_default();
            let list = if names.is_empty() {
                "the Dockerfile names no stages".to_string()
            } else {
                format!("stages: {}", names.join(", "))
            };
            FrontendError::new(format!(
                "target stage {t:?} could not be found{hint}; {list}"
            ))
        })?,
    };

    let mut resolution = Resolution {
        target_platform: target_platform.clone(),
        build_platform: build_platform.clone(),
        global_args: global,
        stages,
        target,
    };

    let reachable = resolution.reachable();
    for &i in &reachable {
        for dep in &resolution.stages[i].uses {
            if let Source::Stage(j) = dep.source
                && j > i
            {
                let verb = if dep.kind == DependencyKind::MountFrom {
                    "mount from"
                } else {
                    "copy from"
                };
                return Err(FrontendError::at(
                    dep.range,
                    format!(
                        "cannot {verb} stage {:?}, it needs to be defined before current stage {:?}",
                        resolution.stages[j].display_name(),
                        resolution.stages[i].display_name()
                    ),
                ));
            }
        }
    }

    // Declared arguments of the stages that run, for everything that keys on them. A child
    // stage starts from its parent's scope.
    let mut scopes: BTreeMap<usize, Scope> = BTreeMap::new();
    for &i in &reachable {
        let mut scope = match resolution.stages[i].base {
            Source::Stage(p) => scopes.get(&p).cloned().ok_or_else(|| {
                FrontendError::at(stage_defs[i].range, "base stage is not resolved")
            })?,
            _ => Scope::new(&resolution, opts, df.ast.escape, &EnvList::default()),
        };
        for ins in &stage_defs[i].commands {
            if matches!(ins.command, Command::Arg(_) | Command::Env(_)) {
                scope
                    .apply(ins)
                    .map_err(|m| FrontendError::at(ins.range, m))?;
            }
        }
        resolution.stages[i].args = scope.declared.clone();
        scopes.insert(i, scope);
    }
    Ok(resolution)
}

fn undefined_hint(unmatched: &BTreeSet<String>) -> String {
    if unmatched.is_empty() {
        return String::new();
    }
    let names: Vec<String> = unmatched.iter().map(|n| format!("${n}")).collect();
    let verb = if names.len() == 1 { "is" } else { "are" };
    format!(
        " ({} {verb} not defined: declare it with ARG before the first FROM, or pass --build-arg)",
        names.join(", ")
    )
}

fn named_source(
    name: &str,
    by_name: &BTreeMap<String, usize>,
    range: Range,
) -> Result<Source, FrontendError> {
    if let Some(&i) = by_name.get(&name.to_lowercase()) {
        return Ok(Source::Stage(i));
    }
    if name == "scratch" {
        return Ok(Source::Scratch);
    }
    ImageRef::parse(name).map(Source::Image).map_err(|e| {
        let hint = suggest(name, by_name.keys().map(String::as_str))
            .map(|s| format!(" (did you mean stage {s:?}?)"))
            .unwrap_or_default();
        FrontendError::at(
            range,
            format!("{name:?} is neither a stage of this Dockerfile nor an image: {e}{hint}"),
        )
    })
}

/// Fails when a stage depends on itself through any chain of FROM, COPY --from and mounts,
/// naming the stages of the cycle.
fn check_cycles(stages: &[ResolvedStage]) -> Result<(), FrontendError> {
    use petgraph::algo::tarjan_scc;
    use petgraph::graph::DiGraph;

    let mut g = DiGraph::<usize, Range>::with_capacity(stages.len(), stages.len());
    let nodes: Vec<_> = (0..stages.len()).map(|i| g.add_node(i)).collect();
    for s in stages {
        for (source, range) in
            std::iter::once((&s.base, s.range)).chain(s.uses.iter().map(|d| (&d.source, d.range)))
        {
            if let Source::Stage(j) = source {
                g.add_edge(nodes[s.index], nodes[*j], range);
            }
        }
    }
    for scc in tarjan_scc(&g) {
        let cyclic = scc.len() > 1 || g.contains_edge(scc[0], scc[0]);
        if !cyclic {
            continue;
        }
        let mut members: Vec<usize> = scc.iter().map(|n| g[*n]).collect();
        members.sort_unstable();
        let names: Vec<String> = members.iter().map(|&i| stages[i].display_name()).collect();
        let first = members[0];
        let range = g
            .edges(nodes[first])
            .find(|e| members.contains(&g[petgraph::visit::EdgeRef::target(e)]))
            .map_or(stages[first].range, |e| *e.weight());
        let mut chain = names.join(" -> ");
        chain.push_str(&format!(" -> {}", names[0]));
        return Err(FrontendError::at(
            range,
            format!(
                "circular dependency detected on stage: {} ({chain})",
                names[0]
            ),
        ));
    }
    Ok(())
}

/// What is in scope while a stage's instructions run: the environment (image ENV, stage ENV
/// and ARG values), and the build arguments declared so far.
#[derive(Debug, Clone)]
pub struct Scope {
    lexer: Lexer,
    global: EnvList,
    build_args: BTreeMap<String, String>,
    /// The environment commands run with and words expand against.
    pub env: EnvList,
    /// The environment the image config records (ENV only, never ARG).
    pub image_env: EnvList,
    /// ARGs declared in this stage and the stages it is built on, in order, with values.
    pub declared: Vec<(String, Option<String>)>,
}

impl Scope {
    /// The scope at the start of a stage built on an image whose config has `image_env`.
    /// A stage built on another stage starts from a clone of that stage's final scope.
    pub fn new(res: &Resolution, opts: &BuildOptions, escape: char, image_env: &EnvList) -> Self {
        Scope {
            lexer: Lexer::new(escape),
            global: res.global_args.clone(),
            build_args: opts.build_args.clone(),
            env: image_env.clone(),
            image_env: image_env.clone(),
            declared: Vec::new(),
        }
    }

    /// The scope a stage built on another stage starts with: the parent's environment and
    /// declared arguments, and the parent's image config environment.
    pub fn inherit(
        res: &Resolution,
        opts: &BuildOptions,
        escape: char,
        image_env: &EnvList,
        env: EnvList,
        declared: Vec<(String, Option<String>)>,
    ) -> Self {
        let mut scope = Scope::new(res, opts, escape, image_env);
        scope.env = env;
        scope.declared = declared;
        scope
    }

    fn word(&self, w: &str) -> Result<String, String> {
        self.lexer
            .process_word(w, &self.env)
            .map_err(|e| e.to_string())
    }

    fn opt_word(&self, w: &Option<String>) -> Result<Option<String>, String> {
        w.as_deref().map(|w| self.word(w)).transpose()
    }

    /// Expands an instruction's words as BuildKit does, against the scope before it.
    pub fn expand(&self, ins: &Instruction) -> Result<Command, String> {
        let mut cmd = ins.command.clone();
        match &mut cmd {
            Command::Env(kvs) | Command::Label(kvs) => {
                for kv in kvs.iter_mut() {
                    kv.key = self.word(&kv.key)?;
                    kv.value = self.word(&kv.value)?;
                }
            }
            Command::Add(a) => {
                for s in a.paths.sources.iter_mut() {
                    *s = self.word(s)?;
                }
                a.paths.dest = self.word(&a.paths.dest)?;
                self.expand_contents(&mut a.paths.contents)?;
                a.chown = self.opt_word(&a.chown)?;
                a.chmod = self.opt_word(&a.chmod)?;
                a.checksum = self.opt_word(&a.checksum)?;
                for e in a.exclude.iter_mut() {
                    *e = self.word(e)?;
                }
            }
            Command::Copy(c) => {
                for s in c.paths.sources.iter_mut() {
                    *s = self.word(s)?;
                }
                c.paths.dest = self.word(&c.paths.dest)?;
                self.expand_contents(&mut c.paths.contents)?;
                c.chown = self.opt_word(&c.chown)?;
                c.chmod = self.opt_word(&c.chmod)?;
                for e in c.exclude.iter_mut() {
                    *e = self.word(e)?;
                }
            }
            Command::Run(r) => {
                for m in r.mounts.iter_mut() {
                    self.expand_mount(m)?;
                }
            }
            Command::Workdir(p) | Command::User(p) | Command::StopSignal(p) => *p = self.word(p)?,
            Command::Volume(vs) => {
                for v in vs.iter_mut() {
                    *v = self.word(v)?;
                }
            }
            Command::Expose(ports) => {
                let mut out = Vec::new();
                for p in ports.iter() {
                    out.extend(
                        self.lexer
                            .process_words(p, &self.env)
                            .map_err(|e| e.to_string())?,
                    );
                }
                *ports = out;
            }
            Command::Arg(defs) => {
                for d in defs.iter_mut() {
                    if self.build_args.contains_key(&d.key) {
                        continue;
                    }
                    d.default = self.opt_word(&d.default)?;
                }
            }
            Command::Cmd(_)
            | Command::Entrypoint(_)
            | Command::Healthcheck(_)
            | Command::Maintainer(_)
            | Command::Onbuild(_)
            | Command::Shell(_) => {}
        }
        Ok(cmd)
    }

    fn expand_contents(&self, contents: &mut [SourceContent]) -> Result<(), String> {
        let mut raw = Lexer::new('\\');
        raw.skip_process_quotes = true;
        for c in contents.iter_mut().filter(|c| c.expand) {
            c.data = raw
                .process_word(&c.data, &self.env)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn expand_mount(&self, m: &mut Mount) -> Result<(), String> {
        if let Some(raw) = m.deferred.take() {
            *m = crate::dockerfile::instructions::expand_deferred_mount(&raw, |v| self.word(v))?;
            return Ok(());
        }
        m.source = self.opt_word(&m.source)?;
        m.target = self.opt_word(&m.target)?;
        m.id = self.opt_word(&m.id)?;
        m.env = self.opt_word(&m.env)?;
        Ok(())
    }

    /// Expands an instruction and applies its effect on the scope (ENV and ARG). Returns the
    /// expanded command.
    pub fn apply(&mut self, ins: &Instruction) -> Result<Command, String> {
        let cmd = self.expand(ins)?;
        match &cmd {
            Command::Env(kvs) => {
                for kv in kvs {
                    self.env.set(&kv.key, &kv.value);
                    self.image_env.set(&kv.key, &kv.value);
                }
            }
            Command::Arg(defs) => {
                for d in defs {
                    let value = match (self.build_args.get(&d.key), &d.default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(v)) => Some(v.clone()),
                        (None, None) => self.global.get(&d.key).map(str::to_string),
                    };
                    if let Some(v) = &value {
                        self.env.set(&d.key, v);
                    }
                    self.declared.retain(|(k, _)| k != &d.key);
                    self.declared.push((d.key.clone(), value));
                }
            }
            _ => {}
        }
        Ok(cmd)
    }
}

/// Every instruction of the stages that run, expanded in its scope, stage by stage (stages
/// the target does not need are left out). Base images' environments are taken as empty.
pub fn expanded_stages(
    df: &Dockerfile,
    res: &Resolution,
    opts: &BuildOptions,
) -> Result<BTreeMap<usize, Vec<Command>>, FrontendError> {
    let mut scopes: BTreeMap<usize, Scope> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for i in res.reachable() {
        let stage = &df.parsed.stages[i];
        let mut scope = match res.stages[i].base {
            Source::Stage(p) => scopes
                .get(&p)
                .cloned()
                .ok_or_else(|| FrontendError::at(stage.range, "base stage is not resolved"))?,
            _ => Scope::new(res, opts, df.ast.escape, &EnvList::default()),
        };
        let cmds = stage
            .commands
            .iter()
            .map(|ins| {
                scope
                    .apply(ins)
                    .map_err(|m| FrontendError::at(ins.range, m))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.insert(i, cmds);
        scopes.insert(i, scope);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(
        src: &str,
        args: &[(&str, &str)],
        target: Option<&str>,
    ) -> Result<Resolution, FrontendError> {
        let df = Dockerfile::parse(src)?;
        let opts = BuildOptions {
            build_args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            target: target.map(str::to_string),
        };
        let amd: Platform = "linux/amd64".parse().unwrap();
        let arm: Platform = "linux/arm64".parse().unwrap();
        resolve(&df, &opts, &amd, &arm)
    }

    #[test]
    fn global_args_in_from() {
        let r = res(
            "ARG V=1.36\nARG IMG=busybox:$V\nFROM $IMG AS a\n",
            &[],
            None,
        )
        .unwrap();
        assert_eq!(r.stages[0].base_name, "busybox:1.36");
        let r = res(
            "ARG V=1.36\nARG IMG=busybox:$V\nFROM $IMG\n",
            &[("V", "9")],
            None,
        )
        .unwrap();
        assert_eq!(r.stages[0].base_name, "busybox:9");
        let r = res("ARG IMG=busybox\nFROM $IMG\n", &[("IMG", "alpine")], None).unwrap();
        assert_eq!(r.stages[0].base_name, "alpine");
    }

    #[test]
    fn undefined_variable_in_from_is_named() {
        let e = res("FROM $NOPE\n", &[], None).unwrap_err();
        assert!(e.message.contains("$NOPE is not defined"), "{e}");
        assert!(e.message.contains("should not be blank"), "{e}");
    }

    #[test]
    fn platform_args() {
        let r = res(
            "FROM --platform=$BUILDPLATFORM busybox AS b\nFROM busybox-$TARGETARCH\n",
            &[],
            None,
        )
        .unwrap();
        assert_eq!(r.stages[0].platform.to_string(), "linux/amd64");
        assert!(r.stages[0].explicit_platform);
        assert_eq!(r.stages[1].base_name, "busybox-arm64");
        assert_eq!(r.stages[1].platform.to_string(), "linux/arm64");
    }

    #[test]
    fn stage_args_scoping() {
        let src = "ARG G=global\nFROM busybox AS a\nARG G\nARG L=$G-local\nARG TARGETARCH\nARG X\n";
        let r = res(src, &[], None).unwrap();
        assert_eq!(
            r.stages[0].args,
            vec![
                ("G".into(), Some("global".into())),
                ("L".into(), Some("global-local".into())),
                ("TARGETARCH".into(), Some("arm64".into())),
                ("X".into(), None),
            ]
        );
        let r = res(src, &[("L", "cli"), ("X", "x")], None).unwrap();
        assert_eq!(r.stages[0].args[1].1.as_deref(), Some("cli"));
        assert_eq!(r.stages[0].args[3].1.as_deref(), Some("x"));
        // A global ARG is not visible in a stage that does not re-declare it.
        let df = Dockerfile::parse("ARG G=g\nFROM busybox\nENV A=$G\n").unwrap();
        let opts = BuildOptions::default();
        let p = Platform::host();
        let r = resolve(&df, &opts, &p, &p).unwrap();
        let cmds = &expanded_stages(&df, &r, &opts).unwrap()[&0];
        let Command::Env(kv) = &cmds[0] else { panic!() };
        assert_eq!(kv[0].value, "");
    }

    #[test]
    fn env_expansion_uses_previous_values() {
        let df =
            Dockerfile::parse("FROM busybox\nENV a=1\nENV a=2 b=$a\nWORKDIR /x/$b\nRUN echo $a\n")
                .unwrap();
        let opts = BuildOptions::default();
        let p = Platform::host();
        let r = resolve(&df, &opts, &p, &p).unwrap();
        let cmds = &expanded_stages(&df, &r, &opts).unwrap()[&0];
        let Command::Env(kv) = &cmds[1] else { panic!() };
        assert_eq!(kv[1].value, "1");
        assert_eq!(cmds[2], Command::Workdir("/x/1".into()));
        let Command::Run(run) = &cmds[3] else {
            panic!()
        };
        assert_eq!(run.command.args, vec!["echo $a"]);
    }

    fn expand_all(src: &str, args: &[(&str, &str)]) -> BTreeMap<usize, Vec<Command>> {
        let df = Dockerfile::parse(src).unwrap();
        let opts = BuildOptions {
            build_args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            target: None,
        };
        let p = Platform::host();
        let r = resolve(&df, &opts, &p, &p).unwrap();
        expanded_stages(&df, &r, &opts).unwrap()
    }

    #[test]
    fn which_instructions_expand() {
        let src = r#"FROM busybox
ARG V=1
ENV D=/data U=app
LABEL "k$V"="v $V" plain=$D
COPY --chown=$U:$U --chmod=$V$V$V src$V/ $D/xy
ADD --checksum=sha256:$V http://example.com/f$V $D/
WORKDIR $D/w
USER $U
VOLUME $D/vol
STOPSIGNAL SIG$V
EXPOSE $V-2/tcp 80
RUN --mount=type=cache,target=$D/cache,id=c$V echo $V
CMD echo $V
ENTRYPOINT ["echo", "$V"]
HEALTHCHECK CMD echo $V
SHELL ["/bin/sh", "-c$V"]
ONBUILD RUN echo $V
COPY <<EOF <<'RAW' /dst/
value $V "quoted"
EOF
value $V
RAW
"#;
        let cmds = &expand_all(src, &[])[&0];
        let Command::Label(l) = &cmds[2] else {
            panic!()
        };
        assert_eq!((l[0].key.as_str(), l[0].value.as_str()), ("k1", "v 1"));
        assert_eq!(l[1].value, "/data");
        let Command::Copy(c) = &cmds[3] else { panic!() };
        assert_eq!(c.chown.as_deref(), Some("app:app"));
        assert_eq!(c.chmod.as_deref(), Some("111"));
        assert_eq!(c.paths.sources, vec!["src1/"]);
        assert_eq!(c.paths.dest, "/data/xy");
        let Command::Add(a) = &cmds[4] else { panic!() };
        assert_eq!(a.checksum.as_deref(), Some("sha256:1"));
        assert_eq!(a.paths.sources, vec!["http://example.com/f1"]);
        assert_eq!(cmds[5], Command::Workdir("/data/w".into()));
        assert_eq!(cmds[6], Command::User("app".into()));
        assert_eq!(cmds[7], Command::Volume(vec!["/data/vol".into()]));
        assert_eq!(cmds[8], Command::StopSignal("SIG1".into()));
        assert_eq!(
            cmds[9],
            Command::Expose(vec!["1-2/tcp".into(), "80".into()])
        );
        let Command::Run(r) = &cmds[10] else { panic!() };
        assert_eq!(r.mounts[0].target.as_deref(), Some("/data/cache"));
        assert_eq!(r.mounts[0].id.as_deref(), Some("c1"));
        assert_eq!(r.command.args, vec!["echo $V"], "RUN is left to the shell");
        let Command::Cmd(c) = &cmds[11] else { panic!() };
        assert_eq!(c.args, vec!["echo $V"]);
        let Command::Entrypoint(e) = &cmds[12] else {
            panic!()
        };
        assert_eq!(e.args, vec!["echo", "$V"]);
        let Command::Healthcheck(h) = &cmds[13] else {
            panic!()
        };
        assert_eq!(h.test, vec!["CMD-SHELL", "echo $V"]);
        assert_eq!(
            cmds[14],
            Command::Shell(vec!["/bin/sh".into(), "-c$V".into()])
        );
        assert_eq!(cmds[15], Command::Onbuild("RUN echo $V".into()));
        let Command::Copy(c) = &cmds[16] else {
            panic!()
        };
        assert_eq!(c.paths.contents[0].data, "value 1 \"quoted\"\n");
        assert_eq!(c.paths.contents[1].data, "value $V\n");
    }

    #[test]
    fn child_stage_inherits_env_and_args() {
        let src = "FROM busybox AS parent\nARG A=from-parent\nENV E=env-$A\nFROM parent\nARG B=$E+$A\nWORKDIR /$B\n";
        let all = expand_all(src, &[]);
        assert_eq!(
            all[&1][1],
            Command::Workdir("/env-from-parent+from-parent".into())
        );
        let all = expand_all(src, &[("A", "cli")]);
        assert_eq!(all[&1][1], Command::Workdir("/env-cli+cli".into()));
    }

    #[test]
    fn references() {
        let src = "FROM busybox AS Build\nFROM build AS two\nCOPY --from=BUILD /a /b\nCOPY --from=0 /a /b\nCOPY --from=alpine:3 /a /b\nRUN --mount=from=build,target=/x true\n";
        let r = res(src, &[], None).unwrap();
        assert_eq!(r.stages[1].base, Source::Stage(0));
        let kinds: Vec<_> = r.stages[1].uses.iter().map(|d| d.source.clone()).collect();
        assert_eq!(kinds[0], Source::Stage(0));
        assert_eq!(kinds[1], Source::Stage(0));
        assert!(matches!(kinds[2], Source::Image(_)));
        assert_eq!(kinds[3], Source::Stage(0));
    }

    #[test]
    fn target_errors_list_stages() {
        let e = res("FROM a AS one\nFROM b AS two\n", &[], Some("thre")).unwrap_err();
        assert!(e.message.contains("could not be found"), "{e}");
        assert!(e.message.contains("stages: one, two"), "{e}");
        assert!(res("FROM a AS one\nFROM b AS two\n", &[], Some("ONE")).is_ok());
    }

    #[test]
    fn cycles_and_forward_references() {
        let e = res(
            "FROM a AS x\nCOPY --from=y / /\nFROM b AS y\nCOPY --from=x / /\n",
            &[],
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("circular dependency"), "{e}");
        assert!(e.message.contains("x -> y -> x"), "{e}");
        let e = res(
            "FROM a AS x\nCOPY --from=y / /\nFROM b AS y\nFROM c\nCOPY --from=x / /\n",
            &[],
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("needs to be defined before"), "{e}");
        // Unreachable forward references are not built, so not an error.
        assert!(res("FROM a AS x\nCOPY --from=y / /\nFROM b AS y\n", &[], None).is_ok());
        let e = res("FROM a\nCOPY --from=5 / /\n", &[], None).unwrap_err();
        assert!(e.message.contains("invalid stage index 5"), "{e}");
    }

    /// BuildKit's `testMountTypeVariable`-style case: a mount whose type is a variable is
    /// parsed once the variable is known, every field expanded.
    #[test]
    fn mount_types_may_be_variables() {
        let src = "FROM a AS src\nFROM b\nARG MNT_TYPE=cache\nARG T=/c\n\
                   RUN --mount=type=$MNT_TYPE,id=my-$MNT_TYPE,target=$T,from=src make\n";
        let cmds = &expand_all(src, &[])[&1];
        let Command::Run(r) = &cmds[2] else {
            panic!("{cmds:?}")
        };
        let m = &r.mounts[0];
        assert_eq!(m.kind, crate::dockerfile::instructions::MountType::Cache);
        assert_eq!(m.id.as_deref(), Some("my-cache"));
        assert_eq!(m.target.as_deref(), Some("/c"));
        assert_eq!(m.from.as_deref(), Some("src"));
        assert!(m.deferred.is_none());
        // The stage graph sees the mount's source before the type is known.
        let r = res(src, &[], None).unwrap();
        assert_eq!(r.stages[1].uses.len(), 1);
        // An unknown type is still refused, with the suggestion, once known.
        let df = Dockerfile::parse(
            "FROM b\nARG MNT_TYPE=tmp\nRUN --mount=type=$MNT_TYPE,target=/t true\n",
        )
        .unwrap();
        let p = Platform::host();
        let opts = BuildOptions::default();
        let r = resolve(&df, &opts, &p, &p).unwrap();
        let err = expanded_stages(&df, &r, &opts).unwrap_err();
        assert!(
            err.message
                .contains("unsupported mount type \"tmp\" (did you mean tmpfs?)"),
            "{err}"
        );
    }

    #[test]
    fn from_names_only_earlier_stages() {
        // A later stage's name in FROM is an image reference.
        let r = res("FROM later AS first\nFROM busybox AS later\n", &[], None).unwrap();
        assert!(matches!(r.stages[0].base, Source::Image(_)));
        let e = res("FROM busybox AS builder\nFROM Builder\n", &[], None).unwrap_err();
        assert!(e.message.contains("did you mean \"builder\""), "{e}");
    }
}
