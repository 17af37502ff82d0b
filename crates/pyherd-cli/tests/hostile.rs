//! Hostile input against a real `pyherd serve`, much of it over raw TCP: each is refused
//! with a clear answer (or the connection closed), and the server answers
//! `/v1/execute` correctly afterwards.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Server, execute, request, wait_until};
use reqwest::Method;
use serde_json::{Value, json};

/// How long a raw exchange may take before the test fails.
const READ_LIMIT: Duration = Duration::from_secs(30);

/// An HTTP answer read off a socket.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}\n{}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn kind(&self) -> String {
        self.json()["error"]["kind"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }
}

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.base.trim_start_matches("http://")).expect("connect");
    stream.set_read_timeout(Some(READ_LIMIT)).unwrap();
    stream
}

/// Reads one answer: the head, then `content-length` bytes of body (or up to EOF).
fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut data = Vec::new();
    let mut buf = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match stream.read(&mut buf) {
            Ok(0) => panic!(
                "closed before an answer: {:?}",
                String::from_utf8_lossy(&data)
            ),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) => panic!("no answer: {e}"),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut body = data[head_end + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let mut answer = Answer {
        status,
        head,
        body: Vec::new(),
    };
    let length = answer
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    while length.is_none_or(|n| body.len() < n) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    answer.body = body;
    answer
}

/// Sends `request` whole on a new connection and reads the answer.
fn exchange(server: &Server, request: &[u8]) -> Answer {
    let mut stream = connect(server);
    stream.write_all(request).expect("send");
    read_answer(&mut stream)
}

/// A POST of `body` to `path` with `headers` (each ending in CRLF).
fn post(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: pyherd\r\ncontent-length: {}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

fn get(path: &[u8]) -> Vec<u8> {
    [b"GET ", path, b" HTTP/1.1\r\nhost: pyherd\r\n\r\n"].concat()
}

/// The server answers a call correctly.
async fn still_serving(server: &Server) {
    let (code, body) = execute(
        server,
        json!({"command": "echo", "args": {"still": "here"}}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["result"], json!({"still": "here"}));
}

/// Waits until the connection is closed by the server (EOF or reset); how long it took.
fn wait_closed(stream: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("still open after {READ_LIMIT:?}")
            }
            Err(_) => return start.elapsed(),
        }
    }
}

/// Writes `bytes` one at a time every `pause` on a thread until stopped or refused.
fn trickle(mut stream: TcpStream, bytes: Vec<u8>, pause: Duration) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        for b in bytes {
            if stopped.load(Ordering::Relaxed) || stream.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(pause);
        }
    });
    stop
}

fn deep(levels: usize) -> String {
    format!("{}{}", "[".repeat(levels), "]".repeat(levels))
}

#[tokio::test]
async fn a_declared_huge_body_is_refused_before_it_is_sent() {
    let server = Server::start(&["--workers", "1", "--max-frame-bytes", "65536"]);
    let head = "POST /v1/execute HTTP/1.1\r\nhost: pyherd\r\ncontent-type: application/json\r\n\
                content-length: 1000000000\r\n\r\n";
    let answer = exchange(&server, head.as_bytes());
    assert_eq!(answer.status, 413, "{}", answer.head);
    let body = answer.json();
    assert_eq!(body["ok"], false);
    assert_eq!(body["error"]["category"], "invalid_request");
    assert_eq!(body["error"]["kind"], "payload_too_large");
    assert_eq!(body["error"]["context"]["limit_bytes"], 65536 + 4096);
    still_serving(&server).await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_while_it_arrives() {
    let server = Server::start(&["--workers", "1", "--max-frame-bytes", "65536"]);
    let mut stream = connect(&server);
    let head = "POST /v1/execute HTTP/1.1\r\nhost: pyherd\r\ntransfer-encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    // 4 MiB in 16 KiB chunks, until the server stops reading.
    std::thread::spawn(move || {
        let chunk = [b"4000\r\n".as_slice(), &[b' '; 0x4000], b"\r\n"].concat();
        for _ in 0..256 {
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let answer = read_answer(&mut stream);
    assert_eq!(answer.status, 413, "{}", answer.head);
    assert_eq!(answer.kind(), "payload_too_large");
    assert_eq!(answer.header("connection").as_deref(), Some("close"));
    still_serving(&server).await;
}

#[tokio::test]
async fn deeply_nested_json_is_a_400_and_costs_no_worker() {
    let server = Server::start(&["--workers", "1"]);
    let before = common::workers(&server).await;
    let nested_args = format!(r#"{{"command": "echo", "args": {}}}"#, deep(100_000));
    let cases = [
        ("/v1/execute", nested_args.clone()),
        ("/v1/execute", deep(100_000)),
        (
            "/v1/sessions",
            format!(r#"{{"metadata": {}}}"#, deep(100_000)),
        ),
        ("/v1/sessions/s1/execute", nested_args),
        (
            "/v1/execute",
            format!(r#"{{"command": "echo", "args": {}}}"#, deep(127)),
        ),
    ];
    for (path, body) in cases {
        let answer = exchange(&server, &post(path, "", body.as_bytes()));
        assert_eq!(answer.status, 400, "{path}: {}", answer.head);
        assert_eq!(answer.kind(), "malformed_request", "{path}");
        let message = answer.json()["error"]["message"].to_string();
        assert!(message.contains("127"), "{path}: {message}");
    }
    // Up to the limit, a body is read whole (the envelope is one level).
    let body = format!(r#"{{"command": "echo", "args": {}}}"#, deep(126));
    let answer = exchange(&server, &post("/v1/execute", "", body.as_bytes()));
    assert_eq!(answer.status, 200, "{}", answer.head);
    let body = format!(r#"{{"metadata": {}}}"#, deep(126));
    let answer = exchange(&server, &post("/v1/sessions", "", body.as_bytes()));
    assert_eq!(answer.status, 201, "{}", answer.head);
    assert_eq!(common::workers(&server).await, before, "a worker was lost");
    still_serving(&server).await;
}

#[tokio::test]
async fn json_a_worker_cannot_read_as_meant_is_a_400_and_costs_no_worker() {
    let server = Server::start(&["--workers", "1"]);
    let before = common::workers(&server).await;
    let cases = [
        (
            "/v1/execute",
            r#""\ud800""#,
            "lone surrogate escape (\\ud800)",
        ),
        ("/v1/execute", "[1e400]", "range of a double (1e400)"),
        (
            "/v1/execute",
            r#"{"n": 123456789012345678901234567890}"#,
            "beyond 64 bits (123456789012345678901234567890)",
        ),
        (
            "/v1/sessions/s1/execute",
            r#"{"q": "\udc00"}"#,
            "lone surrogate",
        ),
        ("/v1/stream", "[-1e999]", "range of a double"),
    ];
    for (path, args, words) in cases {
        let body = format!(r#"{{"command": "echo", "args": {args}, "idempotent": true}}"#);
        let answer = exchange(&server, &post(path, "", body.as_bytes()));
        assert_eq!(answer.status, 400, "{path} {args}: {}", answer.head);
        assert_eq!(answer.kind(), "malformed_request", "{path} {args}");
        let message = answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.starts_with("args: ") && message.contains(words),
            "{message}"
        );
    }
    // What the workers read exactly still passes: a surrogate pair, 64-bit integers.
    let (code, body) = execute(
        &server,
        json!({"command": "echo", "args": ["\u{1F600}", 18_446_744_073_709_551_615_u64, i64::MIN]}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["result"],
        json!(["\u{1F600}", 18_446_744_073_709_551_615_u64, i64::MIN])
    );
    assert_eq!(common::workers(&server).await, before, "a worker was lost");
    still_serving(&server).await;
}

#[tokio::test]
async fn invalid_utf8_is_refused_in_the_body_and_in_the_path() {
    let server = Server::start(&["--workers", "1"]);
    let answer = exchange(
        &server,
        &post(
            "/v1/execute",
            "",
            b"{\"command\": \"echo\", \"args\": \"\xff\xfe\"}",
        ),
    );
    assert_eq!(answer.status, 400, "{}", answer.head);
    assert_eq!(answer.kind(), "malformed_request");
    let answer = exchange(&server, &get(b"/v1/sessions/%FF%FE"));
    assert_eq!(answer.status, 400, "{}", answer.head);
    assert_eq!(answer.kind(), "malformed_request");
    // Raw bytes that are not a URI at all: the HTTP parser refuses them (empty body).
    let answer = exchange(&server, &get(b"/v1/sessions/\xff\xfe"));
    assert_eq!(answer.status, 400, "{}", answer.head);
    still_serving(&server).await;
}

#[tokio::test]
async fn a_head_sent_byte_by_byte_is_cut_off_and_an_idle_connection_closed() {
    let server = Server::start(&["--workers", "1", "--header-timeout-ms", "1000"]);
    let mut slow = connect(&server);
    slow.write_all(b"GET /healthz HTTP/1.1\r\nx-slow: ")
        .unwrap();
    // 300 bytes at 10 per second would take 30 s.
    let stop = trickle(
        slow.try_clone().unwrap(),
        vec![b'a'; 300],
        Duration::from_millis(100),
    );
    let mut idle = connect(&server);
    let slow_after = wait_closed(&mut slow);
    stop.store(true, Ordering::Relaxed);
    let idle_after = wait_closed(&mut idle);
    assert!(slow_after < Duration::from_secs(15), "{slow_after:?}");
    assert!(slow_after >= Duration::from_millis(900), "{slow_after:?}");
    assert!(idle_after < Duration::from_secs(15), "{idle_after:?}");
    still_serving(&server).await;
}

#[tokio::test]
async fn a_body_sent_byte_by_byte_is_answered_408() {
    let server = Server::start(&["--workers", "1", "--body-timeout-ms", "1000"]);
    let mut stream = connect(&server);
    let head = "POST /v1/execute HTTP/1.1\r\nhost: pyherd\r\ncontent-length: 300\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    let start = Instant::now();
    let stop = trickle(
        stream.try_clone().unwrap(),
        vec![b' '; 300],
        Duration::from_millis(100),
    );
    let answer = read_answer(&mut stream);
    stop.store(true, Ordering::Relaxed);
    let took = start.elapsed();
    assert_eq!(answer.status, 408, "{}", answer.head);
    assert_eq!(answer.kind(), "body_timeout");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    still_serving(&server).await;
}

#[tokio::test]
async fn a_head_over_the_limit_is_431() {
    let server = Server::start(&["--workers", "1", "--max-header-bytes", "4096"]);
    let call = |header: String| post("/v1/execute", &header, br#"{"command": "echo", "args": 1}"#);
    let answer = exchange(&server, &call(format!("x-big: {}\r\n", "a".repeat(3000))));
    assert_eq!(answer.status, 200, "{}", answer.head);
    let answer = exchange(&server, &call(format!("x-big: {}\r\n", "a".repeat(5000))));
    assert_eq!(answer.status, 431, "{}", answer.head);
    let many: String = (0..200).map(|i| format!("x-{i}: 1\r\n")).collect();
    let answer = exchange(&server, &call(many));
    assert_eq!(answer.status, 431, "{}", answer.head);
    still_serving(&server).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_connection_at_the_send_timeout() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--handlers",
        "pyherd_worker.testing",
        "--send-timeout-ms",
        "500",
        "--request-timeout-ms",
        "120000",
    ]);
    // Chunks of 100 kB without end, never read: the socket's buffers fill, then the
    // answer stalls.
    let mut stream = connect(&server);
    let body = br#"{"command":"count","args":{"to":1000000,"pad":100000}}"#;
    let head = "content-type: application/json\r\n";
    stream.write_all(&post("/v1/stream", head, body)).unwrap();
    let metrics = server.url("/metrics");
    let cancelled = "pyherd_requests_total{command=\"count\",outcome=\"cancelled\"} 1";
    wait_until(Duration::from_secs(20), "the stream to be given up", || {
        let metrics = metrics.clone();
        async move {
            let text = reqwest::get(metrics).await.unwrap().text().await.unwrap();
            text.contains(cancelled)
        }
    })
    .await;
    let stats = server.url("/v1/stats");
    wait_until(Duration::from_secs(5), "the worker to be free", || {
        let stats = stats.clone();
        async move { common::get_json(&stats).await["busy"] == 0 }
    })
    .await;
    wait_closed(&mut stream);
    still_serving(&server).await;
}

#[tokio::test]
async fn connections_over_the_limit_are_answered_503_at_once() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--max-connections",
        "2",
        "--header-timeout-ms",
        "60000",
    ]);
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect(&server)).collect();
    for stream in &mut held {
        stream.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    }
    let start = Instant::now();
    let answer = exchange(&server, &get(b"/healthz"));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(answer.status, 503, "{}", answer.head);
    let body = answer.json();
    assert_eq!(body["error"]["category"], "resource");
    assert_eq!(body["error"]["kind"], "too_many_connections");
    assert_eq!(body["error"]["retryable"], true);
    assert_eq!(answer.header("retry-after").as_deref(), Some("1"));
    // A held connection still gets its answer.
    held[0].write_all(b"host: pyherd\r\n\r\n").unwrap();
    assert_eq!(read_answer(&mut held[0]).status, 200);
    drop(held);
    let url = server.url("/v1/execute");
    wait_until(Duration::from_secs(15), "a free connection", || {
        let url = url.clone();
        async move {
            common::post_execute(url, json!({"command": "ping"}))
                .await
                .0
                == 200
        }
    })
    .await;
    still_serving(&server).await;
}

#[tokio::test]
async fn ids_with_path_tricks_are_refused() {
    let server = Server::start(&["--workers", "1"]);
    let long = "x".repeat(129);
    let tricks = [
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc",
        "%2e%2e",
        "%2E",
        "a%00b",
        "a%2Fb",
        "a%20b",
        "%C3%A9t%C3%A9",
        "%E2%80%AE",
        long.as_str(),
    ];
    for trick in tricks {
        // Raw requests: URL libraries would resolve `%2e%2e` before sending it.
        for (method, path) in [
            ("GET", format!("/v1/sessions/{trick}")),
            ("DELETE", format!("/v1/sessions/{trick}")),
            ("PATCH", format!("/v1/sessions/{trick}")),
            ("GET", format!("/v1/sessions/{trick}/programs/p")),
            ("GET", format!("/v1/sessions/s/programs/{trick}")),
            ("PUT", format!("/v1/programs/{trick}")),
            ("DELETE", format!("/v1/programs/{trick}")),
        ] {
            let body = br#"{"signature": "q -> a"}"#;
            let raw = [
                format!(
                    "{method} {path} HTTP/1.1\r\nhost: pyherd\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
                body,
            ]
            .concat();
            let answer = exchange(&server, &raw);
            assert_eq!(answer.status, 400, "{method} {path}: {}", answer.head);
            assert_eq!(answer.kind(), "invalid_id", "{method} {path}");
        }
        let path = format!("/v1/sessions/{trick}/execute");
        let answer = exchange(&server, &post(&path, "", br#"{"command": "ping"}"#));
        assert_eq!(answer.status, 400, "{path}: {}", answer.head);
    }
    for id in ["../x", "..", "a/b", "\u{0}", long.as_str()] {
        let (code, answer) = request(
            Method::POST,
            &server.url("/v1/sessions"),
            Some(json!({"session_id": id})),
        )
        .await;
        assert_eq!(code, 400, "{id:?}: {answer}");
        assert_eq!(answer["error"]["kind"], "invalid_id");
        let (code, answer) = execute(&server, json!({"command": "ping", "session_id": id})).await;
        assert_eq!(code, 400, "{id:?}: {answer}");
    }
    // A literal `..` segment names no route.
    let answer = exchange(&server, &get(b"/v1/sessions/../healthz"));
    assert_eq!(answer.status, 404, "{}", answer.head);
    assert_eq!(answer.kind(), "not_found");
    // The longest id is fine.
    let id = "x".repeat(128);
    let (code, answer) = request(
        Method::POST,
        &server.url("/v1/sessions"),
        Some(json!({"session_id": id})),
    )
    .await;
    assert_eq!(code, 201, "{answer}");
    still_serving(&server).await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let server = Server::start(&["--workers", "1"]);
    let body = br#"{"command": "echo", "args": 7}"#;
    for refused in [
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/xml",
    ] {
        let answer = exchange(
            &server,
            &post("/v1/execute", &format!("content-type: {refused}\r\n"), body),
        );
        assert_eq!(answer.status, 415, "{refused}: {}", answer.head);
        assert_eq!(answer.kind(), "unsupported_media_type");
    }
    for accepted in [
        "",
        "content-type: application/json; charset=utf-8\r\n",
        "content-type: application/x-www-form-urlencoded\r\n",
    ] {
        let answer = exchange(&server, &post("/v1/execute", accepted, body));
        assert_eq!(answer.status, 200, "{accepted:?}: {}", answer.head);
        assert_eq!(answer.json()["result"], 7);
    }
    still_serving(&server).await;
}

#[tokio::test]
async fn methods_a_route_does_not_take_are_405() {
    let server = Server::start(&["--workers", "1"]);
    for (method, path) in [
        ("DELETE", "/v1/execute"),
        ("GET", "/v1/execute"),
        ("PUT", "/v1/stats"),
        ("PATCH", "/healthz"),
        ("TRACE", "/v1/execute"),
        ("BREW", "/v1/workers"),
    ] {
        let raw = format!("{method} {path} HTTP/1.1\r\nhost: pyherd\r\ncontent-length: 0\r\n\r\n");
        let answer = exchange(&server, raw.as_bytes());
        assert_eq!(answer.status, 405, "{method} {path}: {}", answer.head);
        assert_eq!(answer.kind(), "method_not_allowed");
    }
    still_serving(&server).await;
}

#[tokio::test]
async fn only_registered_handlers_run_never_a_module_the_caller_names() {
    let server = Server::start(&["--workers", "1", "--handlers", "pyherd_worker.testing"]);
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let shell = format!("touch {}", marker.display());
    let requests = || async {
        common::get_json(&server.url("/v1/workers")).await["workers"][0]["requests"].clone()
    };
    let served = requests().await;
    for command in [
        "os.system",
        "__import__",
        "eval",
        "exec",
        "builtins.exec",
        "subprocess.run",
        "pyherd_worker.testing.sleep",
        "../x",
        "/bin/sh",
        "echo\0",
        "",
    ] {
        for args in [
            json!(shell),
            json!([shell]),
            json!({"cmd": shell, "module": "os"}),
        ] {
            let (code, body) = execute(&server, json!({"command": command, "args": args})).await;
            assert_eq!(code, 404, "{command:?}: {body}");
            assert_eq!(body["error"]["kind"], "unknown_command", "{command:?}");
        }
    }
    let (code, body) = execute(&server, json!({"command": "echo", "handlers": ["os"]})).await;
    assert_eq!(code, 400, "{body}");
    assert!(!marker.exists(), "a caller-named command ran");
    assert_eq!(
        requests().await,
        served,
        "a refused call reached the worker"
    );
    still_serving(&server).await;
}

#[test]
fn limits_out_of_range_refuse_to_start_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pyherd.toml");
    std::fs::write(&file, "max_header_bytes = 10\n").unwrap();
    let config = file.to_string_lossy().into_owned();
    let cases: [(&[&str], &str); 4] = [
        (&["--max-connections", "0"], "max_connections"),
        (&["--header-timeout-ms", "0"], "header_timeout_ms"),
        (&["--body-timeout-ms", "0"], "body_timeout_ms"),
        (&["--config", &config], "max_header_bytes"),
    ];
    for (args, key) in cases {
        let mut child = common::pyherd(None)
            .args(["serve", "--bind", "127.0.0.1:0", "--workers", "1"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let Some(status) = common::wait_exit(&mut child, Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pyherd serve {args:?} did not exit by itself");
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(key), "{args:?}: {stderr}");
    }
}
