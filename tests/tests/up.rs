//! `corral up`'s first impression: a banner that says where things are and
//! how to stop, warnings only by default, and a port already taken refused
//! at once, naming the setting to change.

use std::process::Stdio;
use std::time::Duration;

use corral_tests::{TestEnv, corral_bin};
use tokio::io::{AsyncBufReadExt, BufReader};

fn up(env: &TestEnv, listen: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(corral_bin());
    command
        .args(["--prefix", &env.prefix, "--nats-url", &env.nats_url, "up"])
        .env("DATABASE_URL", &env.database_url)
        .env("CORRAL_HOME", &env.home)
        .env("CORRAL_LISTEN", listen)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_already_taken_is_refused_at_once_naming_the_setting() {
    let env = TestEnv::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = tokio::time::timeout(Duration::from_secs(30), up(&env, &addr).output())
        .await
        .expect("corral up should exit within 30 s")
        .expect("corral up runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains(&addr), "names the address: {stderr}");
    assert!(
        stderr.contains("CORRAL_LISTEN"),
        "names the setting: {stderr}"
    );
    drop(taken);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_banner_says_where_the_console_and_ingest_are_and_how_to_stop_and_info_lines_stay_out()
{
    let env = TestEnv::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = up(&env, &format!("127.0.0.1:{port}"))
        .spawn()
        .expect("corral up starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    let banner = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("stderr reads") {
            seen.push(line.clone());
            if line.contains("stop ") && line.contains("Ctrl-C") {
                return;
            }
        }
    })
    .await;
    assert!(banner.is_ok(), "no banner within 60 s; printed: {seen:#?}");
    let text = seen.join("\n");
    assert!(
        text.contains(&format!("event ingest  http://127.0.0.1:{port}")),
        "{text}"
    );
    assert!(text.contains("-v for more"), "{text}");
    let console = format!("http://127.0.0.1:{port}/console");
    assert!(text.contains(&format!("console       {console}")), "{text}");
    // The printed console answers on a laptop without a key.
    let page = reqwest::get(&console).await.expect("the console answers");
    assert!(page.status().is_success(), "console: {}", page.status());
    let page = page.text().await.expect("a page");
    assert!(page.contains("<h1>Runs</h1>"), "{page}");
    assert!(
        text.contains(&format!("corral --prefix {} run --wait", env.prefix)),
        "the hint reaches this deployment: {text}"
    );
    assert!(
        !seen.iter().any(|line| line.contains(" INFO ")),
        "INFO lines by default: {text}"
    );

    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id().expect("pid") as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("corral up exits within 60 s of SIGTERM")
        .expect("wait");
    assert!(status.success(), "corral up exited {status}");
    env.cleanup().await;
}
