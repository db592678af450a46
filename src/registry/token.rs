//! Credentials for a request ([`Registry::credential`], from the chain) and
//! the bearer-token flow: a 401's realm asked for a token for one scope,
//! with the registry's credentials only where [`policy`] allows: Basic user
//! and password on a GET, or an identity token as an OAuth2 refresh token
//! (`grant_type=refresh_token`) on a POST, as docker does.

use super::auth::TokenResponse;
use super::body::{self, BodyLimit};
use super::endpoints::Endpoint;
use super::policy::{self, RedactedUrl};
use super::retry::Failure;
use super::{Reference, Registry, RegistryError};
use crate::credentials::{Credential, Secret};
use reqwest::Url;
use std::time::Instant;
use tracing::warn;

/// Client id sent with OAuth2 token requests (the spec asks for one).
const CLIENT_ID: &str = "streamsnap";

impl Registry {
    /// Credentials for endpoint `ep` (the registry's own for the registry, a
    /// mirror's for a mirror, as containerd does) from the chain, or `None` (anonymous).
    pub(super) async fn credential(
        &self,
        op: &'static str,
        repo: &Reference,
        ep: &Endpoint,
    ) -> Result<Option<Credential>, RegistryError> {
        let host = ep.auth_host.as_str();
        let image = format!("{host}/{}", repo.repository);
        self.opts
            .credentials
            .lookup(host, &image)
            .await
            .map_err(|source| RegistryError::Credentials {
                op,
                source: Box::new(source),
            })
    }

    /// Gets a bearer token from `realm`. Credentials go along only when the
    /// realm is the registry's own host or https; otherwise the token is asked
    /// for anonymously (enough for public images; a private one then fails with
    /// access denied, and a warning says why). Returns what was sent, for a
    /// later denial's message: "credentials from <source>" or "no credentials".
    pub(super) async fn fetch_token(
        &self,
        op: &'static str,
        repo: &Reference,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, Failure> {
        let host = ep.auth_host.as_str();
        let redacted = RedactedUrl::new(realm);
        let realm_url = match Url::parse(realm) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => u,
            _ => {
                return Err(RegistryError::Status {
                    op,
                    url: redacted,
                    status: 401,
                    body: "the token realm is not an http(s) URL".into(),
                }
                .into())
            }
        };
        let own: Vec<&str> = ep.own_hosts.iter().map(String::as_str).collect();
        let credential = match self.credential(op, repo, ep).await? {
            Some(c) if policy::basic_allowed_for_realm(&own, &realm_url) => Some(c),
            Some(_) => {
                warn!(registry = host, realm = %redacted, "token realm is plain http on another host: credentials withheld, asking anonymously");
                None
            }
            None => None,
        };
        let mut query = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let req = match credential.as_ref().map(|c| &c.secret) {
            Some(Secret::IdentityToken(refresh)) => {
                let mut form = query.clone();
                form.extend([
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.as_str()),
                    ("client_id", CLIENT_ID),
                ]);
                ep.client
                    .post(realm_url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form_encode(&form))
            }
            Some(Secret::Basic { username, password }) => ep
                .client
                .get(realm_url.clone())
                .query(&query)
                .basic_auth(username, Some(password)),
            None => ep.client.get(realm_url.clone()).query(&query),
        };
        let credential_used = credential.is_some();
        let with = credential.map_or_else(
            || "no credentials".to_string(),
            |c| format!("credentials from {}", c.origin),
        );
        let denied = |status: u16| RegistryError::Denied {
            op,
            url: redacted.clone(),
            status,
            registry: host.to_string(),
            with: with.as_str().into(),
        };
        let resp = req.send().await.map_err(|e| {
            Failure::retry(RegistryError::Transport {
                op,
                url: redacted.clone(),
                source: e.without_url(),
            })
        })?;
        let status = resp.status();
        if !status.is_success() {
            if credential_used {
                self.opts.credentials.forget(host);
            }
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
        Ok(with)
    }
}

/// `application/x-www-form-urlencoded` of `pairs`.
fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut u = Url::parse("http://form.invalid/").expect("a valid URL");
    u.query_pairs_mut().extend_pairs(pairs);
    u.query().unwrap_or_default().to_string()
}
