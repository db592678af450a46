//! containerd's filter syntax for List: `field[.sub]... [op value]`, joined
//! by `,` (all must hold); several filter strings: any may hold. Operators
//! `==`, `!=`, `~=` (regular expression); no operator tests presence.
//! Field paths name `name`, `parent`, `kind` or `labels.KEY` (keys may be quoted).

use super::SnapshotError;

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// What is wrong in one filter string, and where.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FilterError {
    #[error("unexpected end")]
    UnexpectedEnd,
    #[error("unterminated escape")]
    UnterminatedEscape,
    #[error("unterminated quote")]
    UnterminatedQuote,
    #[error("{0}")]
    NotUtf8(#[source] std::string::FromUtf8Error),
    #[error("expected a field name at position {0}")]
    ExpectedField(usize),
    #[error("expected a value at position {0}")]
    ExpectedValue(usize),
    #[error("invalid regular expression {re:?}: {source}")]
    Regex {
        re: String,
        #[source]
        source: regex_lite::Error,
    },
    #[error("unexpected {found:?} at position {at}")]
    Unexpected { found: char, at: usize },
}

/// A filter string that does not parse; a List caller's invalid argument.
#[derive(Debug, Clone, thiserror::Error)]
#[error("filter {filter:?}: {source}")]
pub struct InvalidFilter {
    pub filter: String,
    #[source]
    pub source: FilterError,
}

impl From<InvalidFilter> for SnapshotError {
    fn from(e: InvalidFilter) -> Self {
        SnapshotError::InvalidArgument(e.to_string())
    }
}

/// Parsed filters: an OR of ANDs.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

/// What a filter is matched against.
pub trait Fields {
    /// The value at `path`, if present.
    fn field(&self, path: &[String]) -> Option<String>;
}

impl Filter {
    pub fn parse(filters: &[String]) -> Result<Self, InvalidFilter> {
        let mut any = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            any.push(parse_all(f).map_err(|source| InvalidFilter {
                filter: f.clone(),
                source,
            })?);
        }
        Ok(Self { any })
    }

    pub fn matches(&self, item: &impl Fields) -> bool {
        if self.any.is_empty() {
            return true;
        }
        self.any.iter().any(|all| all.iter().all(|s| matches_one(s, item)))
    }
}

fn matches_one(s: &Selector, item: &impl Fields) -> bool {
    let value = item.field(&s.path);
    match &s.op {
        Op::Present => value.is_some_and(|v| !v.is_empty()),
        Op::Eq(want) => value.as_deref() == Some(want.as_str()),
        Op::Ne(want) => value.as_deref() != Some(want.as_str()),
        Op::Matches(re) => match (value, regex_lite::Regex::new(re)) {
            (Some(v), Ok(r)) => r.is_match(&v),
            _ => false,
        },
    }
}

struct Scanner<'a> {
    s: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn quoted(&mut self) -> Result<String, FilterError> {
        let quote = self.peek().ok_or(FilterError::UnexpectedEnd)?;
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'\\' => {
                    let next = self.peek().ok_or(FilterError::UnterminatedEscape)?;
                    self.i += 1;
                    out.push(next);
                }
                c if c == quote => return String::from_utf8(out).map_err(FilterError::NotUtf8),
                c => out.push(c),
            }
        }
        Err(FilterError::UnterminatedQuote)
    }

    fn field(&mut self) -> Result<String, FilterError> {
        if matches!(self.peek(), Some(b'"' | b'`')) {
            return self.quoted();
        }
        let start = self.i;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'/') {
            self.i += 1;
        }
        if start == self.i {
            return Err(FilterError::ExpectedField(self.i));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn value(&mut self, regex: bool) -> Result<String, FilterError> {
        self.skip_ws();
        match self.peek() {
            Some(b'"' | b'`') => return self.quoted(),
            // Regular expressions may also be delimited as /re/ or |re|.
            Some(b'/' | b'|') if regex => return self.quoted(),
            _ => {}
        }
        let start = self.i;
        while matches!(self.peek(), Some(c) if c != b',' && c != b' ') {
            self.i += 1;
        }
        if start == self.i {
            return Err(FilterError::ExpectedValue(self.i));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
}

fn parse_all(f: &str) -> Result<Vec<Selector>, FilterError> {
    let mut sc = Scanner { s: f.as_bytes(), i: 0 };
    let mut out = Vec::new();
    loop {
        sc.skip_ws();
        let mut path = vec![sc.field()?];
        while sc.peek() == Some(b'.') {
            sc.i += 1;
            path.push(sc.field()?);
        }
        sc.skip_ws();
        let op = match (sc.peek(), sc.s.get(sc.i + 1)) {
            (Some(b'='), Some(b'=')) => {
                sc.i += 2;
                Op::Eq(sc.value(false)?)
            }
            (Some(b'!'), Some(b'=')) => {
                sc.i += 2;
                Op::Ne(sc.value(false)?)
            }
            (Some(b'~'), Some(b'=')) => {
                sc.i += 2;
                let re = sc.value(true)?;
                if let Err(source) = regex_lite::Regex::new(&re) {
                    return Err(FilterError::Regex { re, source });
                }
                Op::Matches(re)
            }
            (None | Some(b','), _) => Op::Present,
            (Some(c), _) => {
                return Err(FilterError::Unexpected {
                    found: c as char,
                    at: sc.i,
                })
            }
        };
        out.push(Selector { path, op });
        sc.skip_ws();
        match sc.peek() {
            None => return Ok(out),
            Some(b',') => sc.i += 1,
            Some(c) => {
                return Err(FilterError::Unexpected {
                    found: c as char,
                    at: sc.i,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Item(BTreeMap<&'static str, &'static str>, &'static str);

    impl Fields for Item {
        fn field(&self, path: &[String]) -> Option<String> {
            match path {
                [f] if f == "name" => Some(self.1.to_string()),
                [l, k] if l == "labels" => self.0.get(k.as_str()).map(|v| v.to_string()),
                _ => None,
            }
        }
    }

    fn item() -> Item {
        Item(BTreeMap::from([("containerd.io/gc.root", "x"), ("a", "b")]), "snap-1")
    }

    #[test]
    fn quoted_label_presence() {
        let f = Filter::parse(&[r#"labels."containerd.io/gc.root""#.into()]).unwrap();
        assert!(f.matches(&item()));
    }

    #[test]
    fn comma_is_and_and_separate_filters_are_or() {
        let and = Filter::parse(&["name==snap-1,labels.a==c".into()]).unwrap();
        assert!(!and.matches(&item()));
        let or = Filter::parse(&["name==other".into(), "labels.a==b".into()]).unwrap();
        assert!(or.matches(&item()));
    }

    #[test]
    fn not_equal_and_regex() {
        assert!(Filter::parse(&["name!=x".into()]).unwrap().matches(&item()));
        assert!(Filter::parse(&["name~=^snap-[0-9]+$".into()]).unwrap().matches(&item()));
    }

    #[test]
    fn regex_delimiters_and_empty_quoted_values() {
        assert!(Filter::parse(&["name~=/^snap/".into()]).unwrap().matches(&item()));
        assert!(Filter::parse(&["name~=|-1$|".into()]).unwrap().matches(&item()));
        assert!(!Filter::parse(&["name==\"\"".into()]).unwrap().matches(&item()));
    }

    #[test]
    fn malformed_filters_are_invalid_arguments() {
        assert!(Filter::parse(&["name==".into()]).is_err());
        assert!(matches!(
            Filter::parse(&["name=x".into()]).map_err(SnapshotError::from),
            Err(SnapshotError::InvalidArgument(_))
        ));
        assert!(Filter::parse(&["labels.\"open".into()]).is_err());
    }
}
