//! Registry authentication: challenges, and bearer tokens cached until a
//! little before their stated expiry (then asked for again). Where the
//! credentials come from is [`crate::credentials`]' job.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses `Bearer realm="..",service="..",scope=".."` or `Basic realm=".."`.
    pub fn parse(header: &str) -> Option<Self> {
        let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(rest);
        Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    }
}

/// Splits `k="v",k2=v2` respecting quotes (scopes contain commas).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value);
    }
    out
}

/// A bearer token and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Token {
    pub value: String,
    pub expires: Instant,
}

/// The token endpoint's JSON answer.
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// Turns the answer into a token, renewed a little before its stated expiry:
    /// 5 s early, or a quarter of its life for tokens under 20 s, so even a
    /// short-lived token is replaced before a request can carry it expired.
    pub fn into_token(self, now: Instant) -> Option<Token> {
        let value = self.token.or(self.access_token)?;
        // The spec's default lifetime is 60 s when none is given; a token is used at least 1 s.
        let life = Duration::from_secs(self.expires_in.unwrap_or(60).max(1));
        let early = Duration::from_secs(5).min(life / 4);
        Some(Token {
            value,
            expires: now + life - early,
        })
    }
}

/// Tokens by (registry, scope).
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<(String, String), Token>>,
}

impl TokenCache {
    /// A still-valid token for this registry and scope.
    pub fn get(&self, registry: &str, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock();
        let t = tokens.get(&(registry.to_string(), scope.to_string()))?;
        (t.expires > Instant::now()).then(|| t.value.clone())
    }

    pub fn put(&self, registry: &str, scope: &str, token: Token) {
        self.tokens
            .lock()
            .insert((registry.to_string(), scope.to_string()), token);
    }

    /// Drops a token the registry refused.
    pub fn forget(&self, registry: &str, scope: &str) {
        self.tokens.lock().remove(&(registry.to_string(), scope.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_comma_in_scope() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.test/token",service="reg",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.test/token".into(),
                service: Some("reg".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
    }

    #[test]
    fn basic_challenge() {
        assert_eq!(Challenge::parse(r#"Basic realm="x""#), Some(Challenge::Basic));
    }

    #[test]
    fn tokens_are_renewed_before_their_stated_expiry() {
        let now = Instant::now();
        let token = |expires_in| {
            TokenResponse {
                token: Some("t".into()),
                access_token: None,
                expires_in,
            }
            .into_token(now)
            .unwrap()
            .expires
                - now
        };
        assert_eq!(token(Some(300)), Duration::from_secs(295));
        assert_eq!(token(None), Duration::from_secs(55));
        assert_eq!(token(Some(4)), Duration::from_secs(3));
        assert_eq!(token(Some(0)), Duration::from_millis(750));
    }

    #[test]
    fn expired_tokens_are_not_returned() {
        let cache = TokenCache::default();
        let past = Instant::now() - Duration::from_secs(1);
        cache.put(
            "r",
            "s",
            Token {
                value: "t".into(),
                expires: past,
            },
        );
        assert_eq!(cache.get("r", "s"), None);
    }
}
