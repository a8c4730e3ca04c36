//! The review console (issue 20): its auth, CSRF and headers over plain HTTP, and a real
//! headless Chromium (driven through chromedriver with fantoccini) that logs in, sees a pending
//! approval made through gRPC, approves it, and the resumed `AuthorizeToolCall` is allowed.
//!
//! Without `chromium` and `chromedriver` the browser test prints SKIPPED and passes, unless
//! `MISTGUARD_BROWSER_REQUIRED=1` (CI sets it: `.ci/run` installs Debian's `chromium` and
//! `chromium-driver`).

mod support;

use mistguard::daemon::pb::{self, guard_client::GuardClient};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{subject_req, within, Daemon, CSAM_PHRASE};
use tonic::transport::Channel;

const PLATFORM_TOKEN: &str = "admin-token-platform-0123456789";
const SECURITY_TOKEN: &str = "admin-token-security-0123456789";
const PROD: &str = r#"{"environment":"production","user_role":"admin"}"#;
/// The arguments of the call awaiting approval: text that must never reach the console.
const ARGS: &str = r#"{"statement":"SELECT * FROM invoices","database":"billing"}"#;

fn admin_tokens(dir: &Path) -> PathBuf {
    let path = dir.join("admin-tokens");
    std::fs::write(
        &path,
        format!("{PLATFORM_TOKEN} alice platform-team\n{SECURITY_TOKEN} bob security-team\n"),
    )
    .unwrap();
    path
}

fn call(approval_id: &str) -> pb::AuthorizeToolCallRequest {
    pb::AuthorizeToolCallRequest {
        tool: "execute_sql".into(),
        arguments_json: ARGS.into(),
        context_json: PROD.into(),
        subject: "agent-7".into(),
        approval_id: approval_id.into(),
        ..Default::default()
    }
}

async fn authorize(
    c: &mut GuardClient<Channel>,
    req: pb::AuthorizeToolCallRequest,
) -> pb::AuthorizeToolCallResponse {
    within(c.authorize_tool_call(req))
        .await
        .expect("authorize")
        .into_inner()
}

/// A daemon with the seed policies (`execute_sql` in production needs the platform team),
/// admin tokens, the console on a free port, and a low level-3 threshold.
async fn start(dir: &Path) -> Daemon {
    let tokens = admin_tokens(dir);
    let policies = support::manifest_path("policies/examples");
    Daemon::start(&[
        ("models", "off"),
        ("policies", policies.to_str().unwrap()),
        ("admin_tokens_file", tokens.to_str().unwrap()),
        ("console_listen", "127.0.0.1:0"),
        ("escalation.level3_subjects", "2"),
    ])
    .await
}

/// A pending approval, two suspended subjects (RULE-MIST-005 is level 2 on its first hit; two
/// raise the level-3 alert), and a few decisions. Returns the approval id.
async fn populate(d: &Daemon) -> String {
    let mut c = d.client().await;
    let first = authorize(&mut c, call("")).await;
    assert_eq!(first.decision, pb::ToolDecision::RequireApproval as i32);
    for subject in ["user-1", "user-2"] {
        let _ = within(c.classify(subject_req(
            &format!("please tell me: {CSAM_PHRASE}"),
            subject,
        )))
        .await;
    }
    let _ = within(c.classify(subject_req("hello there", "user-3"))).await;
    first.approval_id
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn json_of(r: reqwest::Response) -> Value {
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

/// No text content: neither the tool call's arguments nor the classified texts appear.
fn assert_no_text(body: &str) {
    for text in ["SELECT", "invoices", "billing", CSAM_PHRASE, "hello there"] {
        assert!(!body.contains(text), "{text:?} in {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_needs_a_token_and_its_actions_a_csrf_value() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let id = populate(&d).await;
    let base = format!("http://{}", d.console_addr.expect("console address"));
    let h = http();

    // The page: served without a token, with the strict headers.
    let r = h.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let hv = |r: &reqwest::Response, n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        hv(&r, "content-security-policy"),
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    );
    assert_eq!(hv(&r, "x-content-type-options"), "nosniff");
    assert_eq!(hv(&r, "referrer-policy"), "no-referrer");
    assert_eq!(hv(&r, "cache-control"), "no-store");
    let page = r.text().await.unwrap();
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "inline script or style"
    );
    for asset in ["/console.js", "/console.css"] {
        let r = h.get(format!("{base}{asset}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{asset}");
        assert!(hv(&r, "content-security-policy").starts_with("default-src 'none'"));
    }

    // No token, a wrong one, a Guard-style scheme: 401 with WWW-Authenticate, on every API.
    for path in [
        "/api/session",
        "/api/approvals",
        "/api/reviews",
        "/api/alerts",
        "/api/decisions",
    ] {
        for auth in [
            None,
            Some("Bearer not-an-admin-token-0000"),
            Some("Basic abc"),
        ] {
            let mut req = h.get(format!("{base}{path}"));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{path} {auth:?}");
            assert!(hv(&r, "www-authenticate").starts_with("Bearer"), "{path}");
            assert!(hv(&r, "content-security-policy").starts_with("default-src 'none'"));
        }
    }
    let decide_url = format!("{base}/api/approvals/{id}/decide");
    let r = h
        .post(&decide_url)
        .header("content-type", "application/json")
        .body(r#"{"approve":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The session: the admin's name and the CSRF value.
    let bearer = format!("Bearer {PLATFORM_TOKEN}");
    let s = json_of(
        h.get(format!("{base}/api/session"))
            .header("authorization", &bearer)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s["admin"], "alice");
    let csrf = s["csrf"].as_str().unwrap().to_string();
    assert_eq!(csrf.len(), 64);
    // Another admin's CSRF value differs.
    let other = json_of(
        h.get(format!("{base}/api/session"))
            .header("authorization", format!("Bearer {SECURITY_TOKEN}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let other_csrf = other["csrf"].as_str().unwrap().to_string();
    assert_ne!(other_csrf, csrf);

    // Actions without the CSRF value, with a wrong one, another admin's, cross-origin or
    // cross-site: 403. Not JSON: 415. Nothing is decided.
    let post = |csrf: Option<&str>| {
        let mut r = h
            .post(&decide_url)
            .header("authorization", &bearer)
            .header("content-type", "application/json")
            .body(r#"{"approve":true,"note":"ok"}"#);
        if let Some(c) = csrf {
            r = r.header("x-csrf-token", c.to_string());
        }
        r
    };
    for (what, req) in [
        ("no csrf", post(None)),
        ("wrong csrf", post(Some(&"0".repeat(64)))),
        ("another admin's csrf", post(Some(&other_csrf))),
        (
            "cross origin",
            post(Some(&csrf)).header("origin", "http://evil.example"),
        ),
        (
            "cross site",
            post(Some(&csrf)).header("sec-fetch-site", "cross-site"),
        ),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 403, "{what}");
    }
    let r = h
        .post(&decide_url)
        .header("authorization", &bearer)
        .header("x-csrf-token", &csrf)
        .header("content-type", "text/plain")
        .body(r#"{"approve":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let mut c = d.client().await;
    let r = authorize(&mut c, call(&id)).await;
    assert_eq!(
        r.decision,
        pb::ToolDecision::RequireApproval as i32,
        "{r:?}"
    );

    // The lists: the pending approval, the review queue, the alert, the counts. No text.
    let get = |path: &str| {
        h.get(format!("{base}{path}"))
            .header("authorization", &bearer)
            .send()
    };
    let ap = get("/api/approvals").await.unwrap().text().await.unwrap();
    assert_no_text(&ap);
    let ap: Value = serde_json::from_str(&ap).unwrap();
    let pending = ap["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["approval_id"] == id.as_str())
        .expect("the pending approval is listed");
    assert_eq!(pending["state"], "pending");
    assert_eq!(pending["tool"], "execute_sql");
    assert_eq!(pending["approvers"][0], "platform-team");
    let rv = get("/api/reviews").await.unwrap().text().await.unwrap();
    assert_no_text(&rv);
    let rv: Value = serde_json::from_str(&rv).unwrap();
    let reviews = rv["reviews"].as_array().unwrap();
    assert_eq!(reviews.len(), 2, "{rv}");
    assert_eq!(reviews[0]["rules"][0]["rule"], "RULE-MIST-005");
    assert_eq!(reviews[0]["decision_ids"].as_array().unwrap().len(), 1);
    let al = get("/api/alerts").await.unwrap().text().await.unwrap();
    assert_no_text(&al);
    let al: Value = serde_json::from_str(&al).unwrap();
    assert_eq!(al["alerts"][0]["cause"], "level2_subjects", "{al}");
    let dc = get("/api/decisions").await.unwrap().text().await.unwrap();
    assert_no_text(&dc);
    let dc: Value = serde_json::from_str(&dc).unwrap();
    let rules = dc["rules"].as_array().unwrap();
    let csam = rules
        .iter()
        .find(|r| r["rule"] == "RULE-MIST-005")
        .expect("RULE-MIST-005 counted");
    assert_eq!(csam["actions"]["block"], 2, "{dc}");

    // The security team may not decide a platform-team approval (the Admin service's check).
    let r = h
        .post(&decide_url)
        .header("authorization", format!("Bearer {SECURITY_TOKEN}"))
        .header("x-csrf-token", &other_csrf)
        .header("content-type", "application/json")
        .body(r#"{"approve":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // With everything right, same origin: approved by alice, and the resumed call is allowed.
    let r = post(Some(&csrf))
        .header("origin", base.clone())
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let a = json_of(r).await;
    assert_eq!(a["state"], "approved");
    assert_eq!(a["decided_by"], "alice");
    let r = authorize(&mut c, call(&id)).await;
    assert_eq!(r.decision, pb::ToolDecision::Allow as i32, "{r:?}");
    // Deciding again: 409.
    let r = post(Some(&csrf)).send().await.unwrap();
    assert_eq!(r.status(), 409);

    // Lift a suspension: CSRF checked too.
    let subject = reviews[0]["subject_hash"].as_str().unwrap();
    let lift_url = format!("{base}/api/reviews/{subject}/lift");
    let r = h
        .post(&lift_url)
        .header("authorization", &bearer)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = h
        .post(&lift_url)
        .header("authorization", &bearer)
        .header("x-csrf-token", &csrf)
        .header("content-type", "application/json")
        .body(r#"{"note":"false positive"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["lifted"], true);
    let rv = json_of(get("/api/reviews").await.unwrap()).await;
    assert_eq!(rv["reviews"].as_array().unwrap().len(), 1, "{rv}");
}

/// `console_listen` without `admin_tokens_file`: refused, in one line.
#[test]
fn the_console_needs_admin_tokens() {
    let mut flags = std::collections::HashMap::new();
    flags.insert("console_listen".to_string(), "127.0.0.1:0".to_string());
    let e = mistguard::daemon::Config::from_sources(&mistguard::daemon::Sources {
        flags,
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("admin_tokens_file"), "{e}");
    assert!(!e.to_string().contains('\n'));
}

/// chromedriver and chromium: found, or the reason they are not.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let find = |env: &str, names: &[&str]| -> Option<PathBuf> {
        if let Some(p) = std::env::var_os(env) {
            return Some(PathBuf::from(p)).filter(|p| p.is_file());
        }
        let path = std::env::var_os("PATH")?;
        names.iter().find_map(|n| {
            std::env::split_paths(&path)
                .map(|d| d.join(n))
                .find(|p| p.is_file())
        })
    };
    let driver = find("MISTGUARD_CHROMEDRIVER", &["chromedriver"])
        .ok_or("chromedriver is not installed (apt-get install -y chromium-driver)")?;
    let chromium = find(
        "MISTGUARD_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    )
    .ok_or("chromium is not installed (apt-get install -y chromium)")?;
    Ok((driver, chromium))
}

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Driver {
    fn start(path: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(path)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| support::manifest_path("target"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_logs_in_and_approves_a_pending_tool_call() {
    let (driver_path, chromium) = match browser() {
        Ok(b) => b,
        Err(why) => {
            if std::env::var("MISTGUARD_BROWSER_REQUIRED").as_deref() == Ok("1") {
                panic!("MISTGUARD_BROWSER_REQUIRED=1 but {why}");
            }
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let id = populate(&d).await;
    let url = format!("http://{}/", d.console_addr.unwrap());

    let driver = Driver::start(&driver_path);
    let profile = tempfile::tempdir().unwrap();
    let caps: serde_json::Map<String, Value> = serde_json::from_value(serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        },
    }))
    .unwrap();
    let b =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .expect("a WebDriver session with headless chromium");
    let result = drive(&b, &url, &id).await;
    let shot = b.screenshot().await;
    let _ = b.close().await;
    if let Ok(png) = shot {
        let path = target_dir().join("console-screenshot-after.png");
        let _ = std::fs::write(&path, png);
    }
    result.unwrap();

    // The approval was decided in the browser: the resumed call is allowed, once.
    let mut c = d.client().await;
    let r = authorize(&mut c, call(&id)).await;
    assert_eq!(r.decision, pb::ToolDecision::Allow as i32, "{r:?}");
    let r = authorize(&mut c, call(&id)).await;
    assert_eq!(r.decision, pb::ToolDecision::Deny as i32, "{r:?}");
    drop(driver);
}

async fn drive(b: &fantoccini::Client, url: &str, id: &str) -> Result<(), String> {
    use fantoccini::Locator;
    let e = |what: &str| {
        let what = what.to_string();
        move |err: fantoccini::error::CmdError| format!("{what}: {err}")
    };
    let wait = || b.wait().at_most(Duration::from_secs(20));
    b.goto(url).await.map_err(e("open the console"))?;
    // Signed out: the form, no data.
    let token = wait()
        .for_element(Locator::Css("#token"))
        .await
        .map_err(e("the login form"))?;
    token
        .send_keys(PLATFORM_TOKEN)
        .await
        .map_err(e("type the token"))?;
    b.find(Locator::Css("#login-button"))
        .await
        .map_err(e("the sign-in button"))?
        .click()
        .await
        .map_err(e("sign in"))?;
    let row_css = format!("tr.approval[data-approval-id='{id}']");
    let row = wait()
        .for_element(Locator::Css(&row_css))
        .await
        .map_err(e("the pending approval's row"))?;
    let text = row.text().await.map_err(e("row text"))?;
    if !text.contains("execute_sql") || !text.contains("platform-team") {
        return Err(format!("the row shows {text:?}"));
    }
    let name = b
        .find(Locator::Css("#admin-name"))
        .await
        .map_err(e("admin name"))?
        .text()
        .await
        .map_err(e("admin name"))?;
    if name != "alice" {
        return Err(format!("signed in as {name:?}"));
    }
    // The other panels have loaded: the review queue and the alert.
    wait()
        .for_element(Locator::Css("tr.review"))
        .await
        .map_err(e("the review queue"))?;
    let page = b.source().await.map_err(e("page source"))?;
    for text in ["SELECT", "invoices", CSAM_PHRASE] {
        if page.contains(text) {
            return Err(format!("the page shows text content {text:?}"));
        }
    }
    let png = b.screenshot().await.map_err(e("screenshot"))?;
    let path = target_dir().join("console-screenshot.png");
    std::fs::create_dir_all(path.parent().unwrap()).map_err(|x| x.to_string())?;
    std::fs::write(&path, png).map_err(|x| x.to_string())?;
    eprintln!("screenshot: {}", path.display());

    row.find(Locator::Css("button.approve"))
        .await
        .map_err(e("the Approve button"))?
        .click()
        .await
        .map_err(e("click Approve"))?;
    // The row leaves the pending list; the status line says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = b
            .find_all(Locator::Css(&row_css))
            .await
            .map_err(e("rows"))?;
        let status = b
            .find(Locator::Css("#status"))
            .await
            .map_err(e("status"))?
            .text()
            .await
            .map_err(e("status"))?;
        if left.is_empty() && status.contains("Approved") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after Approve: {} rows left, status {status:?}",
                left.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With `tls_cert` and `tls_key` the console is HTTPS, with the gRPC certificate; plain HTTP
/// gets no page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_https_with_the_grpc_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = admin_tokens(dir.path());
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let d = Daemon::start(&[
        ("models", "off"),
        ("admin_tokens_file", tokens.to_str().unwrap()),
        ("console_listen", "127.0.0.1:0"),
        ("tls_cert", cert.to_str().unwrap()),
        ("tls_key", key.to_str().unwrap()),
    ])
    .await;
    let port = d.console_addr.unwrap().port();
    let h = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", d.console_addr.unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let base = format!("https://localhost:{port}");
    let r = h.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("content-security-policy"));
    let r = h
        .get(format!("{base}/api/session"))
        .header("authorization", format!("Bearer {PLATFORM_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await["admin"], "alice");
    // Same-origin for the HTTPS origin: an action with `Origin: https://localhost:PORT` passes
    // the origin check (and fails only on the unknown approval: 404).
    let s = json_of(
        h.get(format!("{base}/api/session"))
            .header("authorization", format!("Bearer {PLATFORM_TOKEN}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let r = h
        .post(format!("{base}/api/approvals/{}/decide", "0".repeat(32)))
        .header("authorization", format!("Bearer {PLATFORM_TOKEN}"))
        .header("x-csrf-token", s["csrf"].as_str().unwrap())
        .header("content-type", "application/json")
        .header("origin", base.clone())
        .body(r#"{"approve":false}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let plain = http().get(format!("http://127.0.0.1:{port}/")).send().await;
    assert!(plain.map_or(true, |r| r.status() != 200));
}
