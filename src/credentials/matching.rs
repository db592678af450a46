//! kubelet's image matching (`matchImages` of a credential provider, keys of
//! its `auth` answer): a pattern and an image match when their hosts have the
//! same number of dot-separated labels and each label matches as a glob
//! (`*.dkr.ecr.*.amazonaws.com`), the ports are equal (both may be absent),
//! and the pattern's path is a prefix of the image's path.

/// Whether image `image` (`host[:port]/path[:tag]`, no scheme) matches `pattern`.
pub fn matches(pattern: &str, image: &str) -> bool {
    let (p_host, p_port, p_path) = split(strip_scheme(pattern));
    let (i_host, i_port, i_path) = split(strip_scheme(image));
    if p_port != i_port || !i_path.starts_with(p_path) {
        return false;
    }
    let (p_labels, i_labels): (Vec<&str>, Vec<&str>) = (p_host.split('.').collect(), i_host.split('.').collect());
    p_labels.len() == i_labels.len() && p_labels.iter().zip(&i_labels).all(|(p, i)| p == i || glob(p, i))
}

fn strip_scheme(s: &str) -> &str {
    s.strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s)
}

/// (host, port, path) of `host[:port][/path]`; the path keeps its leading `/`.
fn split(s: &str) -> (&str, &str, &str) {
    let (authority, path) = match s.find('/') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let (host, port) = match authority.strip_prefix('[').and_then(|r| r.split_once(']')) {
        // [v6] or [v6]:port
        Some((v6, tail)) => (&authority[..v6.len() + 2], tail.strip_prefix(':').unwrap_or("")),
        None => authority.rsplit_once(':').unwrap_or((authority, "")),
    };
    (host, port, path)
}

/// Go's `path.Match` within one label: `*` any run, `?` one character,
/// `[abc]`, `[a-z]` and `[^…]` classes. A malformed class matches nothing.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    glob_at(&p, &t)
}

fn glob_at(p: &[char], t: &[char]) -> bool {
    match p.first() {
        None => t.is_empty(),
        Some('*') => (0..=t.len()).any(|skip| glob_at(&p[1..], &t[skip..])),
        Some('?') => !t.is_empty() && glob_at(&p[1..], &t[1..]),
        Some('[') => match (class(&p[1..]), t.first()) {
            (Some((set, negated, used)), Some(c)) => {
                set.iter().any(|(lo, hi)| (lo..=hi).contains(&c)) != negated && glob_at(&p[1 + used..], &t[1..])
            }
            _ => false,
        },
        Some('\\') if p.len() > 1 => t.first() == Some(&p[1]) && glob_at(&p[2..], &t[1..]),
        Some(c) => t.first() == Some(c) && glob_at(&p[1..], &t[1..]),
    }
}

/// A parsed `[…]` class: its ranges, whether negated, chars used (through `]`).
type Class = (Vec<(char, char)>, bool, usize);

/// Parses a class after its `[`.
fn class(p: &[char]) -> Option<Class> {
    let mut i = 0;
    let negated = p.first() == Some(&'^');
    if negated {
        i += 1;
    }
    let mut set = Vec::new();
    loop {
        let lo = *p.get(i)?;
        if lo == ']' && !set.is_empty() {
            return Some((set, negated, i + 1));
        }
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|c| *c != ']') {
            set.push((lo, p[i + 2]));
            i += 3;
        } else {
            set.push((lo, lo));
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn kubelet_documented_examples() {
        // From the CredentialProviderConfig reference.
        assert!(matches(
            "123456789.dkr.ecr.us-east-1.amazonaws.com",
            "123456789.dkr.ecr.us-east-1.amazonaws.com"
        ));
        assert!(matches("*.azurecr.io", "example.azurecr.io"));
        assert!(!matches("*.azurecr.io", "azurecr.io"));
        assert!(matches("gcr.io", "gcr.io"));
        assert!(matches("*.*.registry.io", "abc.app.registry.io"));
        assert!(matches(
            "foo.registry.io:8080/path",
            "foo.registry.io:8080/path/image:v1"
        ));
        assert!(!matches("*.*.registry.io", "registry.io"));
    }

    #[test]
    fn ports_must_be_equal() {
        assert!(!matches("127.0.0.1", "127.0.0.1:5000/a"));
        assert!(!matches("127.0.0.1:5000", "127.0.0.1/a"));
        assert!(matches("127.0.0.1:5000", "127.0.0.1:5000/a"));
        assert!(!matches("127.0.0.1:5000", "127.0.0.1:5001/a"));
        assert!(matches("[::1]:5000", "[::1]:5000/a"));
        assert!(!matches("[::1]", "[::1]:5000/a"));
    }

    #[test]
    fn the_path_is_a_prefix() {
        assert!(matches("r.test/team", "r.test/team/app"));
        assert!(!matches("r.test/team", "r.test/other/app"));
        assert!(matches("https://r.test", "r.test/any"));
    }

    #[test]
    fn glob_classes_and_question_marks_within_a_label() {
        assert!(matches("r[0-9].test", "r7.test"));
        assert!(!matches("r[^0-9].test", "r7.test"));
        assert!(matches("r?.test", "ra.test"));
        assert!(!matches("*.test", "a.b.test"));
    }
}
