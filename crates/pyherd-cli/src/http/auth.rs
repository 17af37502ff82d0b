//! Bearer-token access: with a token set, every request but the open paths must carry
//! `Authorization: Bearer <token>`; anything else is a 401 with the usual error object.

use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::execute::request_id;

/// Paths answered without a token: liveness, and the dashboard's page itself (it holds no
/// data; the endpoints it reads from are guarded).
pub(crate) const OPEN_PATHS: [&str; 2] = ["/healthz", "/"];
/// Fewest characters a token may have.
pub(crate) const MIN_TOKEN_LEN: usize = 16;
/// Most characters a token may have (it travels in a header).
pub(crate) const MAX_TOKEN_LEN: usize = 1024;

/// The server's token, kept as its SHA-256 digest: a presented token is hashed and the
/// two digests compared in constant time, so neither the token's content nor its length
/// shows in the time an answer takes.
#[derive(Clone)]
pub(crate) struct Token {
    digest: [u8; 32],
}

impl Token {
    /// A token of `MIN_TOKEN_LEN..=MAX_TOKEN_LEN` visible ASCII characters (no spaces).
    pub(crate) fn new(text: &str) -> Result<Self, String> {
        if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&text.len()) {
            return Err(format!(
                "the token must have {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN} characters, not {} \
                 (make one with `openssl rand -hex 32`)",
                text.len()
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be visible ASCII characters, without spaces".to_owned());
        }
        Ok(Self {
            digest: Sha256::digest(text.as_bytes()).into(),
        })
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.digest).into()
    }
}

/// Refuses a bind that would expose the API beyond this machine without a token, unless
/// `insecure` says that is wanted.
pub(crate) fn check_bind(addr: SocketAddr, has_token: bool, insecure: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || has_token || insecure {
        Ok(())
    } else {
        Err(format!(
            "refusing to listen on {addr} without a token: anyone who can reach it could run \
             the handlers. Set one with --token-file FILE, PYHERD_TOKEN or `token` in \
             pyherd.toml, bind a loopback address such as 127.0.0.1, or pass --insecure if \
             something else guards the port"
        ))
    }
}

/// The middleware: open paths pass; others need the bearer token.
pub(crate) async fn require_token(
    State(token): State<Token>,
    request: Request,
    next: Next,
) -> Response {
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let headers = request.headers();
    match headers.get(header::AUTHORIZATION) {
        None => unauthorized(
            headers,
            "Bearer realm=\"pyherd\"",
            "this server needs `Authorization: Bearer <token>`",
        ),
        Some(value) if bearer(value).is_some_and(|t| token.matches(t)) => next.run(request).await,
        Some(_) => unauthorized(
            headers,
            "Bearer realm=\"pyherd\", error=\"invalid_token\"",
            "the bearer token is not this server's",
        ),
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case).
fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let bytes = value.as_bytes();
    let (scheme, token) = bytes.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
}

/// The refusal, as an answer to the call the client named, if it named one.
fn unauthorized(headers: &HeaderMap, challenge: &'static str, message: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        .for_request(request_id(headers).ok().flatten().as_deref())
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef";

    #[test]
    fn only_the_same_token_matches() {
        let token = Token::new(SECRET).unwrap();
        assert!(token.matches(SECRET.as_bytes()));
        for other in [
            "",
            "0123456789abcde",
            "0123456789abcdeF",
            "0123456789abcdef0",
        ] {
            assert!(!token.matches(other.as_bytes()), "{other:?}");
        }
    }

    #[test]
    fn short_long_and_spaced_tokens_are_refused() {
        assert!(Token::new("short").err().unwrap().contains("16..=1024"));
        assert!(Token::new(&"x".repeat(MAX_TOKEN_LEN + 1)).is_err());
        let e = Token::new("0123456789 abcdef").err().unwrap();
        assert!(e.contains("visible ASCII"), "{e}");
        assert!(Token::new("0123456789abcdé0").is_err());
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        let value = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(bearer(&value("Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(&value("bearer  abc ")), Some(&b"abc"[..]));
        assert_eq!(bearer(&value("Basic abc")), None);
        assert_eq!(bearer(&value("Bearer")), None);
    }

    #[test]
    fn only_a_loopback_bind_needs_no_token() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(check_bind(at("127.0.0.1:7878"), false, false).is_ok());
        assert!(check_bind(at("127.8.9.1:1"), false, false).is_ok());
        assert!(check_bind(at("[::1]:7878"), false, false).is_ok());
        let e = check_bind(at("0.0.0.0:7878"), false, false).unwrap_err();
        assert!(
            e.contains("--token-file") && e.contains("--insecure"),
            "{e}"
        );
        assert!(check_bind(at("[::]:7878"), false, false).is_err());
        assert!(check_bind(at("0.0.0.0:7878"), true, false).is_ok());
        assert!(check_bind(at("0.0.0.0:7878"), false, true).is_ok());
    }
}
