//! A fault-injecting HTTP proxy in front of the real registry: the "registry the
//! test controls". It forwards each request (one per connection) and can answer
//! with an error status, truncate, corrupt or trickle bodies, redirect, or demand basic auth.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// What to do to requests whose URI contains a pattern.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and an empty body, `times` times (then forward normally).
    Status {
        code: u16,
        times: u32,
        retry_after: Option<u32>,
    },
    /// Send only the first `keep` bytes of the body, then close.
    Truncate { keep: usize },
    /// Flip one byte in the middle of the body.
    FlipByte,
    /// Serve a tampered blob: the byte at this blob offset flipped, in every
    /// response that holds it (whole or ranged: `Content-Range` is honoured).
    FlipAt(u64),
    /// Replace the body.
    Garbage(Vec<u8>),
    /// Answer 307 to `/redirected<uri>`, which is then forwarded.
    Redirect,
    /// Answer 307 to `http://<host:port>/redirected<uri>` (another address of this proxy).
    RedirectTo(String),
    /// Send the headers, then one byte of the body every `every` (a stalled registry).
    Stall { every: std::time::Duration },
    /// Send `len` zero bytes (declared in Content-Length when `declare`, else
    /// ended by closing) unless the client hangs up first.
    Endless { len: u64, declare: bool },
}

#[derive(Default)]
struct State {
    rules: Vec<(String, Fault)>,
    /// Basic credentials required on every non-redirected request, if set.
    basic_auth: Option<String>,
    /// Authorization header (if any) of each request that arrived at a redirect target.
    redirected_auth: Vec<Option<String>>,
    /// Bearer mode: tokens issued (value, expiry) by `/token`, which wants these basic credentials.
    bearer: Option<Bearer>,
}

struct Bearer {
    basic: String,
    /// Also accepted at `/token`: a POST with `grant_type=refresh_token` and this refresh token.
    refresh_token: Option<String>,
    lifetime: std::time::Duration,
    /// `expires_in` told to clients, when not the real lifetime (a server that lies).
    stated: Option<u64>,
    /// Requests that came with a token this server issued and that had expired.
    expired_seen: usize,
    issued: Vec<(String, std::time::Instant)>,
}

/// The proxy; stops accepting when dropped (its listener thread ends with the test process).
pub struct FaultProxy {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream` ("127.0.0.1:PORT").
    pub fn start(upstream: &str) -> FaultProxy {
        Self::start_on("127.0.0.1", upstream)
    }

    /// Like `start`, listening on `ip` ("0.0.0.0": every address of the machine).
    pub fn start_on(ip: &str, upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let (s, up) = (state.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, up) = (s.clone(), up.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &up, &s);
                });
            }
        });
        FaultProxy { port, state }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Adds a fault for URIs containing `pattern` (the first matching rule applies).
    pub fn set(&self, pattern: &str, fault: Fault) {
        self.state.lock().unwrap().rules.push((pattern.to_string(), fault));
    }

    /// Removes all faults.
    pub fn clear(&self) {
        self.state.lock().unwrap().rules.clear();
    }

    /// Requires `Authorization: Basic base64(user:pass)` (given already encoded).
    pub fn require_basic_auth(&self, encoded: &str) {
        self.state.lock().unwrap().basic_auth = Some(format!("Basic {encoded}"));
    }

    /// Requires bearer tokens from this proxy's `/token` endpoint (which itself
    /// wants `Basic encoded`), each valid for `lifetime`.
    pub fn require_bearer(&self, encoded: &str, lifetime: std::time::Duration) {
        self.state.lock().unwrap().bearer = Some(Bearer {
            basic: format!("Basic {encoded}"),
            refresh_token: None,
            lifetime,
            stated: None,
            expired_seen: 0,
            issued: Vec::new(),
        });
    }

    /// In bearer mode, `/token` also takes this OAuth2 refresh token (docker's identity token)
    /// in a form POST, as distribution's token servers do.
    pub fn accept_refresh_token(&self, token: &str) {
        let mut st = self.state.lock().unwrap();
        st.bearer.as_mut().expect("require_bearer first").refresh_token = Some(token.to_string());
    }

    /// In bearer mode, tell clients tokens live `secs` whatever their real lifetime.
    pub fn state_lifetime(&self, secs: u64) {
        self.state
            .lock()
            .unwrap()
            .bearer
            .as_mut()
            .expect("require_bearer first")
            .stated = Some(secs);
    }

    /// In bearer mode: requests refused because their token had expired.
    pub fn expired_tokens_seen(&self) -> usize {
        self.state.lock().unwrap().bearer.as_ref().map_or(0, |b| b.expired_seen)
    }

    /// How many tokens `/token` has issued.
    pub fn tokens_issued(&self) -> usize {
        self.state.lock().unwrap().bearer.as_ref().map_or(0, |b| b.issued.len())
    }

    /// Authorization headers seen on redirect targets.
    pub fn redirected_auth(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().redirected_auth.clone()
    }
}

/// Request line, lower-cased headers, body.
type Request = (String, Vec<(String, String)>, Vec<u8>);

fn read_head(conn: &mut TcpStream) -> std::io::Result<Request> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    Ok((first, headers, body))
}

fn respond(conn: &mut TcpStream, status: u16, extra: &[(&str, String)], body: &[u8]) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

fn handle(mut conn: TcpStream, upstream: &str, state: &Mutex<State>) -> std::io::Result<()> {
    let (first, headers, body) = read_head(&mut conn)?;
    let mut parts = first.split(' ');
    let (method, mut uri) = (
        parts.next().unwrap_or("GET").to_string(),
        parts.next().unwrap_or("/").to_string(),
    );
    let auth = headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone());
    let redirected = uri.starts_with("/redirected/");
    if redirected {
        uri = uri.trim_start_matches("/redirected").to_string();
        state.lock().unwrap().redirected_auth.push(auth.clone());
    } else if let Some(answer) = bearer_check(state, &uri, auth.as_deref(), &headers, &body) {
        return answer(&mut conn);
    } else if let Some(required) = state.lock().unwrap().basic_auth.clone() {
        if auth.as_deref() != Some(required.as_str()) {
            return respond(
                &mut conn,
                401,
                &[("WWW-Authenticate", "Basic realm=\"test\"".into())],
                b"",
            );
        }
    }
    let fault = {
        let mut st = state.lock().unwrap();
        let found = st.rules.iter_mut().find(|(p, _)| uri.contains(p.as_str()));
        match found {
            Some((_, Fault::Status { times, .. })) if *times == 0 => None,
            Some((_, f)) => {
                let out = f.clone();
                if let Fault::Status { times, .. } = f {
                    *times -= 1;
                }
                Some(out)
            }
            None => None,
        }
    };
    match &fault {
        Some(Fault::Status { code, retry_after, .. }) => {
            let extra: Vec<(&str, String)> = retry_after.iter().map(|s| ("Retry-After", s.to_string())).collect();
            return respond(&mut conn, *code, &extra, b"");
        }
        Some(Fault::Redirect) if !redirected => {
            return respond(&mut conn, 307, &[("Location", format!("/redirected{uri}"))], b"");
        }
        Some(Fault::RedirectTo(host)) if !redirected => {
            let to = format!("http://{host}/redirected{uri}");
            return respond(&mut conn, 307, &[("Location", to)], b"");
        }
        _ => {}
    }
    let mut up = TcpStream::connect(upstream)?;
    let mut req = format!("{method} {uri} HTTP/1.1\r\n");
    for (k, v) in &headers {
        if k != "connection" && k != "authorization" {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    up.write_all(req.as_bytes())?;
    up.write_all(&body)?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(resp.len());
    let (head, mut payload) = (resp[..split].to_vec(), resp[split..].to_vec());
    match fault {
        Some(Fault::Stall { every }) => {
            conn.write_all(&head)?;
            // Ends when the client gives up (the write fails) or the body is sent.
            for b in payload {
                conn.write_all(&[b])?;
                conn.flush()?;
                std::thread::sleep(every);
            }
            return Ok(());
        }
        Some(Fault::Truncate { keep }) => {
            conn.write_all(&head)?;
            return conn.write_all(&payload[..keep.min(payload.len())]);
        }
        Some(Fault::FlipByte) if !payload.is_empty() => {
            let i = payload.len() / 2;
            payload[i] ^= 0x55;
        }
        Some(Fault::FlipAt(offset)) => {
            if let Some(i) = body_index(&head, offset).filter(|i| *i < payload.len()) {
                payload[i] ^= 0x55;
            }
        }
        Some(Fault::Garbage(g)) => {
            let text = String::from_utf8_lossy(&head).into_owned();
            let mut lines: Vec<String> = text.trim_end().split("\r\n").map(str::to_string).collect();
            lines.retain(|l| !l.to_ascii_lowercase().starts_with("content-length"));
            lines.push(format!("Content-Length: {}", g.len()));
            conn.write_all(format!("{}\r\n\r\n", lines.join("\r\n")).as_bytes())?;
            return conn.write_all(&g);
        }
        Some(Fault::Endless { len, declare }) => {
            let text = String::from_utf8_lossy(&head).into_owned();
            let mut lines: Vec<String> = text.trim_end().split("\r\n").map(str::to_string).collect();
            lines.retain(|l| !l.to_ascii_lowercase().starts_with("content-length"));
            if declare {
                lines.push(format!("Content-Length: {len}"));
            }
            conn.write_all(format!("{}\r\n\r\n", lines.join("\r\n")).as_bytes())?;
            let zeros = vec![0u8; 1 << 20];
            let mut sent = 0u64;
            while sent < len {
                let n = zeros.len().min((len - sent) as usize);
                conn.write_all(&zeros[..n])?;
                sent += n as u64;
            }
            return Ok(());
        }
        _ => {}
    }
    conn.write_all(&head)?;
    conn.write_all(&payload)
}

/// Where blob byte `offset` lies in a response body with this head: at
/// `offset` in a 200, at `offset - start` in a 206 whose range holds it.
fn body_index(head: &[u8], offset: u64) -> Option<usize> {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let status = text.split(' ').nth(1)?;
    match status {
        "200" => usize::try_from(offset).ok(),
        "206" => {
            let range = text.lines().find_map(|l| l.strip_prefix("content-range:"))?;
            let (start, end) = range
                .trim()
                .strip_prefix("bytes ")?
                .split('/')
                .next()?
                .split_once('-')?;
            let (start, end): (u64, u64) = (start.parse().ok()?, end.parse().ok()?);
            (start..=end).contains(&offset).then(|| (offset - start) as usize)
        }
        _ => None,
    }
}

type Answer = Box<dyn FnOnce(&mut TcpStream) -> std::io::Result<()>>;

/// In bearer mode: serves `/token`, and challenges requests without a live token.
fn bearer_check(
    state: &Mutex<State>,
    uri: &str,
    auth: Option<&str>,
    headers: &[(String, String)],
    body: &[u8],
) -> Option<Answer> {
    let mut st = state.lock().unwrap();
    let b = st.bearer.as_mut()?;
    if uri.starts_with("/token") {
        let form = String::from_utf8_lossy(body);
        let refreshed = b.refresh_token.as_ref().is_some_and(|t| {
            form.split('&').any(|kv| kv == "grant_type=refresh_token")
                && form.split('&').any(|kv| kv == format!("refresh_token={t}"))
        });
        if auth != Some(b.basic.as_str()) && !refreshed {
            return Some(Box::new(|c| respond(c, 401, &[], b"")));
        }
        let token = format!("tok-{}", b.issued.len());
        b.issued.push((token.clone(), std::time::Instant::now() + b.lifetime));
        // An OAuth2 answer names it access_token.
        let key = if refreshed { "access_token" } else { "token" };
        let stated = b.stated.unwrap_or(b.lifetime.as_secs());
        let body = format!(r#"{{"{key}":"{token}","expires_in":{stated}}}"#);
        return Some(Box::new(move |c| {
            respond(c, 200, &[("Content-Type", "application/json".into())], body.as_bytes())
        }));
    }
    let known = auth
        .and_then(|a| a.strip_prefix("Bearer "))
        .and_then(|t| b.issued.iter().find(|(v, _)| v == t));
    match known {
        Some((_, exp)) if *exp > std::time::Instant::now() => return None,
        Some(_) => b.expired_seen += 1,
        None => {}
    }
    let host = headers
        .iter()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let challenge = format!(r#"Bearer realm="http://{host}/token",service="test-registry",scope="repository:x:pull""#);
    Some(Box::new(move |c| {
        respond(c, 401, &[("WWW-Authenticate", challenge)], b"")
    }))
}
