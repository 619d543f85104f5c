//! Property: a Dockerfile that parses prints to text that parses to the same instructions,
//! and printing that again gives the same text (parse -> print -> parse is stable).
//!
//! The generator assembles Dockerfiles from the pieces that make parsing hard: every
//! instruction, flags with quotes, JSON and shell forms, quotes and escapes, `$` expansions,
//! heredocs, continuation lines with comments and blank lines inside, CRLF endings, the
//! backtick escape directive.

use proptest::prelude::*;
use strata_shared::dockerfile::parser::parse;

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_./:-]{1,8}",
        Just("\"a b\"".to_string()),
        Just("'c d'".to_string()),
        Just("$HOME".to_string()),
        Just("${V:-x y}".to_string()),
        Just("e\\ f".to_string()),
        Just("\\\\".to_string()),
        Just("k=v".to_string()),
        Just("k=\"v w\"".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("\"".to_string()),
        Just("é✓".to_string()),
    ]
}

fn flag() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("--from=build".to_string()),
        Just("--chown=1000:1000".to_string()),
        Just("--link".to_string()),
        Just("--mount=type=cache,target=/root/.cache".to_string()),
        Just("--chmod=\"7 55\"".to_string()),
        Just("--platform=$BUILDPLATFORM".to_string()),
        Just("--".to_string()),
    ]
}

fn json_array() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z \\\\\"$é-]{0,6}", 0..4)
        .prop_map(|v| serde_json::to_string(&v).expect("json"))
}

fn instruction() -> impl Strategy<Value = String> {
    let keyword = prop_oneof![
        Just("FROM"),
        Just("RUN"),
        Just("CMD"),
        Just("LABEL"),
        Just("EXPOSE"),
        Just("ENV"),
        Just("ADD"),
        Just("COPY"),
        Just("ENTRYPOINT"),
        Just("VOLUME"),
        Just("USER"),
        Just("WORKDIR"),
        Just("ARG"),
        Just("ONBUILD RUN"),
        Just("STOPSIGNAL"),
        Just("HEALTHCHECK CMD"),
        Just("SHELL"),
        Just("MAINTAINER"),
        Just("run"),
        Just("Copy"),
        Just("BOGUS"),
    ];
    let args = prop_oneof![
        prop::collection::vec(word(), 0..5).prop_map(|w| w.join(" ")),
        json_array(),
    ];
    (
        keyword,
        prop::collection::vec(flag(), 0..3),
        args,
        0..4usize,
    )
        .prop_map(|(k, flags, args, layout)| {
            let mut line = k.to_string();
            for f in &flags {
                line.push(' ');
                line.push_str(f);
            }
            line.push(' ');
            line.push_str(&args);
            match layout {
                // A continuation with a comment and a blank line inside.
                1 => line.replacen(' ', " \\\n  # inside\n\n  ", 1),
                // Heredocs.
                2 if k == "RUN" || k == "COPY" => {
                    format!("{k} <<EOF <<-'END' {args}\nbody $X\nEOF\n\tmore\n\tEND")
                }
                3 => format!("# comment\n{line}"),
                _ => line,
            }
        })
}

fn dockerfile() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(instruction(), 1..12),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(lines, crlf, backtick)| {
            let mut s = String::new();
            let mut body = lines.join("\n");
            if backtick {
                s.push_str("# escape=`\n");
                body = body.replace("\\\n", "`\n");
            }
            s.push_str(&body);
            s.push('\n');
            if crlf {
                s = s.replace('\n', "\r\n");
            }
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parse_print_parse_is_stable(src in dockerfile()) {
        if let Ok(ast) = parse(&src) {
            let printed = ast.to_dockerfile();
            let again = parse(&printed).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
            prop_assert_eq!(again.dump(), ast.dump(), "printed:\n{}", printed);
            prop_assert_eq!(again.to_dockerfile(), printed);
            let heredocs = |a: &strata_shared::dockerfile::parser::Ast| {
                a.children.iter().map(|c| c.heredocs.clone()).collect::<Vec<_>>()
            };
            prop_assert_eq!(heredocs(&again), heredocs(&ast));
        }
    }

    #[test]
    fn arbitrary_text_never_panics(src in "(?s).{0,200}") {
        if let Ok(ast) = parse(&src) {
            let printed = ast.to_dockerfile();
            let again = parse(&printed).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
            prop_assert_eq!(again.dump(), ast.dump());
        }
    }
}
