//! Where requests may go and what they may carry: which redirect targets are
//! followed, which token realms get Basic credentials, and URLs as they may
//! appear in logs and errors (query strings, which can carry presigned
//! signatures and tokens, removed).

use reqwest::Url;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A URL fit for logs and errors: no query string, fragment or user info.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedactedUrl(String);

impl RedactedUrl {
    pub fn new(url: &str) -> Self {
        let Ok(mut u) = Url::parse(url) else {
            // Not a URL we could have sent: keep what cannot hold a secret.
            let end = url.find(['?', '#', '@']).unwrap_or(url.len());
            return Self(url[..end].to_string());
        };
        let had_query = u.query().is_some();
        u.set_query(None);
        u.set_fragment(None);
        let _ = u.set_username("");
        let _ = u.set_password(None);
        let mut s = u.to_string();
        if had_query {
            s.push_str("?<redacted>");
        }
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of network an address is on, for redirect decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AddrClass {
    /// Anything routable: where blob storage lives.
    Public,
    /// This node (127/8, ::1, 0.0.0.0, ::).
    Loopback,
    /// Link-local (169.254/16, fe80::/10): kubelet-style node services.
    LinkLocal,
    /// Cloud metadata services.
    Metadata,
}

impl AddrClass {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::of_v4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::of_v4(v4),
                None => Self::of_v6(v6),
            },
        }
    }

    fn of_v4(ip: Ipv4Addr) -> Self {
        // 169.254.169.254: AWS, GCP, Azure, OpenStack; 100.100.100.200: Alibaba.
        if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
            Self::Metadata
        } else if ip.is_loopback() || ip.is_unspecified() {
            Self::Loopback
        } else if ip.is_link_local() {
            Self::LinkLocal
        } else {
            Self::Public
        }
    }

    fn of_v6(ip: Ipv6Addr) -> Self {
        // fd00:ec2::254: AWS's IPv6 metadata address.
        if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
            Self::Metadata
        } else if ip.is_loopback() || ip.is_unspecified() {
            Self::Loopback
        } else if ip.segments()[0] & 0xffc0 == 0xfe80 {
            Self::LinkLocal
        } else {
            Self::Public
        }
    }
}

/// Why a redirect is not followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectRefused {
    #[error("scheme {0:?} is not http or https")]
    Scheme(String),
    #[error("target has no host")]
    NoHost,
    #[error("target address {addr} is {class:?}, which the registry is not on")]
    Address { addr: IpAddr, class: AddrClass },
    #[error("target host resolves to no address")]
    Unresolved,
}

/// A redirect target must be http(s); the scheme is checked before any lookup.
pub fn check_scheme(target: &Url) -> Result<(), RedirectRefused> {
    match target.scheme() {
        "http" | "https" => Ok(()),
        other => Err(RedirectRefused::Scheme(other.to_string())),
    }
}

/// May a redirect go to a host resolving to `target`, from a registry
/// resolving to `registry`? Node-local classes (loopback, link-local,
/// metadata) only when the registry itself is in that class: a registry on
/// loopback may hand out loopback URLs, a public one may not point us at
/// this node's services.
pub fn check_addresses(registry: &[IpAddr], target: &[IpAddr]) -> Result<(), RedirectRefused> {
    if target.is_empty() {
        return Err(RedirectRefused::Unresolved);
    }
    for &addr in target {
        let class = AddrClass::of(addr);
        if class != AddrClass::Public && !registry.iter().any(|r| AddrClass::of(*r) == class) {
            return Err(RedirectRefused::Address { addr, class });
        }
    }
    Ok(())
}

/// The addresses `url`'s host stands for: itself when it is an IP literal,
/// else what the resolver says (empty when it says nothing).
pub async fn addresses(url: &Url) -> Vec<IpAddr> {
    let port = url.port_or_known_default().unwrap_or(443);
    let Some(host) = url.host_str() else {
        return Vec::new();
    };
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return vec![ip];
    }
    match tokio::net::lookup_host((host, port)).await {
        Ok(found) => found.map(|a| a.ip()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Checks a redirect from a request to `registry` (the first URL of the
/// chain) to `target`: scheme, then the target's resolved addresses against
/// the registry's. (reqwest resolves the name again when it connects; a name
/// that changes its answer in between is not caught: see ARCHITECTURE.md.)
pub async fn check_redirect(registry: &Url, target: &Url) -> Result<(), RedirectRefused> {
    check_scheme(target)?;
    if target.host_str().is_none() {
        return Err(RedirectRefused::NoHost);
    }
    check_addresses(&addresses(registry).await, &addresses(target).await)
}

/// May the Basic credentials of `registry_hosts` (the registry's names:
/// reference host and API host) go to this token realm? Only to the
/// registry's own host, or over https (where the realm is who its
/// certificate says). A plain-http realm on another host would hand the
/// password to whoever answers there.
pub fn basic_allowed_for_realm(registry_hosts: &[&str], realm: &Url) -> bool {
    let Some(host) = realm.host_str() else { return false };
    let authority = match realm.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let own = registry_hosts.iter().any(|h| h.eq_ignore_ascii_case(&authority));
    own || realm.scheme() == "https"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn presigned_query_strings_are_redacted() {
        let r = RedactedUrl::new("https://bucket.s3.test/blob?X-Amz-Signature=abc&X-Amz-Credential=k");
        assert_eq!(r.as_str(), "https://bucket.s3.test/blob?<redacted>");
        let r = RedactedUrl::new("https://acct.blob.test/c/b?sv=1&sig=SECRET");
        assert!(!r.to_string().contains("SECRET"), "{r}");
        let r = RedactedUrl::new("https://cdn.test/b?token=SECRET#frag");
        assert!(
            !r.to_string().contains("SECRET") && !r.to_string().contains("frag"),
            "{r}"
        );
    }

    #[test]
    fn user_info_is_redacted() {
        let r = RedactedUrl::new("https://user:pass@r.test/v2/");
        assert_eq!(r.as_str(), "https://r.test/v2/");
    }

    #[test]
    fn urls_without_a_query_are_kept_whole() {
        let u = "http://127.0.0.1:5000/v2/a/b/blobs/sha256:00";
        assert_eq!(RedactedUrl::new(u).as_str(), u);
    }

    #[test]
    fn unparsable_urls_are_cut_before_any_query() {
        assert_eq!(RedactedUrl::new("not a url?sig=SECRET").as_str(), "not a url");
    }

    #[test]
    fn only_http_and_https_redirects_are_followed() {
        assert!(check_scheme(&url("https://b.test/x")).is_ok());
        assert!(check_scheme(&url("http://b.test/x")).is_ok());
        for bad in ["file:///etc/passwd", "ftp://b.test/x", "gopher://b.test/"] {
            assert!(
                matches!(check_scheme(&url(bad)), Err(RedirectRefused::Scheme(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_public_registry_may_not_redirect_to_node_local_addresses() {
        let registry = ips(&["203.0.113.7"]);
        for target in [
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "169.254.1.1",
            "fe80::1",
            "169.254.169.254",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
        ] {
            assert!(
                matches!(
                    check_addresses(&registry, &ips(&[target])),
                    Err(RedirectRefused::Address { .. })
                ),
                "{target}"
            );
        }
    }

    #[test]
    fn a_redirect_is_refused_when_any_resolved_address_is_node_local() {
        let registry = ips(&["203.0.113.7"]);
        assert!(check_addresses(&registry, &ips(&["198.51.100.1", "127.0.0.1"])).is_err());
    }

    #[test]
    fn a_public_registry_may_redirect_to_public_storage() {
        assert!(check_addresses(&ips(&["203.0.113.7"]), &ips(&["198.51.100.1", "2001:db8::1"])).is_ok());
    }

    #[test]
    fn a_loopback_registry_may_redirect_to_loopback_but_not_to_metadata() {
        let registry = ips(&["127.0.0.1"]);
        assert!(check_addresses(&registry, &ips(&["127.0.0.1"])).is_ok());
        assert!(check_addresses(&registry, &ips(&["169.254.169.254"])).is_err());
        assert!(check_addresses(&registry, &ips(&["169.254.3.4"])).is_err());
    }

    #[test]
    fn a_target_resolving_to_nothing_is_refused() {
        assert_eq!(
            check_addresses(&ips(&["127.0.0.1"]), &[]),
            Err(RedirectRefused::Unresolved)
        );
    }

    #[test]
    fn basic_credentials_go_to_the_registrys_own_host_over_http() {
        assert!(basic_allowed_for_realm(
            &["r.test:5000"],
            &url("http://r.test:5000/token")
        ));
        assert!(basic_allowed_for_realm(&["r.test"], &url("http://r.test/token")));
    }

    #[test]
    fn basic_credentials_go_to_an_https_realm_on_another_host() {
        assert!(basic_allowed_for_realm(
            &["docker.io", "registry-1.docker.io"],
            &url("https://auth.docker.test/token")
        ));
    }

    #[test]
    fn basic_credentials_never_go_to_a_plain_http_realm_on_another_host() {
        assert!(!basic_allowed_for_realm(
            &["r.test:5000"],
            &url("http://evil.test/token")
        ));
        assert!(!basic_allowed_for_realm(
            &["r.test:5000"],
            &url("http://r.test:6000/token")
        ));
        assert!(!basic_allowed_for_realm(&["r.test:5000"], &url("http://r.test/token")));
    }
}
