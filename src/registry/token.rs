//! The bearer-token flow: a 401's realm asked for a token for one scope,
//! with the registry's Basic credentials only where [`policy`] allows.

use super::auth::TokenResponse;
use super::body::{self, BodyLimit};
use super::policy::{self, RedactedUrl};
use super::retry::Failure;
use super::{Reference, Registry, RegistryError};
use reqwest::Url;
use std::time::Instant;
use tracing::warn;

impl Registry {
    /// Gets a bearer token from `realm`. Basic credentials go along only when
    /// the realm is the registry's own host or https; otherwise the token is
    /// asked for anonymously (enough for public images; a private one then
    /// fails with access denied, and a warning says why).
    pub(super) async fn fetch_token(
        &self,
        op: &'static str,
        repo: &Reference,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(), Failure> {
        let host = repo.registry.as_str();
        let redacted = RedactedUrl::new(realm);
        let denied = |status: u16| RegistryError::Denied {
            op,
            url: redacted.clone(),
            status,
            registry: host.to_string(),
        };
        let realm_url = match Url::parse(realm) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => u,
            _ => return Err(denied(401).into()),
        };
        let mut query = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = self.http.get(realm_url.clone()).query(&query);
        if let Some(c) = self.opts.docker_config.credentials(host) {
            if policy::basic_allowed_for_realm(&[host, repo.api_host()], &realm_url) {
                req = req.basic_auth(&c.username, Some(&c.password));
            } else {
                warn!(registry = host, realm = %redacted, "token realm is plain http on another host: credentials withheld, asking anonymously");
            }
        }
        let resp = req.send().await.map_err(|e| {
            Failure::retry(RegistryError::Transport {
                op,
                url: redacted.clone(),
                source: e.without_url(),
            })
        })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(denied(status.as_u16()).into());
        }
        let body = body::read_limited(resp, BodyLimit::TOKEN, self.stall())
            .await
            .map_err(|source| {
                Failure::retry(RegistryError::Body {
                    op,
                    url: redacted.clone(),
                    source,
                })
            })?;
        let bad = |why: String| RegistryError::Status {
            op,
            url: redacted.clone(),
            status: status.as_u16(),
            body: why,
        };
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| bad(format!("token response is not JSON: {e}")))?;
        let token = parsed
            .into_token(Instant::now())
            .ok_or_else(|| bad("token response without a token".into()))?;
        self.tokens.put(host, scope, token);
        Ok(())
    }
}
