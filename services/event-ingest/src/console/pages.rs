//! The console's HTML, rendered on the server with maud (which escapes
//! every value). The live parts carry `data-refresh` with the URL of their
//! fragment; `console.js` refreshes them and renders a run's events.

use axum::http::StatusCode;
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::data::{DeadLetter, Nodes};
use super::{ListQuery, Listed, RunStatus};
use corral_proto::v1::{Run, RunState};

/// A run page's query: the events page and filter, and a notice.
#[derive(Deserialize, Default)]
pub(crate) struct RunQuery {
    /// Events after this cursor (0: from the first).
    #[serde(default)]
    pub after: u64,
    /// Only events of this kind.
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub notice: String,
}

fn layout(title: &str, who: Option<&str>, active: &str, body: Markup) -> Markup {
    let current = |name: &str| (name == active).then_some("page");
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · corral" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/console" { "corral" }
                    nav aria-label="Sections" {
                        a href="/console" aria-current=[current("runs")] { "Runs" }
                        a href="/console/nodes" aria-current=[current("nodes")] { "Nodes" }
                        a href="/console/dead-letters" aria-current=[current("dead-letters")] { "Dead letters" }
                    }
                    @if let Some(who) = who {
                        span.who { "key " strong { (who) } }
                        @if who != "anonymous" {
                            form.inline method="post" action="/console/logout" {
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn notice(text: &str) -> Markup {
    html! {
        @if !text.is_empty() {
            p.notice role="status" { (text) }
        }
    }
}

fn badge(state: RunState) -> Markup {
    html! { span class={ "state " (state.name()) } { (state.name()) } }
}

/// `12s`, `4m`, `3h`, `2d`.
pub(crate) fn span_ms(ms: i64) -> String {
    let secs = (ms / 1000).max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// Unix milliseconds as UTC, to the second.
pub(crate) fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_default()
}

fn cost(usd: f64) -> String {
    format!("${usd:.4}")
}

fn labels(run: &Run) -> Markup {
    let mut labels: Vec<_> = run
        .spec
        .as_ref()
        .map(|spec| spec.labels.iter().collect())
        .unwrap_or_default();
    labels.sort();
    html! {
        @for (key, value) in labels {
            span.label { (key) "=" (value) }
            " "
        }
    }
}

pub(crate) fn runs(
    who: &str,
    query: &ListQuery,
    listed: Result<&Listed, &String>,
    rows_url: &str,
    control: bool,
) -> Markup {
    let selected_state = query.state.as_str();
    let body = html! {
        h1 { "Runs" }
        (notice(&query.notice))
        form.filters method="get" action="/console" role="search" {
            label { "State "
                select name="state" {
                    option value="" selected[selected_state.is_empty()] { "any" }
                    option value="queued,booting,running,finalizing,idle,paused"
                        selected[selected_state == "queued,booting,running,finalizing,idle,paused"] { "live" }
                    @for state in RunState::ALL {
                        option value=(state.name()) selected[selected_state == state.name()] { (state.name()) }
                    }
                }
            }
            label { "Labels "
                input type="text" name="label" value=(query.label) placeholder="team=search,env=prod" size="24";
            }
            label { "Created within "
                select name="since" {
                    @for (value, text) in [("", "any time"), ("15m", "15 minutes"), ("1h", "1 hour"), ("24h", "24 hours"), ("7d", "7 days")] {
                        option value=(value) selected[query.since == value] { (text) }
                    }
                }
            }
            button type="submit" { "Apply" }
            @if !query.state.is_empty() || !query.label.is_empty() || !query.since.is_empty() {
                " " a href="/console" { "Clear" }
            }
        }
        @match listed {
            Err(err) => p.error role="alert" { (err) },
            Ok(listed) => {
                form id="runs-form" method="post" action="/console/stop" {
                    input type="hidden" name="back" value=(back_url(query));
                    table.runs {
                        caption.sr { "Runs, newest first; refreshed every two seconds" }
                        thead { tr {
                            th scope="col" { span.sr { "Select" } }
                            th scope="col" { "Run" } th scope="col" { "State" } th scope="col" { "Labels" }
                            th scope="col" { "Provider" } th scope="col" { "Cost" } th scope="col" { "Age" }
                            th scope="col" { "Owner" }
                        } }
                        tbody id="rows" data-refresh=(rows_url) { (rows(listed)) }
                    }
                    @if control {
                        p { button id="stop-selected" type="submit" { "Stop selected runs" } }
                    }
                }
                @if let Some(next) = &listed.next {
                    p { a rel="next" href=(format!("/console?{}", next_query(query, next))) { "Older runs →" } }
                }
            }
        }
    };
    layout("Runs", Some(who), "runs", body)
}

fn back_url(query: &ListQuery) -> String {
    let mut url = form_urlencoded::Serializer::new(String::new());
    for (key, value) in [
        ("state", &query.state),
        ("label", &query.label),
        ("since", &query.since),
        ("before", &query.before),
    ] {
        if !value.is_empty() {
            url.append_pair(key, value);
        }
    }
    format!("/console?{}", url.finish())
}

fn next_query(query: &ListQuery, before: &str) -> String {
    let mut url = form_urlencoded::Serializer::new(String::new());
    for (key, value) in [
        ("state", query.state.as_str()),
        ("label", query.label.as_str()),
        ("since", query.since.as_str()),
        ("before", before),
    ] {
        if !value.is_empty() {
            url.append_pair(key, value);
        }
    }
    url.finish()
}

/// The list's rows: what `/console/rows` answers.
pub(crate) fn rows(listed: &Listed) -> Markup {
    html! {
        @if listed.runs.is_empty() {
            tr { td colspan="8" { "No runs match." } }
        }
        @for run in &listed.runs {
            tr data-run=(run.run_id) {
                td {
                    @if !run.state().is_terminal() {
                        input type="checkbox" name="run_id" value=(run.run_id) aria-label=(format!("select {}", run.run_id));
                    }
                }
                td.mono { a href=(format!("/console/runs/{}", run.run_id)) { (run.run_id) } }
                td { (badge(run.state())) }
                td { (labels(run)) }
                td { (run.provider) }
                td.num { (cost(run.cost_usd)) }
                td.num title=(when(run.created_at_ms)) { (span_ms(listed.now_ms - run.created_at_ms)) }
                td.mono { (run.owner) }
            }
        }
    }
}

pub(crate) fn run(who: &str, status: &RunStatus, query: &RunQuery, control: bool) -> Markup {
    let run = &status.run;
    let live = !run.state().is_terminal();
    let body = html! {
        p.crumbs { a href="/console" { "Runs" } " / " }
        h1.mono { (run.run_id) }
        (notice(&query.notice))
        section id="status" data-refresh=(format!("/console/runs/{}/status", run.run_id)) aria-live="polite" {
            (self::status(status, control))
        }
        section aria-labelledby="events-title" {
            h2 id="events-title" { "Output and agent events" }
            form.filters method="get" action=(format!("/console/runs/{}", run.run_id)) {
                label { "Kind "
                    select name="kind" {
                        option value="" selected[query.kind.is_empty()] { "all" }
                        @for (kind, _) in corral_proto::kinds::KINDS {
                            option value=(kind) selected[query.kind == kind] { (kind) }
                        }
                    }
                }
                button type="submit" { "Show" }
            }
            div id="events"
                data-run=(run.run_id)
                data-after=(query.after)
                data-kind=(query.kind)
                data-live=(if live { "true" } else { "false" })
                data-kinds=(corral_proto::kinds::KINDS.map(|(kind, _)| kind).join(","))
                aria-busy="true" {
                p.muted { "Loading events…" }
            }
            nav id="event-pages" aria-label="Event pages" {}
        }
    };
    layout(&run.run_id, Some(who), "runs", body)
}

/// A run's status, buttons and timeline: what `/console/runs/{id}/status` answers.
pub(crate) fn status(status: &RunStatus, control: bool) -> Markup {
    let run = &status.run;
    let state = run.state();
    let end = if run.finished_at_ms > 0 {
        run.finished_at_ms
    } else {
        status.now_ms
    };
    let action = |name: &str| format!("/console/runs/{}/{name}", run.run_id);
    html! {
        dl.facts data-state=(state.name()) {
            div { dt { "State" } dd id="run-state" { (badge(state)) } }
            div { dt { "Cost so far" } dd id="run-cost" { (cost(run.cost_usd)) } }
            div { dt { @if state.is_terminal() { "Ran for" } @else { "Age" } } dd title=(when(run.created_at_ms)) { (span_ms(end - run.created_at_ms)) } }
            div { dt { "Provider" } dd { (run.provider) } }
            div { dt { "Sandbox" } dd.mono { (run.sandbox_id) } }
            div { dt { "Owner" } dd.mono { (run.owner) } }
            div { dt { "Turn" } dd { (run.turn) } }
            @if let Some(code) = run.exit_code {
                div { dt { "Exit code" } dd { (code) } }
            }
            @if !run.reason.is_empty() {
                div { dt { "Reason" } dd { (run.reason) } }
            }
            @if !run.stop_reason.is_empty() {
                div { dt { "Stop" } dd { (run.stop_reason) " (" (run.stop_requested_by) ")" } }
            }
            div { dt { "Labels" } dd { (labels(run)) } }
        }
        @if control {
            div.actions {
                @if !state.is_terminal() {
                    form.inline method="post" action=(action("stop")) {
                        button.danger id="stop" type="submit" { "Stop" }
                    }
                }
                @if state == RunState::Idle {
                    form.inline method="post" action=(action("pause")) { button id="pause" type="submit" { "Pause" } }
                }
                @if state == RunState::Paused {
                    form.inline method="post" action=(action("resume")) { button id="resume" type="submit" { "Resume" } }
                }
                @if matches!(state, RunState::Idle | RunState::Paused) {
                    form.inline method="post" action=(action("continue")) {
                        label { "Next turn "
                            input type="text" name="command" placeholder="command (empty: the run's own)" size="32";
                        }
                        button id="continue" type="submit" { "Continue" }
                    }
                }
            }
        } @else if !state.is_terminal() {
            p.muted { "Stopping, pausing and continuing need a key with the scope runs:control." }
        }
        h2 { "Timeline" }
        @match &status.timeline {
            Err(err) => p.error { (err) },
            Ok(timeline) => {
                ol.timeline {
                    @for step in timeline {
                        li {
                            time title=(when(step.at_ms)) { "+" (span_ms(step.at_ms - run.created_at_ms)) }
                            " "
                            @if let Some(from) = &step.from_state { span class={ "state " (from) } { (from) } " → " }
                            span class={ "state " (step.to_state) } { (step.to_state) }
                            " " span.event { (step.event) }
                            @if !step.actor.is_empty() { " by " span.mono { (step.actor) } }
                            @if !step.reason.is_empty() { ": " (step.reason) }
                        }
                    }
                }
            }
        }
    }
}

pub(crate) fn nodes(who: &str, nodes: Result<&Nodes, &String>, now_ms: i64) -> Markup {
    let body = html! {
        h1 { "Nodes" }
        @match nodes {
            Err(err) => p.error role="alert" { (err) },
            Ok(nodes) => {
                table.runs {
                    caption.sr { "Spawners, with the live runs each owns" }
                    thead { tr {
                        th scope="col" { "Spawner" } th scope="col" { "Status" } th scope="col" { "Last heartbeat" }
                        th scope="col" { "Owns" } th scope="col" { "Runs" }
                    } }
                    tbody {
                        @if nodes.spawners.is_empty() {
                            tr { td colspan="5" { "No spawner has sent a heartbeat." } }
                        }
                        @for spawner in &nodes.spawners {
                            tr {
                                td.mono { (spawner.spawner_id) }
                                td {
                                    @if spawner.draining_since_ms > 0 {
                                        span.state.finalizing { "draining" }
                                        " until " (when(spawner.drain_deadline_ms))
                                    } @else {
                                        span.state.running { "alive" }
                                    }
                                }
                                td title=(when(spawner.heartbeat_at_ms)) { (span_ms(now_ms - spawner.heartbeat_at_ms)) " ago" }
                                td.num { (spawner.owned_runs) }
                                td {
                                    @for run in nodes.owned.get(&spawner.spawner_id).map(Vec::as_slice).unwrap_or_default() {
                                        a.mono href=(format!("/console/runs/{}", run.run_id)) { (run.run_id) }
                                        " " (badge(run.state())) br;
                                    }
                                }
                            }
                        }
                    }
                }
                @if !nodes.unowned.is_empty() {
                    h2 { "Live runs no spawner holds" }
                    ul {
                        @for run in &nodes.unowned {
                            li { a.mono href=(format!("/console/runs/{}", run.run_id)) { (run.run_id) } " " (badge(run.state())) }
                        }
                    }
                }
            }
        }
    };
    layout("Nodes", Some(who), "nodes", body)
}

pub(crate) fn dead_letters(who: &str, letters: Result<&Vec<DeadLetter>, &String>) -> Markup {
    let body = html! {
        h1 { "Dead letters" }
        p.muted { "Messages corral could not handle, newest first. "
            code { "corral dlq show <seq>" } " prints one decoded; "
            code { "corral dlq replay <seq>" } " sends it again." }
        @match letters {
            Err(err) => p.error role="alert" { (err) },
            Ok(letters) => {
                table.runs {
                    thead { tr {
                        th scope="col" { "Seq" } th scope="col" { "Time" } th scope="col" { "Kind" }
                        th scope="col" { "Original subject" } th scope="col" { "Why" }
                        th scope="col" { "Deliveries" } th scope="col" { "Bytes" }
                    } }
                    tbody {
                        @if letters.is_empty() {
                            tr { td colspan="7" { "No dead letters." } }
                        }
                        @for letter in letters {
                            tr {
                                td.num { (letter.seq) } td { (letter.time) } td { (letter.kind) }
                                td.mono { (letter.original_subject) } td { (letter.error) }
                                td.num { (letter.deliveries) } td.num { (letter.bytes) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout("Dead letters", Some(who), "dead-letters", body)
}

pub(crate) fn login(next: &str, notice_text: &str) -> Markup {
    let body = html! {
        h1 { "Sign in" }
        (notice(notice_text))
        form.login method="post" action="/console/login" {
            input type="hidden" name="next" value=(next);
            p {
                label for="key" { "API key" }
                br;
                input id="key" type="password" name="key" autocomplete="current-password" required size="48" autofocus;
            }
            p { button type="submit" { "Sign in" } }
            p.muted { "A key with the scope events:read shows runs and events; runs:control adds the buttons. "
                code { "corral keys api --id me --scope events:read --scope events:stream --scope runs:control" } " makes one." }
        }
    };
    layout("Sign in", None, "", body)
}

pub(crate) fn error(status: StatusCode, message: &str) -> Markup {
    let body = html! {
        h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
        p.error role="alert" { (message) }
        p { a href="/console" { "Back to the runs" } }
    };
    layout("Error", None, "", body)
}
