//! Runs a credential program (a docker credential helper, a kubelet
//! credential-provider plugin): its input on stdin, its answer from stdout,
//! under a deadline and an output bound, killed when either is exceeded.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest answer read from a credential program (a few tokens fit many times over).
const MAX_OUTPUT: u64 = 1 << 20;
/// How much of stderr an error quotes.
const STDERR_QUOTE: usize = 300;

/// What a finished program said.
pub(crate) struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    /// The first bytes of stderr, lossy, for error messages.
    pub stderr: String,
}

/// A program that could not be run to completion.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start it: {0}")]
    Spawn(std::io::Error),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("its answer is larger than {MAX_OUTPUT} bytes")]
    TooLarge,
    #[error("talking to it: {0}")]
    Io(std::io::Error),
}

/// Runs `program args` with `env` added, writes `input` to its stdin and
/// collects its output; the process is killed if `timeout` passes first.
pub(crate) async fn run(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    input: &[u8],
    timeout: Duration,
) -> Result<Output, ExecError> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(ExecError::Spawn)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let work = async {
        // A program may answer without reading its input: a closed pipe is not an error.
        let write = async {
            let _ = stdin.write_all(input).await;
            drop(stdin);
            Ok(())
        };
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (mut stdout, mut stderr) = (stdout.take(MAX_OUTPUT + 1), stderr.take(MAX_OUTPUT));
        // An answer over the bound ends the wait at once (try_join), not at the deadline.
        let read_out = async {
            stdout.read_to_end(&mut out).await.map_err(ExecError::Io)?;
            match out.len() as u64 > MAX_OUTPUT {
                true => Err(ExecError::TooLarge),
                false => Ok(()),
            }
        };
        let read_err = async { stderr.read_to_end(&mut err).await.map(drop).map_err(ExecError::Io) };
        tokio::try_join!(write, read_out, read_err)?;
        let status = child.wait().await.map_err(ExecError::Io)?;
        let stderr: String = String::from_utf8_lossy(&err).chars().take(STDERR_QUOTE).collect();
        Ok(Output {
            status,
            stdout: out,
            stderr: stderr.trim().replace('\n', " "),
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        // Dropping `work` drops the child, which kills it (kill_on_drop).
        Err(_) => Err(ExecError::TimedOut(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> (std::path::PathBuf, Vec<String>) {
        ("/bin/sh".into(), vec!["-c".into(), script.into()])
    }

    #[tokio::test]
    async fn input_goes_to_stdin_and_stdout_comes_back() {
        let (p, a) = sh("tr a-z A-Z");
        let out = run(&p, &a, &[], b"hello", Duration::from_secs(5)).await.unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"HELLO");
    }

    #[tokio::test]
    async fn a_program_that_hangs_is_killed_at_the_deadline() {
        let (p, a) = sh("sleep 30");
        let start = std::time::Instant::now();
        let err = run(&p, &a, &[], b"", Duration::from_millis(200)).await.err().unwrap();
        assert!(matches!(err, ExecError::TimedOut(_)), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn an_endless_answer_is_refused() {
        let (p, a) = sh("yes");
        let err = run(&p, &a, &[], b"", Duration::from_secs(10)).await.err().unwrap();
        assert!(matches!(err, ExecError::TooLarge), "{err}");
    }

    #[tokio::test]
    async fn env_is_passed_and_stderr_quoted() {
        let (p, a) = sh("echo \"$X\" >&2; exit 3");
        let env = [("X".to_string(), "from-env".to_string())];
        let out = run(&p, &a, &env, b"", Duration::from_secs(5)).await.unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stderr, "from-env");
    }
}
