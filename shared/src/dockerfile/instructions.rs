//! Typed instructions: each AST [`Node`] given its meaning, with its flags checked.
//!
//! [`parse_stages`] groups the instructions into build stages (one per `FROM`) and collects
//! the global `ARG`s written before the first `FROM`. Nothing is expanded here: values keep
//! their quotes and `$VARIABLES` until a stage is evaluated with the arguments and environment
//! in scope (see [`super::stages`]).

use std::collections::BTreeMap;
use std::time::Duration;

use super::parser::{Ast, Node, Range, chomp_heredoc, parse_heredoc};
use super::{FrontendError, suggest};

/// All instruction keywords, upper case.
pub const KEYWORDS: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// A `key=value` pair of ENV or LABEL, unexpanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    /// Written in the legacy `KEY value` form.
    pub legacy: bool,
}

/// One name of an `ARG`, with its default if it has one (unexpanded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDef {
    pub key: String,
    pub default: Option<String>,
}

/// Sources and destination of COPY and ADD.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourcesAndDest {
    /// Source paths, globs or URLs (unexpanded).
    pub sources: Vec<String>,
    /// Inline files given as heredocs.
    pub contents: Vec<SourceContent>,
    /// Destination (unexpanded).
    pub dest: String,
}

/// A file written inline with a heredoc (`COPY <<EOF /dst`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceContent {
    /// The file name: the heredoc's delimiter.
    pub path: String,
    pub data: String,
    /// Whether `$VARIABLES` in the data are expanded.
    pub expand: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Copy {
    pub paths: SourcesAndDest,
    /// `--from`: a stage name, a stage index or an image reference. Never expanded.
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub parents: bool,
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Add {
    pub paths: SourcesAndDest,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub keep_git_dir: bool,
    pub checksum: Option<String>,
    pub exclude: Vec<String>,
    pub unpack: Option<bool>,
}

/// A command line for RUN, CMD or ENTRYPOINT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandLine {
    /// The JSON array, or the shell form's whole text as one element.
    pub args: Vec<String>,
    /// Shell form: the image's shell runs it.
    pub prepend_shell: bool,
}

/// A file given to RUN as a heredoc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineFile {
    pub name: String,
    pub data: String,
    pub chomp: bool,
}

/// The kinds of `RUN --mount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountType {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

impl MountType {
    pub fn as_str(self) -> &'static str {
        match self {
            MountType::Bind => "bind",
            MountType::Cache => "cache",
            MountType::Tmpfs => "tmpfs",
            MountType::Secret => "secret",
            MountType::Ssh => "ssh",
        }
    }
}

/// How concurrent builds share a cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    #[default]
    Shared,
    Private,
    Locked,
}

/// One `RUN --mount=...`, as written (values unexpanded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: MountType,
    /// Stage or image the mount's source comes from (bind and cache).
    pub from: Option<String>,
    pub source: Option<String>,
    pub target: Option<String>,
    pub readonly: bool,
    /// Cache id, or secret/ssh id.
    pub id: Option<String>,
    pub sharing: Sharing,
    pub required: bool,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Size limit of a tmpfs mount, in bytes.
    pub size: Option<u64>,
    /// Environment variable a secret is exposed as.
    pub env: Option<String>,
    /// The flag as written, when its `type` names a variable (`type=$MNT_TYPE`): what the
    /// type allows is only known once the variables are, so the whole flag is parsed again
    /// then ([`expand_deferred_mount`]). Until then only `from` is read (for the stage graph).
    pub deferred: Option<String>,
}

/// `RUN --network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    #[default]
    Default,
    None,
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Run {
    pub command: CommandLine,
    pub files: Vec<InlineFile>,
    pub mounts: Vec<Mount>,
    pub network: Network,
    /// `--security=insecure`.
    pub insecure: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", args...]` or `["CMD-SHELL", command]`.
    pub test: Vec<String>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub start_period: Option<Duration>,
    pub start_interval: Option<Duration>,
    pub retries: Option<u32>,
}

/// What an instruction inside a stage does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add(Add),
    Arg(Vec<ArgDef>),
    Cmd(CommandLine),
    Copy(Copy),
    Entrypoint(CommandLine),
    Env(Vec<KeyValue>),
    Expose(Vec<String>),
    Healthcheck(Healthcheck),
    Label(Vec<KeyValue>),
    Maintainer(String),
    /// The trigger instruction's text, for the image's `OnBuild` list.
    Onbuild(String),
    Run(Run),
    Shell(Vec<String>),
    StopSignal(String),
    User(String),
    Volume(Vec<String>),
    Workdir(String),
}

/// An instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub command: Command,
    /// The keyword as written.
    pub keyword: String,
    /// The logical source line (continuations joined).
    pub original: String,
    pub range: Range,
}

impl Instruction {
    /// The keyword in upper case (`RUN`).
    pub fn name(&self) -> String {
        self.keyword.to_ascii_uppercase()
    }
}

/// A `FROM` and the instructions after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// `AS name`, lower-cased.
    pub name: Option<String>,
    /// The image or stage it starts from, unexpanded.
    pub base: String,
    /// `--platform`, unexpanded.
    pub platform: Option<String>,
    pub range: Range,
    pub commands: Vec<Instruction>,
    /// The comment lines above the FROM.
    pub comment: Option<String>,
}

/// A Dockerfile's global arguments and stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The `ARG`s before the first `FROM`, with their lines.
    pub meta_args: Vec<(Vec<ArgDef>, Range)>,
    pub stages: Vec<Stage>,
}

/// Gives every node its meaning and groups them into stages.
pub fn parse_stages(ast: &Ast) -> Result<Parsed, FrontendError> {
    let mut meta_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for node in &ast.children {
        let range = Range::new(node.start_line, node.end_line);
        let at = |m: String| FrontendError::at(range, m);
        if node.command() == "from" {
            stages.push(parse_from(node).map_err(at)?);
            continue;
        }
        let command = parse_command(node).map_err(at)?;
        let instruction = Instruction {
            command,
            keyword: node.keyword.clone(),
            original: node.original.clone(),
            range,
        };
        match stages.last_mut() {
            Some(stage) => stage.commands.push(instruction),
            None => match instruction.command {
                Command::Arg(args) => meta_args.push((args, range)),
                _ => {
                    return Err(at(format!(
                        "{} instruction before the first FROM: only ARG may come before FROM",
                        instruction.keyword.to_ascii_uppercase()
                    )));
                }
            },
        }
    }
    if stages.is_empty() {
        let line = ast.children.last().map_or(1, |n| n.end_line);
        return Err(FrontendError::at(
            Range::line(line),
            "the Dockerfile has no FROM instruction: a build needs at least one stage",
        ));
    }
    Ok(Parsed { meta_args, stages })
}

/// Checks a stage name: a letter, then letters, digits, `-`, `_` and `.`.
pub fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

fn parse_from(node: &Node) -> Result<Stage, String> {
    let args = &node.args;
    let name = match args.len() {
        1 => None,
        3 if args[1].eq_ignore_ascii_case("as") => {
            let name = args[2].to_lowercase();
            if !valid_stage_name(&name) {
                return Err(format!(
                    "invalid name for build stage: {:?}, name can't start with a number or contain symbols",
                    args[2]
                ));
            }
            Some(name)
        }
        0 => {
            return Err(
                "FROM requires either one or three arguments: FROM <image> [AS <name>]".into(),
            );
        }
        _ => {
            return Err(format!(
                "FROM requires either one or three arguments, got {}: FROM <image> [AS <name>]",
                args.len()
            ));
        }
    };
    let mut flags = Flags::new(&node.flags, "FROM");
    let platform = flags.string("platform");
    flags.finish()?;
    Ok(Stage {
        name,
        base: args[0].clone(),
        platform: platform?,
        range: Range::new(node.start_line, node.end_line),
        commands: Vec::new(),
        comment: (!node.comments.is_empty()).then(|| node.comments.join("\n")),
    })
}

/// The meaning of one non-FROM node.
pub fn parse_command(node: &Node) -> Result<Command, String> {
    let name = node.keyword.to_ascii_uppercase();
    let args = node.flat_args();
    let mut flags = Flags::new(&node.flags, &name);
    let command = match name.as_str() {
        "ENV" | "LABEL" => {
            flags.finish()?;
            let pairs = key_values(&args, &name)?;
            if name == "ENV" {
                Command::Env(pairs)
            } else {
                Command::Label(pairs)
            }
        }
        "MAINTAINER" => {
            flags.finish()?;
            Command::Maintainer(exactly_one(args, &name)?)
        }
        "ADD" => {
            let chown = flags.string("chown");
            let chmod = flags.string("chmod");
            let link = flags.boolean("link");
            let keep_git_dir = flags.boolean("keep-git-dir");
            let checksum = flags.string("checksum");
            let exclude = flags.strings("exclude");
            let unpack = flags.boolean("unpack");
            let used_unpack = flags.used("unpack");
            flags.finish()?;
            Command::Add(Add {
                paths: sources_and_dest(node, &name)?,
                chown: chown?,
                chmod: chmod?,
                link: link?,
                keep_git_dir: keep_git_dir?,
                checksum: checksum?,
                exclude: exclude?,
                unpack: if used_unpack { Some(unpack?) } else { None },
            })
        }
        "COPY" => {
            let from = flags.string("from");
            let chown = flags.string("chown");
            let chmod = flags.string("chmod");
            let link = flags.boolean("link");
            let parents = flags.boolean("parents");
            let exclude = flags.strings("exclude");
            flags.finish()?;
            let from = from?;
            if from.as_deref() == Some("") {
                return Err("COPY --from requires a stage name, a stage index or an image".into());
            }
            Command::Copy(Copy {
                paths: sources_and_dest(node, &name)?,
                from,
                chown: chown?,
                chmod: chmod?,
                link: link?,
                parents: parents?,
                exclude: exclude?,
            })
        }
        "ONBUILD" => {
            flags.finish()?;
            let Some(sub) = &node.sub else {
                return Err("ONBUILD requires at least one argument".into());
            };
            match sub.keyword.to_ascii_uppercase().as_str() {
                "ONBUILD" => {
                    return Err("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into());
                }
                t @ ("MAINTAINER" | "FROM") => {
                    return Err(format!("{t} isn't allowed as an ONBUILD trigger"));
                }
                _ => {}
            }
            // The sub-instruction must itself be valid.
            parse_command(sub)?;
            let original = node.original.trim_start();
            let mut expression = original
                .get(..7)
                .filter(|k| k.eq_ignore_ascii_case("onbuild"))
                .map_or(original, |_| original[7..].trim_start())
                .to_string();
            // A trigger with heredocs keeps them: the child parses the whole instruction.
            for doc in &node.heredocs {
                if !expression.ends_with('\n') {
                    expression.push('\n');
                }
                expression.push_str(&doc.content);
                if !doc.content.is_empty() && !doc.content.ends_with('\n') {
                    expression.push('\n');
                }
                expression.push_str(&doc.name);
            }
            Command::Onbuild(expression)
        }
        "WORKDIR" => {
            flags.finish()?;
            Command::Workdir(exactly_one(args, &name)?)
        }
        "RUN" => {
            let mounts = flags.strings("mount");
            let network = flags.string("network");
            let security = flags.string("security");
            flags.finish()?;
            let mounts = mounts?
                .iter()
                .map(|m| parse_mount(m))
                .collect::<Result<Vec<_>, _>>()?;
            let network = match network?.as_deref() {
                None | Some("default") => Network::Default,
                Some("none") => Network::None,
                Some("host") => Network::Host,
                Some(other) => {
                    return Err(format!(
                        "unsupported network mode {other:?}: expected default, none or host"
                    ));
                }
            };
            let insecure = match security?.as_deref() {
                None | Some("sandbox") => false,
                Some("insecure") => true,
                Some(other) => {
                    return Err(format!(
                        "unsupported security mode {other:?}: expected sandbox or insecure"
                    ));
                }
            };
            Command::Run(Run {
                command: command_line(node),
                files: node
                    .heredocs
                    .iter()
                    .map(|h| InlineFile {
                        name: h.name.clone(),
                        data: h.content.clone(),
                        chomp: h.chomp,
                    })
                    .collect(),
                mounts,
                network,
                insecure,
            })
        }
        "CMD" => {
            flags.finish()?;
            Command::Cmd(command_line(node))
        }
        "ENTRYPOINT" => {
            flags.finish()?;
            Command::Entrypoint(command_line(node))
        }
        "HEALTHCHECK" => Command::Healthcheck(parse_healthcheck(node, &mut flags)?),
        "EXPOSE" => {
            flags.finish()?;
            if args.is_empty() {
                return Err(at_least_one(&name));
            }
            Command::Expose(args)
        }
        "USER" => {
            flags.finish()?;
            Command::User(exactly_one(args, &name)?)
        }
        "VOLUME" => {
            flags.finish()?;
            if args.is_empty() {
                return Err(at_least_one(&name));
            }
            let mut volumes = Vec::new();
            for v in args {
                let v = v.trim();
                if v.is_empty() {
                    return Err("VOLUME specified can not be an empty string".into());
                }
                volumes.push(v.to_string());
            }
            Command::Volume(volumes)
        }
        // BuildKit reads no flags for STOPSIGNAL and ARG.
        "STOPSIGNAL" => Command::StopSignal(exactly_one(args, &name)?),
        "ARG" => {
            if args.is_empty() {
                return Err(at_least_one(&name));
            }
            let mut defs = Vec::new();
            for a in args {
                match a.split_once('=') {
                    Some(("", _)) => return Err("ARG names can not be blank".into()),
                    Some((k, v)) => defs.push(ArgDef {
                        key: k.to_string(),
                        default: Some(v.to_string()),
                    }),
                    None => defs.push(ArgDef {
                        key: a,
                        default: None,
                    }),
                }
            }
            Command::Arg(defs)
        }
        "SHELL" => {
            flags.finish()?;
            let line = command_line(node);
            if line.args.is_empty() {
                return Err(at_least_one(&name));
            }
            if !node.json {
                return Err(format!(
                    "SHELL requires the arguments to be in JSON form: SHELL [\"executable\", \"param1\"], got: {}",
                    node.original.trim()
                ));
            }
            Command::Shell(line.args)
        }
        _ => return Err(unknown_instruction(&node.keyword)),
    };
    Ok(command)
}

/// `unknown instruction "RUNN" (did you mean RUN?)`; the suggestion is written in the case
/// the instruction was (`foo` suggests `from`).
pub fn unknown_instruction(keyword: &str) -> String {
    let upper = keyword.to_ascii_uppercase();
    match suggest(&upper, KEYWORDS.iter().copied()) {
        Some(s) if keyword.chars().all(|c| !c.is_ascii_uppercase()) => format!(
            "unknown instruction {keyword:?} (did you mean {}?)",
            s.to_ascii_lowercase()
        ),
        Some(s) => format!("unknown instruction {keyword:?} (did you mean {s}?)"),
        None => format!("unknown instruction {keyword:?}"),
    }
}

fn at_least_one(name: &str) -> String {
    format!("{name} requires at least one argument")
}

fn exactly_one(args: Vec<String>, name: &str) -> Result<String, String> {
    match <[String; 1]>::try_from(args) {
        Ok([a]) => Ok(a),
        Err(_) => Err(format!("{name} requires exactly one argument")),
    }
}

fn key_values(args: &[String], name: &str) -> Result<Vec<KeyValue>, String> {
    if args.is_empty() {
        return Err(at_least_one(name));
    }
    if !args.len().is_multiple_of(3) {
        return Err(format!("Bad input to {name}, too many arguments"));
    }
    args.chunks(3)
        .map(|c| {
            if c[0].is_empty() {
                Err(format!("{name} names can not be blank"))
            } else {
                Ok(KeyValue {
                    key: c[0].clone(),
                    value: c[1].clone(),
                    legacy: c[2].is_empty(),
                })
            }
        })
        .collect()
}

fn command_line(node: &Node) -> CommandLine {
    let args = if node.json {
        node.args.clone()
    } else if node.args.is_empty() {
        Vec::new()
    } else {
        vec![node.args.join(" ")]
    };
    CommandLine {
        args,
        prepend_shell: !node.json,
    }
}

fn sources_and_dest(node: &Node, name: &str) -> Result<SourcesAndDest, String> {
    let args = &node.args;
    let Some((dest, sources)) = args.split_last().filter(|(_, s)| !s.is_empty()) else {
        return Err(format!(
            "{name} requires at least two arguments, but only one was provided. Destination could not be determined"
        ));
    };
    if parse_heredoc(dest).ok().flatten().is_some() {
        return Err(format!("{name} cannot accept a heredoc as a destination"));
    }
    let mut out = SourcesAndDest {
        dest: dest.clone(),
        ..Default::default()
    };
    let mut docs = node.heredocs.iter();
    for src in sources {
        if !node.json && parse_heredoc(src).ok().flatten().is_some() {
            let Some(doc) = docs.next() else {
                return Err(format!("{name}: heredoc {src} has no body"));
            };
            let data = if doc.chomp {
                chomp_heredoc(&doc.content)
            } else {
                doc.content.clone()
            };
            out.contents.push(SourceContent {
                path: doc.name.clone(),
                data,
                expand: doc.expand,
            });
        } else {
            out.sources.push(src.clone());
        }
    }
    Ok(out)
}

fn parse_healthcheck(node: &Node, flags: &mut Flags) -> Result<Healthcheck, String> {
    let Some((typ, rest)) = node.args.split_first() else {
        return Err(at_least_one("HEALTHCHECK"));
    };
    let typ = typ.to_ascii_uppercase();
    if typ == "NONE" {
        if !rest.is_empty() {
            return Err("HEALTHCHECK NONE takes no arguments".into());
        }
        return Ok(Healthcheck {
            test: vec![typ],
            ..Default::default()
        });
    }
    let interval = flags.string("interval");
    let timeout = flags.string("timeout");
    let start_period = flags.string("start-period");
    let start_interval = flags.string("start-interval");
    let retries = flags.string("retries");
    flags.finish()?;
    if typ != "CMD" {
        return Err(format!("Unknown type {typ:?} in HEALTHCHECK (try CMD)"));
    }
    let cmd: Vec<String> = if node.json {
        rest.to_vec()
    } else if rest.is_empty() {
        Vec::new()
    } else {
        vec![rest.join(" ")]
    };
    if cmd.is_empty() {
        return Err("Missing command after HEALTHCHECK CMD".into());
    }
    let mut test = vec![if node.json { "CMD" } else { "CMD-SHELL" }.to_string()];
    test.extend(cmd);
    let interval_flag = |name: &str, v: Option<String>| -> Result<Option<Duration>, String> {
        let Some(v) = v.filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let d = parse_go_duration(&v).map_err(|e| format!("--{name}: {e}"))?;
        if d.is_zero() {
            return Ok(None);
        }
        if d < Duration::from_millis(1) {
            return Err(format!("Interval {name:?} cannot be less than 1ms"));
        }
        Ok(Some(d))
    };
    let retries = match retries?.filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => {
            let n: i64 = v
                .parse()
                .map_err(|_| format!("--retries: invalid number {v:?}"))?;
            if n < 0 {
                return Err(format!("--retries cannot be negative ({n})"));
            }
            Some(u32::try_from(n).map_err(|_| format!("--retries: {n} is too large"))?)
        }
    };
    Ok(Healthcheck {
        test,
        interval: interval_flag("interval", interval?)?,
        timeout: interval_flag("timeout", timeout?)?,
        start_period: interval_flag("start-period", start_period?)?,
        start_interval: interval_flag("start-interval", start_interval?)?,
        retries,
    })
}

/// Parses a duration the way Go's `time.ParseDuration` does: `300ms`, `1.5h`, `2h45m`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}");
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.starts_with('-') {
        return Err(format!("invalid duration {s:?}: negative"));
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() || num == "." {
            return Err(bad());
        }
        let value: f64 = num.parse().map_err(|_| bad())?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let nanos = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(format!("invalid duration {s:?}: missing unit")),
            _ => return Err(format!("invalid duration {s:?}: unknown unit {unit:?}")),
        };
        total += value * nanos;
        rest = after;
    }
    if !total.is_finite() || total > 9.2e18 {
        return Err(bad());
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Parses one `--mount=` value: comma-separated `key=value` fields (CSV quoting allowed).
pub fn parse_mount(value: &str) -> Result<Mount, String> {
    let fields = csv_fields(value).map_err(|e| format!("failed to parse csv mounts: {e}"))?;
    let field_value = |name: &str| {
        fields.iter().find_map(|f| {
            let (k, v) = f.split_once('=')?;
            k.eq_ignore_ascii_case(name).then_some(v)
        })
    };
    if field_value("type").is_some_and(|t| t.contains('$')) {
        return Ok(Mount {
            from: field_value("from").map(str::to_string),
            deferred: Some(value.to_string()),
            ..parse_mount("type=bind")?
        });
    }
    let mut m = Mount {
        kind: MountType::Bind,
        from: None,
        source: None,
        target: None,
        readonly: false,
        id: None,
        sharing: Sharing::Shared,
        required: false,
        mode: None,
        uid: None,
        gid: None,
        size: None,
        env: None,
        deferred: None,
    };
    let mut ro_auto = true;
    let mut sharing_set = false;
    let parse_bool = |key: &str, v: &str| -> Result<bool, String> {
        match v {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
            "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
            _ => Err(format!("invalid value for {key}: {v}")),
        }
    };
    for field in &fields {
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k.to_ascii_lowercase(), Some(v)),
            None => (field.to_ascii_lowercase(), None),
        };
        let Some(value) = value else {
            match key.as_str() {
                "readonly" | "ro" => {
                    m.readonly = true;
                    ro_auto = false;
                }
                "readwrite" | "rw" => {
                    m.readonly = false;
                    ro_auto = false;
                }
                "required" if matches!(m.kind, MountType::Secret | MountType::Ssh) => {
                    m.required = true;
                }
                "required" => {
                    return Err(format!(
                        "unexpected key 'required' for mount type '{}'",
                        m.kind.as_str()
                    ));
                }
                _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
            }
            continue;
        };
        match key.as_str() {
            "type" => {
                m.kind = match value.to_ascii_lowercase().as_str() {
                    "bind" => MountType::Bind,
                    "cache" => MountType::Cache,
                    "tmpfs" => MountType::Tmpfs,
                    "secret" => MountType::Secret,
                    "ssh" => MountType::Ssh,
                    _ => {
                        let hint = suggest(value, ["bind", "cache", "tmpfs", "secret", "ssh"])
                            .map(|s| format!(" (did you mean {s}?)"))
                            .unwrap_or_default();
                        return Err(format!("unsupported mount type {value:?}{hint}"));
                    }
                }
            }
            "from" => {
                if value.contains('$') {
                    return Err(
                        "'from' doesn't support variable expansion, define alias stage instead"
                            .into(),
                    );
                }
                m.from = Some(value.to_string());
            }
            "source" | "src" => m.source = Some(value.to_string()),
            "target" | "dst" | "destination" => m.target = Some(value.to_string()),
            "readonly" | "ro" => {
                m.readonly = parse_bool(&key, value)?;
                ro_auto = false;
            }
            "readwrite" | "rw" => {
                m.readonly = !parse_bool(&key, value)?;
                ro_auto = false;
            }
            "required" => {
                if !matches!(m.kind, MountType::Secret | MountType::Ssh) {
                    return Err(format!(
                        "unexpected key 'required' for mount type '{}'",
                        m.kind.as_str()
                    ));
                }
                m.required = parse_bool(&key, value)?;
            }
            "id" => m.id = Some(value.to_string()),
            "sharing" => {
                m.sharing = match value.to_ascii_lowercase().as_str() {
                    "shared" => Sharing::Shared,
                    "private" => Sharing::Private,
                    "locked" => Sharing::Locked,
                    _ => return Err(format!("unsupported sharing value {value:?}")),
                };
                sharing_set = true;
            }
            "mode" => {
                m.mode = Some(
                    u32::from_str_radix(value, 8)
                        .map_err(|_| format!("invalid value {value} for mode"))?,
                );
            }
            "uid" => {
                m.uid = Some(
                    value
                        .parse()
                        .map_err(|_| format!("invalid value {value} for uid"))?,
                )
            }
            "gid" => {
                m.gid = Some(
                    value
                        .parse()
                        .map_err(|_| format!("invalid value {value} for gid"))?,
                )
            }
            "size" => {
                if m.kind != MountType::Tmpfs {
                    return Err(format!(
                        "unexpected key 'size' for mount type '{}'",
                        m.kind.as_str()
                    ));
                }
                m.size = Some(parse_ram_size(value)?);
            }
            "env" => {
                if m.kind != MountType::Secret {
                    return Err(format!(
                        "unexpected key 'env' for mount type '{}'",
                        m.kind.as_str()
                    ));
                }
                m.env = Some(value.to_string());
            }
            _ => {
                let keys = [
                    "type",
                    "from",
                    "source",
                    "target",
                    "readonly",
                    "id",
                    "sharing",
                    "required",
                    "size",
                    "mode",
                    "uid",
                    "gid",
                    "src",
                    "dst",
                    "destination",
                    "ro",
                    "rw",
                    "readwrite",
                    "env",
                ];
                let hint = suggest(&key, keys)
                    .map(|s| format!(" (did you mean {s}?)"))
                    .unwrap_or_default();
                return Err(format!("unexpected key '{key}' in '{field}'{hint}"));
            }
        }
    }
    let file_info_allowed = matches!(
        m.kind,
        MountType::Secret | MountType::Ssh | MountType::Cache
    );
    for (set, what) in [
        (m.mode.is_some(), "mode"),
        (m.uid.is_some(), "uid"),
        (m.gid.is_some(), "gid"),
    ] {
        if set && !file_info_allowed {
            return Err(format!(
                "{what} not allowed for {:?} type mounts",
                m.kind.as_str()
            ));
        }
    }
    if ro_auto {
        m.readonly = !matches!(m.kind, MountType::Cache | MountType::Tmpfs);
    }
    if sharing_set && m.kind != MountType::Cache {
        return Err(format!(
            "invalid cache sharing set for {} mount",
            m.kind.as_str()
        ));
    }
    if m.kind == MountType::Secret {
        if m.from.is_some() {
            return Err("secret mount should not have a from".into());
        }
        if m.source.is_none() && m.target.is_none() && m.id.is_none() && m.env.is_none() {
            return Err("invalid secret mount. one of source, target required".into());
        }
        if m.source.is_some() && m.id.is_some() {
            return Err("both source and id can't be set".into());
        }
    }
    Ok(m)
}

/// A size like `64m`, `1g`, `512k`, `100` (bytes), as Docker's RAMInBytes reads it.
fn parse_ram_size(v: &str) -> Result<u64, String> {
    let lower = v.trim().to_ascii_lowercase();
    let digits = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(digits);
    let n: f64 = num.parse().map_err(|_| format!("invalid size: '{v}'"))?;
    let mult: f64 = match unit.trim_end_matches(['b', 'i']) {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0 * 1024.0 * 1024.0,
        "t" => 1024.0f64.powi(4),
        "p" => 1024.0f64.powi(5),
        _ => return Err(format!("invalid size: '{v}'")),
    };
    Ok((n * mult) as u64)
}

/// Parses a mount whose type named a variable, once the variables are known: every field's
/// value goes through `expand`, then the flag is parsed as if written so.
pub fn expand_deferred_mount(
    raw: &str,
    mut expand: impl FnMut(&str) -> Result<String, String>,
) -> Result<Mount, String> {
    let fields = csv_fields(raw).map_err(|e| format!("failed to parse csv mounts: {e}"))?;
    let mut rebuilt = Vec::with_capacity(fields.len());
    for field in fields {
        let field = match field.split_once('=') {
            Some((k, v)) => format!("{k}={}", expand(v)?),
            None => field,
        };
        rebuilt.push(if field.contains([',', '"']) {
            format!("\"{}\"", field.replace('"', "\"\""))
        } else {
            field
        });
    }
    parse_mount(&rebuilt.join(","))
}

/// Splits one CSV record: fields separated by commas, `"` quotes a field (`""` is a quote).
fn csv_fields(s: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut at_field_start = true;
    while let Some(c) = chars.next() {
        if at_field_start && c == '"' {
            at_field_start = false;
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        cur.push('"');
                    }
                    Some('"') => break,
                    Some(c) => cur.push(c),
                    None => return Err("extraneous or missing \" in quoted-field".into()),
                }
            }
            match chars.peek() {
                None | Some(',') => {}
                Some(_) => return Err("extraneous or missing \" in quoted-field".into()),
            }
            continue;
        }
        at_field_start = false;
        match c {
            ',' => {
                fields.push(std::mem::take(&mut cur));
                at_field_start = true;
            }
            '"' => return Err("bare \" in non-quoted-field".into()),
            c => cur.push(c),
        }
    }
    fields.push(cur);
    Ok(fields)
}

/// Builder flags of one instruction, declared by the instruction and then checked.
struct Flags {
    instruction: String,
    given: Vec<(String, Option<String>)>,
    declared: BTreeMap<&'static str, bool>,
}

impl Flags {
    fn new(raw: &[String], instruction: &str) -> Self {
        let given = raw
            .iter()
            .map(|f| {
                let f = f.strip_prefix("--").unwrap_or(f);
                match f.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (f.to_string(), None),
                }
            })
            .collect();
        Flags {
            instruction: instruction.to_string(),
            given,
            declared: BTreeMap::new(),
        }
    }

    fn values(&mut self, name: &'static str, repeatable: bool) -> Vec<&Option<String>> {
        self.declared.insert(name, repeatable);
        self.given
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect()
    }

    fn used(&self, name: &str) -> bool {
        self.given.iter().any(|(k, _)| k == name)
    }

    fn string(&mut self, name: &'static str) -> Result<Option<String>, String> {
        match self.values(name, false).last() {
            None => Ok(None),
            Some(None) => Err(format!("missing a value on flag: --{name}")),
            Some(Some(v)) => Ok(Some(v.clone())),
        }
    }

    fn strings(&mut self, name: &'static str) -> Result<Vec<String>, String> {
        self.values(name, true)
            .into_iter()
            .map(|v| {
                v.clone()
                    .ok_or_else(|| format!("missing a value on flag: --{name}"))
            })
            .collect()
    }

    fn boolean(&mut self, name: &'static str) -> Result<bool, String> {
        match self.values(name, false).last() {
            None => Ok(false),
            Some(None) => Ok(true),
            Some(Some(v)) if v.is_empty() => Err(format!("missing a value on flag: --{name}")),
            Some(Some(v)) => match v.to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(format!(
                    "expecting boolean value for flag --{name}, not: {v}"
                )),
            },
        }
    }

    /// Fails on a flag that was not declared, or given twice when it may not be.
    fn finish(&self) -> Result<(), String> {
        let mut seen: Vec<&str> = Vec::new();
        for (k, _) in &self.given {
            match self.declared.get(k.as_str()) {
                None => {
                    let hint = suggest(k, self.declared.keys().copied())
                        .map(|s| format!(" (did you mean --{s}?)"))
                        .unwrap_or_default();
                    return Err(format!("unknown flag --{k} for {}{hint}", self.instruction));
                }
                Some(false) if seen.contains(&k.as_str()) => {
                    return Err(format!("duplicate flag specified: --{k}"));
                }
                Some(_) => seen.push(k),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::parser::parse;

    fn stages(src: &str) -> Result<Parsed, FrontendError> {
        parse_stages(&parse(src).map_err(FrontendError::from)?)
    }

    #[test]
    fn unknown_instruction_suggests() {
        let e = stages("FROM a\nRUNN make\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: unknown instruction \"RUNN\" (did you mean RUN?)"
        );
    }

    #[test]
    fn copy_flags() {
        let p = stages(
            "FROM a\nCOPY --from=build --chmod=755 --link --exclude=*.o --exclude=x a b /dst/\n",
        )
        .unwrap();
        let Command::Copy(c) = &p.stages[0].commands[0].command else {
            panic!()
        };
        assert_eq!(c.from.as_deref(), Some("build"));
        assert_eq!(c.chmod.as_deref(), Some("755"));
        assert!(c.link && !c.parents);
        assert_eq!(c.exclude, vec!["*.o", "x"]);
        assert_eq!(c.paths.sources, vec!["a", "b"]);
        assert_eq!(c.paths.dest, "/dst/");
    }

    #[test]
    fn bad_flags() {
        let e = stages("FROM a\nCOPY --form=x a b\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown flag --form for COPY (did you mean --from?)"),
            "{e}"
        );
        let e = stages("FROM a\nCOPY --from=a --from=b a b\n").unwrap_err();
        assert!(e.to_string().contains("duplicate flag"), "{e}");
        let e = stages("FROM a\nCOPY --link=maybe a b\n").unwrap_err();
        assert!(e.to_string().contains("expecting boolean"), "{e}");
        let e = stages("FROM a\nWORKDIR --x=1 /a\n").unwrap_err();
        assert!(
            e.to_string().contains("unknown flag --x for WORKDIR"),
            "{e}"
        );
    }

    #[test]
    fn mounts() {
        let m =
            parse_mount("type=cache,target=/root/.cache,id=go,sharing=locked,mode=0755").unwrap();
        assert_eq!(m.kind, MountType::Cache);
        assert_eq!(m.sharing, Sharing::Locked);
        assert_eq!(m.mode, Some(0o755));
        assert!(!m.readonly);
        let m = parse_mount("type=bind,from=build,source=/out,target=/in").unwrap();
        assert!(m.readonly);
        let m = parse_mount("type=secret,id=tok,env=TOKEN,required").unwrap();
        assert!(m.required);
        assert_eq!(m.env.as_deref(), Some("TOKEN"));
        let m = parse_mount("type=tmpfs,target=/t,size=64m").unwrap();
        assert_eq!(m.size, Some(64 << 20));
        assert!(parse_mount("type=bind,from=$X,target=/a").is_err());
        assert!(
            parse_mount("type=volume,target=/a")
                .unwrap_err()
                .contains("unsupported mount type")
        );
        assert!(parse_mount("type=bind,target=/a,sharing=locked").is_err());
        assert!(parse_mount("type=bind,mode=0700,target=/a").is_err());
        assert!(parse_mount("type=secret,from=x,id=a").is_err());
        assert!(
            parse_mount("type=cache,traget=/a")
                .unwrap_err()
                .contains("did you mean target?")
        );
        assert!(
            parse_mount("type=tmp,target=/t")
                .unwrap_err()
                .contains("unsupported mount type \"tmp\" (did you mean tmpfs?)")
        );
        assert_eq!(
            unknown_instruction("foo"),
            "unknown instruction \"foo\" (did you mean from?)"
        );
        // No target: joined to the working directory when the step runs, as BuildKit does.
        assert_eq!(parse_mount("type=cache").unwrap().target, None);
        assert_eq!(
            parse_mount("from=src,src=/usr/src/delve,rw")
                .unwrap()
                .target,
            None
        );
        assert_eq!(csv_fields("a,\"b,c\",d").unwrap(), vec!["a", "b,c", "d"]);
    }

    #[test]
    fn healthcheck() {
        let p = stages("FROM a\nHEALTHCHECK --interval=1m30s --retries=3 CMD curl -f localhost\n")
            .unwrap();
        let Command::Healthcheck(h) = &p.stages[0].commands[0].command else {
            panic!()
        };
        assert_eq!(h.test, vec!["CMD-SHELL", "curl -f localhost"]);
        assert_eq!(h.interval, Some(Duration::from_secs(90)));
        assert_eq!(h.retries, Some(3));
        assert!(stages("FROM a\nHEALTHCHECK --interval=1us CMD x\n").is_err());
        assert!(stages("FROM a\nHEALTHCHECK CONNECT x\n").is_err());
        assert_eq!(
            parse_go_duration("1.5h").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_go_duration("300ms").unwrap(),
            Duration::from_millis(300)
        );
        assert!(parse_go_duration("5").is_err());
    }

    #[test]
    fn arg_env_label_onbuild() {
        let p = stages(
            "ARG A=1 B\nFROM a AS Build\nENV X=1 Y=\"2 3\"\nLABEL k v w\nONBUILD RUN echo hi\n",
        )
        .unwrap();
        assert_eq!(p.meta_args[0].0.len(), 2);
        assert_eq!(p.stages[0].name.as_deref(), Some("build"));
        let Command::Env(e) = &p.stages[0].commands[0].command else {
            panic!()
        };
        assert_eq!(e[1].value, "\"2 3\"");
        let Command::Label(l) = &p.stages[0].commands[1].command else {
            panic!()
        };
        assert_eq!(
            (l[0].key.as_str(), l[0].value.as_str(), l[0].legacy),
            ("k", "v w", true)
        );
        let Command::Onbuild(o) = &p.stages[0].commands[2].command else {
            panic!()
        };
        assert_eq!(o, "RUN echo hi");
        // A heredoc is part of its trigger (BuildKit's `testOnBuildHeredoc`).
        let p = stages("FROM a\nONBUILD RUN <<EOF\necho one\necho two\nEOF\nRUN true\n").unwrap();
        let Command::Onbuild(o) = &p.stages[0].commands[0].command else {
            panic!("{:?}", p.stages[0].commands)
        };
        assert_eq!(o, "RUN <<EOF\necho one\necho two\nEOF");
        let trigger = crate::dockerfile::parser::parse(o).unwrap();
        assert_eq!(
            trigger.children[0].heredocs[0].content,
            "echo one\necho two\n"
        );
        assert!(stages("FROM a\nONBUILD ONBUILD RUN x\n").is_err());
        assert!(stages("FROM a\nONBUILD FROM b\n").is_err());
    }

    #[test]
    fn stage_structure_errors() {
        assert!(
            stages("RUN x\n")
                .unwrap_err()
                .to_string()
                .contains("before the first FROM")
        );
        assert!(
            stages("ARG X\n")
                .unwrap_err()
                .to_string()
                .contains("no FROM")
        );
        assert!(
            stages("FROM a AS 1x\n")
                .unwrap_err()
                .to_string()
                .contains("invalid name")
        );
        assert!(
            stages("FROM a b\n")
                .unwrap_err()
                .to_string()
                .contains("one or three")
        );
        assert!(
            stages("FROM a\nSHELL sh -c\n")
                .unwrap_err()
                .to_string()
                .contains("JSON")
        );
        assert!(
            stages("FROM a\nCOPY onlyone\n")
                .unwrap_err()
                .to_string()
                .contains("two arguments")
        );
    }

    #[test]
    fn heredoc_sources() {
        let p = stages("FROM a\nCOPY <<-EOF /x\n\thello $X\n\tEOF\n").unwrap();
        let Command::Copy(c) = &p.stages[0].commands[0].command else {
            panic!()
        };
        assert_eq!(c.paths.contents[0].data, "hello $X\n");
        assert!(c.paths.contents[0].expand);
        assert!(c.paths.sources.is_empty());
    }
}
