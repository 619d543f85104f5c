//! What each instruction does to the image config, and the history line BuildKit records for
//! it (`created_by`), byte for byte: `ENV A=1`, `CMD ["/bin/sh" "-c" "make"]`,
//! `RUN |1 V=2 /bin/sh -c make # buildkit`, `EXPOSE map[80/tcp:{}]`, and so on.

use std::collections::BTreeMap;
use std::time::Duration;

use strata_shared::dockerfile::instructions::{Command, CommandLine, Healthcheck};
use strata_shared::dockerfile::parser::go_quote;
use strata_shared::oci::{HealthConfig, History, ImageConfig};

/// The comment BuildKit puts on every history entry it writes.
pub const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";

/// The shell used for shell-form commands when the image sets none.
pub fn default_shell() -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into()]
}

/// The shell of an image config.
pub fn shell_of(config: &ImageConfig) -> Vec<String> {
    if config.config.shell.is_empty() {
        default_shell()
    } else {
        config.config.shell.clone()
    }
}

/// A command line with the image's shell prepended for the shell form.
pub fn with_shell(config: &ImageConfig, line: &CommandLine) -> Vec<String> {
    if line.prepend_shell {
        let mut args = shell_of(config);
        args.push(line.args.join(" "));
        args
    } else {
        line.args.clone()
    }
}

/// Go's `%q` of a string slice: `["a" "b"]`.
pub fn go_quote_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| go_quote(s)).collect();
    format!("[{}]", quoted.join(" "))
}

/// Go's `%v` of a string slice: `[a b]`.
pub fn go_list(items: &[String]) -> String {
    format!("[{}]", items.join(" "))
}

/// Go's `time.Duration` string: `1m30s`, `500ms`, `0s`.
pub fn go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", trim_fraction(nanos as f64 / 1e3));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim_fraction(nanos as f64 / 1e6));
    }
    let total_secs = nanos / 1_000_000_000;
    let frac = nanos % 1_000_000_000;
    let h = total_secs / 3600;
    let m = (total_secs % 3600) / 60;
    let s = total_secs % 60;
    let secs = if frac == 0 {
        format!("{s}")
    } else {
        let f = format!("{frac:09}");
        format!("{s}.{}", f.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}s")
    } else if m > 0 {
        format!("{m}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

fn trim_fraction(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Go's `%q` of an int: a quoted rune literal (`'\x03'`, `'a'`).
fn go_quote_rune(n: u64) -> String {
    match char::from_u32(n as u32) {
        Some(c) if (' '..='~').contains(&c) && c != '\'' && c != '\\' => format!("'{c}'"),
        Some('\'') => "'\\''".into(),
        Some('\\') => "'\\\\'".into(),
        _ if n < 0x80 => format!("'\\x{n:02x}'"),
        Some(c) if !c.is_control() => format!("'{c}'"),
        _ if n < 0x10000 => format!("'\\u{n:04x}'"),
        _ => format!("'\\U{n:08x}'"),
    }
}

fn nanos(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The config form of a HEALTHCHECK.
pub fn health_config(h: &Healthcheck) -> HealthConfig {
    HealthConfig {
        test: h.test.clone(),
        interval: nanos(h.interval),
        timeout: nanos(h.timeout),
        start_period: nanos(h.start_period),
        start_interval: nanos(h.start_interval),
        retries: u64::from(h.retries.unwrap_or(0)),
    }
}

/// Sets `key=value` in an env list, replacing an existing key in place.
pub fn set_env(env: &mut Vec<String>, key: &str, value: &str) {
    let entry = format!("{key}={value}");
    match env
        .iter_mut()
        .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
    {
        Some(slot) => *slot = entry,
        None => env.push(entry),
    }
}

/// Per-stage state BuildKit tracks besides the config: whether CMD was set in this stage
/// (ENTRYPOINT clears an inherited CMD only).
#[derive(Debug, Clone, Default)]
pub struct StageFlags {
    pub cmd_set: bool,
}

fn history(created_by: String, empty_layer: bool) -> History {
    History {
        created: None,
        created_by,
        comment: HISTORY_COMMENT.into(),
        empty_layer,
    }
}

/// Applies a metadata-only instruction (already expanded) to the config and records its
/// history entry. Returns `false` for instructions that are not metadata-only (RUN, COPY,
/// ADD, WORKDIR are done by the engine). Errors name what is wrong (an invalid port or signal).
pub fn apply_metadata(
    config: &mut ImageConfig,
    flags: &mut StageFlags,
    cmd: &Command,
    declared_args: &[(String, Option<String>)],
) -> Result<bool, String> {
    let entry = match cmd {
        Command::Env(kvs) => {
            let mut msg = String::from("ENV");
            for kv in kvs {
                set_env(&mut config.config.env, &kv.key, &kv.value);
                msg.push_str(&format!(" {}={}", kv.key, kv.value));
            }
            msg
        }
        Command::Label(kvs) => {
            let labels = config.config.labels.get_or_insert_with(BTreeMap::new);
            let mut msg = String::from("LABEL");
            for kv in kvs {
                labels.insert(kv.key.clone(), kv.value.clone());
                msg.push_str(&format!(" {}={}", kv.key, kv.value));
            }
            msg
        }
        Command::Maintainer(m) => {
            config.author = m.clone();
            format!("MAINTAINER {m}")
        }
        Command::Arg(defs) => {
            let parts: Vec<String> = defs
                .iter()
                .map(|d| {
                    let value = declared_value(declared_args, &d.key);
                    match value {
                        Some(v) => format!("{}={v}", d.key),
                        None => d.key.clone(),
                    }
                })
                .collect();
            format!("ARG {}", parts.join(" "))
        }
        Command::Cmd(line) => {
            let args = with_shell(config, line);
            config.config.cmd = Some(args.clone());
            config.config.args_escaped = true;
            flags.cmd_set = true;
            format!("CMD {}", go_quote_list(&args))
        }
        Command::Entrypoint(line) => {
            let args = with_shell(config, line);
            config.config.entrypoint = if args.is_empty() {
                None
            } else {
                Some(args.clone())
            };
            if !flags.cmd_set {
                config.config.cmd = None;
            }
            format!("ENTRYPOINT {}", go_quote_list(&args))
        }
        Command::Healthcheck(h) => {
            let hc = health_config(h);
            let msg = format!(
                "HEALTHCHECK &{{{} {} {} {} {} {}}}",
                go_quote_list(&hc.test),
                go_quote(&go_duration(Duration::from_nanos(hc.interval))),
                go_quote(&go_duration(Duration::from_nanos(hc.timeout))),
                go_quote(&go_duration(Duration::from_nanos(hc.start_period))),
                go_quote(&go_duration(Duration::from_nanos(hc.start_interval))),
                go_quote_rune(hc.retries),
            );
            config.config.healthcheck = Some(hc);
            msg
        }
        Command::Expose(ports) => {
            let mut set = std::collections::BTreeSet::new();
            for p in ports {
                for spec in parse_port_spec(p)? {
                    set.insert(spec);
                }
            }
            let exposed = config
                .config
                .exposed_ports
                .get_or_insert_with(BTreeMap::new);
            for p in &set {
                exposed.insert(p.clone(), strata_shared::oci::EmptyObject);
            }
            let shown: Vec<String> = set.iter().map(|p| format!("{p}:{{}}")).collect();
            format!("EXPOSE map[{}]", shown.join(" "))
        }
        Command::User(u) => {
            config.config.user = u.clone();
            format!("USER {u}")
        }
        Command::Volume(vs) => {
            let volumes = config.config.volumes.get_or_insert_with(BTreeMap::new);
            for v in vs {
                if v.is_empty() {
                    return Err("VOLUME specified can not be an empty string".into());
                }
                volumes.insert(v.clone(), strata_shared::oci::EmptyObject);
            }
            format!("VOLUME {}", go_list(vs))
        }
        Command::StopSignal(s) => {
            check_signal(s)?;
            config.config.stop_signal = s.clone();
            format!("STOPSIGNAL {s}")
        }
        Command::Shell(sh) => {
            config.config.shell = sh.clone();
            format!("SHELL {}", go_list(sh))
        }
        Command::Onbuild(expr) => {
            // BuildKit records the trigger in the config without a history entry.
            config.config.on_build.push(expr.clone());
            return Ok(true);
        }
        Command::Run(_) | Command::Copy(_) | Command::Add(_) | Command::Workdir(_) => {
            return Ok(false);
        }
    };
    config.history.push(history(entry, true));
    Ok(true)
}

fn declared_value<'a>(declared: &'a [(String, Option<String>)], key: &str) -> Option<&'a str> {
    declared
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.as_deref())
}

/// Records the history entry of a step that ran on the filesystem.
pub fn record_step(config: &mut ImageConfig, created_by: String, has_layer: bool) {
    config.history.push(history(created_by, !has_layer));
}

/// `RUN` history text: build arguments in scope as `|N K=V ...`, then the arguments.
pub fn run_history(
    args: &[String],
    declared: &[(String, Option<String>)],
    env: &dyn Fn(&str) -> Option<String>,
) -> String {
    let mut build_env: Vec<(String, String)> = Vec::new();
    for (k, v) in declared {
        let value = env(k).or_else(|| v.clone()).unwrap_or_default();
        match build_env.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = value,
            None => build_env.push((k.clone(), value)),
        }
    }
    let mut parts: Vec<String> = Vec::new();
    if !build_env.is_empty() {
        parts.push(format!("|{}", build_env.len()));
        parts.extend(build_env.into_iter().map(|(k, v)| format!("{k}={v}")));
    }
    parts.extend(args.iter().cloned());
    format!("RUN {} # buildkit", parts.join(" "))
}

/// Docker's port specs: `80`, `80/tcp`, `53/udp`, `8000-8002/tcp` (a range expands).
pub fn parse_port_spec(spec: &str) -> Result<Vec<String>, String> {
    let bad = || format!("invalid port specification: {spec:?}");
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!(
            "invalid proto {proto:?} in port specification {spec:?}"
        ));
    }
    // An `ip:host:container` form: only the container port counts.
    let ports = ports.rsplit(':').next().unwrap_or(ports);
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (a, b),
        None => (ports, ports),
    };
    let lo: u16 = lo.parse().map_err(|_| bad())?;
    let hi: u16 = hi.parse().map_err(|_| bad())?;
    if hi < lo {
        return Err(bad());
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

/// Accepts a signal name (`SIGTERM`, `TERM`, `SIGRTMIN+3`) or number, as Docker does.
pub fn check_signal(s: &str) -> Result<(), String> {
    const NAMES: [&str; 31] = [
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM",
    ];
    if let Ok(n) = s.parse::<u32>() {
        return if (1..=64).contains(&n) {
            Ok(())
        } else {
            Err(format!("invalid signal: {s}"))
        };
    }
    let name = s.strip_prefix("SIG").unwrap_or(s);
    let rt_ok =
        |rest: &str, max: u32| rest.is_empty() || rest.parse::<u32>().is_ok_and(|n| n <= max);
    let ok = NAMES.contains(&name)
        || matches!(name, "WINCH" | "XCPU" | "XFSZ")
        || name.strip_prefix("RTMIN+").is_some_and(|r| rt_ok(r, 15))
        || name.strip_prefix("RTMAX-").is_some_and(|r| rt_ok(r, 14))
        || name == "RTMIN"
        || name == "RTMAX";
    if ok {
        Ok(())
    } else {
        Err(format!("invalid signal: {s}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_shared::dockerfile::instructions::KeyValue;

    #[test]
    fn durations_print_like_go() {
        assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration(Duration::from_secs(300)), "5m0s");
        assert_eq!(go_duration(Duration::from_secs(3)), "3s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(go_duration(Duration::from_secs(3600 * 2 + 1)), "2h0m1s");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn metadata_history_matches_buildkit() {
        let mut c = ImageConfig::empty(&"linux/amd64".parse().unwrap());
        let mut f = StageFlags::default();
        let env = Command::Env(vec![KeyValue {
            key: "A".into(),
            value: "1 2".into(),
            legacy: false,
        }]);
        apply_metadata(&mut c, &mut f, &env, &[]).unwrap();
        let cmd = Command::Cmd(CommandLine {
            args: vec!["echo hi".into()],
            prepend_shell: true,
        });
        apply_metadata(&mut c, &mut f, &cmd, &[]).unwrap();
        apply_metadata(
            &mut c,
            &mut f,
            &Command::Expose(vec!["443".into(), "80/udp".into()]),
            &[],
        )
        .unwrap();
        apply_metadata(
            &mut c,
            &mut f,
            &Command::Volume(vec!["/a".into(), "/b".into()]),
            &[],
        )
        .unwrap();
        let hc = Command::Healthcheck(Healthcheck {
            test: vec!["CMD-SHELL".into(), "true".into()],
            interval: Some(Duration::from_secs(300)),
            timeout: Some(Duration::from_secs(3)),
            retries: Some(3),
            ..Default::default()
        });
        apply_metadata(&mut c, &mut f, &hc, &[]).unwrap();
        let by: Vec<&str> = c.history.iter().map(|h| h.created_by.as_str()).collect();
        assert_eq!(
            by,
            vec![
                "ENV A=1 2",
                "CMD [\"/bin/sh\" \"-c\" \"echo hi\"]",
                "EXPOSE map[443/tcp:{} 80/udp:{}]",
                "VOLUME [/a /b]",
                "HEALTHCHECK &{[\"CMD-SHELL\" \"true\"] \"5m0s\" \"3s\" \"0s\" \"0s\" '\\x03'}",
            ]
        );
        assert!(
            c.history
                .iter()
                .all(|h| h.empty_layer && h.comment == HISTORY_COMMENT)
        );
        assert!(c.config.env.contains(&"A=1 2".to_string()));
        assert_eq!(
            c.config.cmd.as_deref(),
            Some(&["/bin/sh".to_string(), "-c".into(), "echo hi".into()][..])
        );
    }

    #[test]
    fn entrypoint_clears_inherited_cmd_only() {
        let mut c = ImageConfig::empty(&"linux/amd64".parse().unwrap());
        c.config.cmd = Some(vec!["sh".into()]);
        let ep = Command::Entrypoint(CommandLine {
            args: vec!["/app".into()],
            prepend_shell: false,
        });
        let mut f = StageFlags::default();
        apply_metadata(&mut c, &mut f, &ep, &[]).unwrap();
        assert_eq!(c.config.cmd, None);
        let mut f = StageFlags { cmd_set: true };
        c.config.cmd = Some(vec!["x".into()]);
        apply_metadata(&mut c, &mut f, &ep, &[]).unwrap();
        assert!(c.config.cmd.is_some());
    }

    #[test]
    fn run_history_lists_build_args() {
        let declared = vec![
            ("V".to_string(), Some("1".to_string())),
            ("W".to_string(), None),
        ];
        let h = run_history(
            &["/bin/sh".into(), "-c".into(), "make".into()],
            &declared,
            &|_| None,
        );
        assert_eq!(h, "RUN |2 V=1 W= /bin/sh -c make # buildkit");
        assert_eq!(
            run_history(&["a".into()], &[], &|_| None),
            "RUN a # buildkit"
        );
    }

    #[test]
    fn ports_and_signals() {
        assert_eq!(parse_port_spec("8000-8002/udp").unwrap().len(), 3);
        assert!(parse_port_spec("http").is_err());
        assert!(parse_port_spec("80/xyz").is_err());
        assert!(check_signal("SIGTERM").is_ok());
        assert!(check_signal("KILL").is_ok());
        assert!(check_signal("9").is_ok());
        assert!(check_signal("SIGRTMIN+3").is_ok());
        assert!(check_signal("SIGFOO").is_err());
    }
}
