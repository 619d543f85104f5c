//! Any word through the shell-word expander, in every mode, against a small environment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_shared::dockerfile::shell::Lexer;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, word)) = data.split_first() else { return };
    let word = String::from_utf8_lossy(word);
    let env: Vec<(String, String)> = vec![
        ("A".into(), "alpha beta".into()),
        ("EMPTY".into(), String::new()),
        ("P".into(), "/usr/local/bin:/usr/bin".into()),
    ];
    let mut lexer = Lexer::new(if flags & 1 == 0 { '\\' } else { '`' });
    lexer.raw_quotes = flags & 2 != 0;
    lexer.raw_escapes = flags & 4 != 0;
    lexer.skip_process_quotes = flags & 8 != 0;
    lexer.skip_unset_env = flags & 16 != 0;
    let _ = lexer.process_word(&word, &env);
    let _ = lexer.process_words(&word, &env);
    let _ = lexer.process_word_with_matches(&word, &env);
});
