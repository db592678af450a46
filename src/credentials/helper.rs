//! Docker credential helpers (`docker-credential-<name> get`): the server URL
//! on stdin, `{"ServerURL","Username","Secret"}` on stdout. A `Username` of
//! `<token>` means `Secret` is an identity token. "credentials not found" is
//! an answer (anonymous), any other failure an error naming the helper.

use super::exec::{self, ExecError};
use super::{CredentialError, Origin, Secret};
use std::path::PathBuf;
use std::time::Duration;

/// What a helper prints for `get`.
#[derive(serde::Deserialize)]
struct Answer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// The message docker's helpers print (with a non-zero exit) when they hold nothing for a server.
const NOT_FOUND: &str = "credentials not found";

/// The program docker runs for helper `name`, found on `PATH`.
pub fn program(name: &str) -> String {
    format!("docker-credential-{name}")
}

/// How errors name helper `name`.
pub fn origin(name: &str) -> Origin {
    Origin::new(format!("credential helper {}", program(name)))
}

/// Runs `docker-credential-<name> get` for `server` (what the helper stores
/// it under: a host, or `https://index.docker.io/v1/` for Docker Hub).
pub async fn get(
    name: &str,
    registry: &str,
    server: &str,
    timeout: Duration,
) -> Result<Option<Secret>, CredentialError> {
    let failed = |reason: String| CredentialError::Source {
        registry: registry.to_string(),
        origin: origin(name),
        reason,
    };
    if name.is_empty() || name.contains('/') {
        return Err(failed(format!("{name:?} is not a helper name")));
    }
    let out = exec::run(
        &PathBuf::from(program(name)),
        &["get".to_string()],
        &[],
        server.as_bytes(),
        timeout,
    )
    .await
    .map_err(|source| match source {
        ExecError::Spawn(e) if e.kind() == std::io::ErrorKind::NotFound => {
            failed(format!("{} is not on PATH", program(name)))
        }
        source => CredentialError::Exec {
            registry: registry.to_string(),
            origin: origin(name),
            source,
        },
    })?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout);
        if said.contains(NOT_FOUND) || out.stderr.contains(NOT_FOUND) {
            return Ok(None);
        }
        // stdout of a failed helper is its error message, never a secret.
        let said: String = said.trim().chars().take(300).collect();
        return Err(failed(format!("get failed ({}): {said} {}", out.status, out.stderr)));
    }
    let answer: Answer = serde_json::from_slice(&out.stdout)
        .map_err(|e| failed(format!("answer is not the helper protocol's JSON: {e}")))?;
    if answer.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(match answer.username.as_str() {
        "<token>" => Secret::IdentityToken(answer.secret),
        _ => Secret::Basic {
            username: answer.username,
            password: answer.secret,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Writes `docker-credential-<name>` into `dir` and returns a PATH with `dir` first.
    fn install(dir: &std::path::Path, name: &str, body: &str) {
        let p = dir.join(program(name));
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    // PATH is process-wide: one test exercises every answer, so no two race on it.
    #[tokio::test]
    async fn helper_answers_are_read_by_the_protocol() {
        let dir = tempfile::tempdir().unwrap();
        install(
            dir.path(),
            "basic",
            r#"read url; printf '{"ServerURL":"%s","Username":"alice","Secret":"pw-for-%s"}' "$url" "$url""#,
        );
        install(
            dir.path(),
            "idtoken",
            r#"cat >/dev/null; echo '{"ServerURL":"x","Username":"<token>","Secret":"refresh"}'"#,
        );
        install(
            dir.path(),
            "none",
            "echo 'credentials not found in native keychain'; exit 1",
        );
        install(dir.path(), "broken", "echo 'cannot reach the keychain'; exit 1");
        let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap_or_default());
        std::env::set_var("PATH", path);
        let t = Duration::from_secs(5);
        assert_eq!(
            get("basic", "r.test", "r.test", t).await.unwrap(),
            Some(Secret::Basic {
                username: "alice".into(),
                password: "pw-for-r.test".into()
            })
        );
        assert_eq!(
            get("idtoken", "r.test", "r.test", t).await.unwrap(),
            Some(Secret::IdentityToken("refresh".into()))
        );
        assert_eq!(get("none", "r.test", "r.test", t).await.unwrap(), None);
        let err = get("broken", "r.test", "r.test", t).await.unwrap_err().to_string();
        assert!(
            err.contains("r.test") && err.contains("docker-credential-broken") && err.contains("cannot reach"),
            "{err}"
        );
        let err = get("absent", "r.test", "r.test", t).await.unwrap_err().to_string();
        assert!(err.contains("docker-credential-absent is not on PATH"), "{err}");
    }
}
