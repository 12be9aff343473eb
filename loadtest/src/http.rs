//! A bare HTTP/1.1 keep-alive connection on hyper's low-level client: no pool, no spawned
//! connection task. The task that sends a request also drives the connection while it waits,
//! which saves a task wake-up per request — the load generator shares the CPU with the server
//! it measures, so every microsecond it spends is throughput the server doesn't get.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// Responses larger than this are an error: booking-api's answers are a few hundred bytes.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Pause after a failed connect, so a refusing server doesn't turn workers into busy loops.
const CONNECT_BACKOFF: Duration = Duration::from_millis(20);

/// Where booking-api listens, resolved once.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The `Host` header: the URL's authority.
    pub host: HeaderValue,
    /// A path prefix from the URL (empty for `http://host:port`), without a trailing slash.
    pub base_path: String,
}

impl Target {
    /// Parses `http://host[:port][/prefix]` and resolves the host.
    pub async fn resolve(url: &str) -> anyhow::Result<Self> {
        let (authority, base_path) = split_base_url(url)?;
        let addr = tokio::net::lookup_host(&authority)
            .await
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to no address"))?;
        let host = HeaderValue::from_str(&authority).context("host header")?;
        Ok(Self {
            addr,
            host,
            base_path,
        })
    }

    /// The origin-form URI of `path` (which starts with `/`).
    pub fn uri(&self, path: &str) -> anyhow::Result<Uri> {
        format!("{}{path}", self.base_path)
            .parse()
            .with_context(|| format!("bad request path {path:?}"))
    }

    /// A request with `Host`, and `Authorization`/`Content-Type` when given.
    pub fn request(
        &self,
        method: Method,
        uri: Uri,
        bearer: Option<&HeaderValue>,
        json_body: Option<Bytes>,
    ) -> Request<Full<Bytes>> {
        let has_body = json_body.is_some();
        let mut req = Request::new(Full::new(json_body.unwrap_or_default()));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(HOST, self.host.clone());
        if let Some(bearer) = bearer {
            headers.insert(AUTHORIZATION, bearer.clone());
        }
        if has_body {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        req
    }
}

/// `http://host:port/prefix/` → (`host:port`, `/prefix`). The port defaults to 80.
pub fn split_base_url(url: &str) -> anyhow::Result<(String, String)> {
    let uri: Uri = url
        .trim()
        .parse()
        .with_context(|| format!("bad URL {url:?}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("only http:// URLs are supported, not {other}://"),
        None => bail!("URL {url:?} has no scheme (expected http://host:port)"),
    }
    let authority = uri
        .authority()
        .with_context(|| format!("URL {url:?} has no host"))?;
    let host_port = match authority.port_u16() {
        Some(_) => authority.as_str().to_owned(),
        None => format!("{}:80", authority.as_str()),
    };
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((host_port, base_path))
}

/// Builds `Bearer <token>` as a header value, once per fan, so requests only clone it.
pub fn bearer(token: &str) -> anyhow::Result<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .context("token is not a valid header value")?;
    v.set_sensitive(true);
    Ok(v)
}

/// Why an exchange produced no answer. Only `Connect` means the request surely wasn't sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TransportError {
    /// Couldn't open the connection; the request was never written.
    Connect,
    /// No full answer within the request timeout.
    Timeout,
    /// The connection failed or closed while the request was in flight.
    Io,
}

impl TransportError {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Io => "io",
        }
    }

    /// The server may have acted on the request.
    pub fn outcome_unknown(self) -> bool {
        !matches!(self, Self::Connect)
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Driver = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// One keep-alive connection. `driver` must be polled for anything to move on the socket; the
/// methods below poll it alongside the request they are waiting for.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: Driver,
}

impl Conn {
    /// Connects from `source` (a loopback address such as 127.0.0.7, so a server's per-address
    /// limits see many clients, as in real life), or from wherever the OS picks.
    pub async fn connect_from(target: &Target, source: Option<Ipv4Addr>) -> std::io::Result<Self> {
        let stream = match (source, target.addr) {
            (Some(ip), SocketAddr::V4(_)) => {
                let socket = TcpSocket::new_v4()?;
                socket.bind(SocketAddrV4::new(ip, 0).into())?;
                socket.connect(target.addr).await?
            }
            _ => TcpStream::connect(target.addr).await?,
        };
        // Requests are small and latency-bound: don't let Nagle hold them back.
        stream.set_nodelay(true)?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        Ok(Self { sender, driver })
    }

    /// Waits until the connection can take a request. `false`: it is closed (the server hung up
    /// while idle, for instance) and must be replaced; nothing was sent.
    pub async fn ready(&mut self) -> bool {
        let Self { sender, driver } = self;
        tokio::select! {
            biased;
            r = sender.ready() => r.is_ok(),
            _ = driver => false,
        }
    }

    /// Sends `req` and reads the whole answer. On error the connection is unusable.
    pub async fn exchange(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), TransportError> {
        let Self { sender, driver } = self;
        let answer = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|_| TransportError::Io)?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, MAX_RESPONSE_BYTES);
            let bytes = body
                .collect()
                .await
                .map_err(|_| TransportError::Io)?
                .to_bytes();
            Ok((parts.status, bytes))
        };
        tokio::select! {
            biased;
            r = answer => r,
            // The driver only finishes when the connection is gone.
            _ = driver => Err(TransportError::Io),
        }
    }
}

/// A connection slot that reconnects on demand and after failures.
pub struct Slot {
    conn: Option<Conn>,
    timeout: Duration,
    source: Option<Ipv4Addr>,
}

impl Slot {
    pub fn new(timeout: Duration) -> Self {
        Self {
            conn: None,
            timeout,
            source: None,
        }
    }

    /// A slot whose connections leave from `source` ([`Conn::connect_from`]).
    pub fn from_source(timeout: Duration, source: Ipv4Addr) -> Self {
        Self {
            source: Some(source),
            ..Self::new(timeout)
        }
    }

    /// A connection ready for a request, opening a new one if needed (at most twice: an idle
    /// keep-alive connection may have been closed by the server, which is not an error).
    async fn ready(&mut self, target: &Target) -> Result<&mut Conn, TransportError> {
        for _ in 0..2 {
            if let Some(conn) = self.conn.as_mut() {
                if conn.ready().await {
                    break;
                }
                self.conn = None;
            }
            match tokio::time::timeout(self.timeout, Conn::connect_from(target, self.source)).await
            {
                Ok(Ok(conn)) => self.conn = Some(conn),
                Ok(Err(_)) | Err(_) => {
                    // Don't spin on a server that refuses connections.
                    tokio::time::sleep(CONNECT_BACKOFF).await;
                    return Err(TransportError::Connect);
                }
            }
        }
        self.conn.as_mut().ok_or(TransportError::Connect)
    }

    /// Opens the connection now if there is none (failures are left for the first request).
    pub async fn warm_up(&mut self, target: &Target) {
        let _ = self.ready(target).await;
    }

    /// Waits for a usable connection, then calls `build` (so timestamps taken in it are as close
    /// to the write as possible) and sends what it returns.
    pub async fn send<T>(
        &mut self,
        target: &Target,
        build: impl FnOnce() -> (Request<Full<Bytes>>, T),
    ) -> (Result<(StatusCode, Bytes), TransportError>, T) {
        let timeout = self.timeout;
        let conn = match self.ready(target).await {
            Ok(conn) => conn,
            Err(e) => {
                let (_, extra) = build();
                return (Err(e), extra);
            }
        };
        let (req, extra) = build();
        let result = match tokio::time::timeout(timeout, conn.exchange(req)).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout),
        };
        if result.is_err() {
            self.conn = None;
        }
        (result, extra)
    }
}

/// Percent-encodes one path segment (hold ids embed the drop id; be safe whatever they hold).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let unreserved = b.is_ascii_alphanumeric() || b"-._~:@!$&'()*+,;=".contains(&b);
        if unreserved {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_splits_into_authority_and_prefix() {
        assert_eq!(
            split_base_url("http://127.0.0.1:8080").unwrap(),
            ("127.0.0.1:8080".into(), String::new())
        );
        assert_eq!(
            split_base_url("http://localhost:8080/").unwrap(),
            ("localhost:8080".into(), String::new())
        );
        assert_eq!(
            split_base_url("http://example.test/api/").unwrap(),
            ("example.test:80".into(), "/api".into())
        );
        assert!(split_base_url("https://x:1").is_err());
        assert!(split_base_url("127.0.0.1:8080").is_err());
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(path_segment("d_01H:h_42"), "d_01H:h_42");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn only_connect_errors_mean_not_sent() {
        assert!(!TransportError::Connect.outcome_unknown());
        assert!(TransportError::Timeout.outcome_unknown());
        assert!(TransportError::Io.outcome_unknown());
    }
}
