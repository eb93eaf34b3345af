//! A headless Chromium driven over WebDriver, for the console's tests:
//! Debian's `chromium` and `chromium-driver` (`scripts/services.sh`
//! installs them). [`Browser::start`] answers `None`, having printed why,
//! when they are missing, so a machine without them skips these tests
//! loudly rather than failing. Screenshots go under
//! `target/console-screenshots/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

use crate::eventually;

pub struct Browser {
    pub client: Client,
    driver: tokio::process::Child,
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Where screenshots are saved: `target/console-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("console-screenshots")
}

impl Browser {
    /// A fresh headless Chromium (its own profile, 1366×900), or `None`
    /// with the reason printed when Chromium or its driver is not here.
    pub async fn start() -> Option<Browser> {
        let Some(driver) = on_path("chromedriver") else {
            eprintln!(
                "SKIPPED: no chromedriver on PATH (apt-get install chromium chromium-driver; scripts/services.sh does)"
            );
            return None;
        };
        let Some(chromium) = on_path("chromium").or_else(|| on_path("chromium-browser")) else {
            eprintln!("SKIPPED: no chromium on PATH (apt-get install chromium chromium-driver)");
            return None;
        };
        let port = free_port();
        let driver = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver should start");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        eventually("chromedriver answers", Duration::from_secs(30), || async {
            let status = http.get(format!("{url}/status")).send().await.ok()?;
            status.status().is_success().then_some(())
        })
        .await;
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1366,900", "--no-first-run", "--disable-extensions",
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&url)
            .await
            .expect("chromium should start under chromedriver");
        Some(Browser { client, driver })
    }

    /// Saves what the page shows as `name`.png; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("screenshot written");
        eprintln!("screenshot: {}", path.display());
        path
    }

    /// Waits (at most `limit`) for an element matching `css`.
    pub async fn element(&self, css: &str, limit: Duration) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(limit)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|err| panic!("no element {css} within {limit:?}: {err}"))
    }

    /// The text of every element matching `css`, now.
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let mut texts = Vec::new();
        for element in self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
        {
            if let Ok(text) = element.text().await {
                texts.push(text);
            }
        }
        texts
    }

    pub async fn close(mut self) {
        let _ = self.client.close().await;
        let _ = self.driver.kill().await;
    }
}
