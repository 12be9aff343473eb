//! Pages driven in a real headless Chromium through ChromeDriver (`fantoccini`).
//!
//! Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian's chromium and chromium-driver;
//! `./dev test` installs them). Each [`open_browser`] starts its own chromedriver on a free port
//! with a fresh profile directory; a guard kills it (and the browser it started) even when the test
//! panics. One browser runs at a time ([`ONE_BROWSER`]): the machine has two cores. Waits poll with
//! a bound ([`WAIT`]) and never assert on timing. Screenshots go to
//! `target/browser-artifacts/<name>-<step>.png`, and a failure leaves `<name>-failure.png`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long any wait on the page lasts before the test fails: generous, never a time target.
pub const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
/// A phone's viewport (CSS pixels).
pub const PHONE: (u32, u32) = (390, 844);
pub const DESKTOP: (u32, u32) = (1280, 900);

/// One Chromium at a time: each is several processes, and the tests share two cores. Hold the
/// guard for the whole test.
pub static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `target/browser-artifacts/` (under `CARGO_TARGET_DIR` when set), created if needed.
pub fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("browser-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/browser-artifacts");
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

/// A running chromedriver (in its own process group, with the browsers it starts) and the
/// browser profile directory; both go away on drop, also when the test panics.
struct Driver {
    child: Child,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium processes it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The browser session of one test, with its screenshots and failure reports.
pub struct Page {
    pub client: Client,
    name: String,
    dir: PathBuf,
    // Dropped after `client` (fields drop in order), so the session ends before its driver.
    _driver: Driver,
}

/// Starts chromedriver and a headless Chromium with a `width`×`height` window. `name` prefixes
/// the artifacts (`<name>-<step>.png`, `<name>-chromedriver.log`).
pub async fn open_browser(name: &str, (width, height): (u32, u32)) -> Page {
    for bin in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: install Debian's chromium and chromium-driver (./dev test does)"
        );
    }
    let dir = artifacts_dir();
    let profile = std::env::temp_dir().join(format!(
        "floodgate-browser-{name}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&profile).expect("create the browser profile directory");
    let port = free_port();
    let log = std::fs::File::create(dir.join(format!("{name}-chromedriver.log")))
        .expect("create the chromedriver log");
    let child = {
        use std::os::unix::process::CommandExt;
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start chromedriver")
    };
    let driver = Driver { child, profile };

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let until = Instant::now() + WAIT;
    while TcpStream::connect_timeout(&addr, POLL).is_err() {
        assert!(
            Instant::now() < until,
            "chromedriver did not listen on {addr}"
        );
        tokio::time::sleep(POLL).await;
    }

    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage",
                format!("--user-data-dir={}", driver.profile.display()),
                format!("--window-size={width},{height}"),
            ],
        },
    });
    let Value::Object(caps) = caps else {
        unreachable!("a json! object literal")
    };
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://{addr}"))
        .await
        .expect("a ChromeDriver session");
    client
        .set_window_size(width, height)
        .await
        .expect("set the window size");
    Page {
        client,
        name: name.to_owned(),
        dir,
        _driver: driver,
    }
}

impl Page {
    pub async fn goto(&self, url: &str) {
        if let Err(e) = self.client.goto(url).await {
            self.fail(&format!("open {url}: {e}")).await;
        }
    }

    /// Reloads the page, as the fan's refresh button would.
    pub async fn reload(&self) {
        if let Err(e) = self.client.refresh().await {
            self.fail(&format!("reload: {e}")).await;
        }
    }

    /// Saves a PNG of the viewport as `<name>-<step>.png`.
    pub async fn shot(&self, step: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let path = self.dir.join(format!("{}-{step}.png", self.name));
        std::fs::write(&path, png).expect("write screenshot");
    }

    /// Panics with `what`, the page's address and visible text, and a `<name>-failure.png`.
    pub async fn fail(&self, what: &str) -> ! {
        let _ =
            self.client.screenshot().await.map(|png| {
                std::fs::write(self.dir.join(format!("{}-failure.png", self.name)), png)
            });
        let url = self
            .client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default();
        let body = self.body_text().await;
        panic!("{what}\n--- page {url} ---\n{body}");
    }

    pub async fn body_text(&self) -> String {
        match self.client.find(Locator::Css("body")).await {
            Ok(b) => b.text().await.unwrap_or_default(),
            Err(e) => format!("(no body: {e})"),
        }
    }

    /// Waits (bounded) until `css` matches an element; use `:not([hidden])` for shown sections.
    pub async fn el(&self, css: &str) -> Element {
        match self
            .client
            .wait()
            .at_most(WAIT)
            .every(POLL)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(el) => el,
            Err(e) => self.fail(&format!("waiting for `{css}`: {e}")).await,
        }
    }

    pub async fn click(&self, css: &str) {
        let el = self.el(css).await;
        if let Err(e) = el.click().await {
            self.fail(&format!("click `{css}`: {e}")).await;
        }
    }

    /// Replaces the value of the input `css` with `text`, as typed.
    pub async fn fill(&self, css: &str, text: &str) {
        let el = self.el(css).await;
        if let Err(e) = el.clear().await {
            self.fail(&format!("clear `{css}`: {e}")).await;
        }
        if let Err(e) = el.send_keys(text).await {
            self.fail(&format!("type into `{css}`: {e}")).await;
        }
    }

    pub async fn text(&self, css: &str) -> String {
        let el = self.el(css).await;
        el.text().await.unwrap_or_default()
    }

    /// An attribute of the element `css` (empty when absent).
    pub async fn attr(&self, css: &str, name: &str) -> String {
        let el = self.el(css).await;
        el.attr(name).await.ok().flatten().unwrap_or_default()
    }

    /// How far the page is wider than the window, in CSS pixels (≤ 0: it never scrolls
    /// sideways, what a phone-width smoke test asks).
    pub async fn sideways_overflow_px(&self) -> i64 {
        let js = "return document.documentElement.scrollWidth - window.innerWidth;";
        match self.client.execute(js, vec![]).await {
            Ok(v) => v.as_i64().unwrap_or(i64::MAX),
            Err(e) => self.fail(&format!("measure the page's width: {e}")).await,
        }
    }

    pub async fn css(&self, css: &str, property: &str) -> String {
        let el = self.el(css).await;
        el.css_value(property).await.unwrap_or_default()
    }

    /// Polls (bounded) the visible text of `css` until `ok` accepts it; returns that text.
    pub async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + WAIT;
        let mut last = String::new();
        while Instant::now() < until {
            if let Ok(el) = self.client.find(Locator::Css(css)).await {
                last = el.text().await.unwrap_or_default();
                if ok(&last) {
                    return last;
                }
            }
            tokio::time::sleep(POLL).await;
        }
        self.fail(&format!(
            "waiting for {what} in `{css}`; last text {last:?}"
        ))
        .await
    }

    /// Polls (bounded) the page's address until `ok` accepts it; returns it.
    pub async fn wait_url(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + WAIT;
        let mut last = String::new();
        while Instant::now() < until {
            if let Ok(u) = self.client.current_url().await {
                last = u.to_string();
                if ok(&last) {
                    return last;
                }
            }
            tokio::time::sleep(POLL).await;
        }
        self.fail(&format!("waiting for {what}; last address {last}"))
            .await
    }

    /// The value the page keeps in `localStorage` under `key` (None when absent).
    pub async fn local_storage(&self, key: &str) -> Option<String> {
        let v = self
            .client
            .execute(
                "return window.localStorage.getItem(arguments[0]);",
                vec![json!(key)],
            )
            .await
            .expect("read localStorage");
        v.as_str().map(str::to_owned)
    }

    /// Ends the session, then stops its chromedriver and browser.
    pub async fn close(self) {
        let Page {
            client, _driver, ..
        } = self;
        let _ = client.close().await;
        drop(_driver);
    }
}
