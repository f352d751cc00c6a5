//! A client command whose reader stops early (`shoal completions bash | head -1`) ends
//! quietly with status 141, as Unix tools do, not with a panic and a backtrace. The pipe's
//! reading end is closed before the command starts, so every write it makes fails.

use std::process::{Command, Stdio};

fn into_closed_pipe(args: &[&str]) -> (Option<i32>, String) {
    // A pipe whose only reader was `true`'s stdin, closed once it has exited.
    let mut reader = (Command::new("true").stdin(Stdio::piped()).spawn()).expect("run true");
    let writer = reader.stdin.take().expect("the pipe's writing end");
    reader.wait().expect("true exits");
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run shoal");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_completion_script_into_a_closed_pipe_ends_quietly() {
    let (code, stderr) = into_closed_pipe(&["completions", "bash"]);
    assert_eq!(code, Some(141), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn a_printed_document_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    shoal_pki::ClusterCa::load_or_generate(dir.path()).expect("a CA");
    let state_dir = dir.path().to_str().expect("utf-8 path");
    let (code, stderr) = into_closed_pipe(&["ca-cert", "--state-dir", state_dir]);
    assert_eq!(code, Some(141), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
