//! The files of `deploy/`, checked without a Docker engine or a cluster:
//!
//! - the systemd unit can start: it is a `Type=notify` service whose install steps (its header
//!   comments) put every file it names where it names it, readable by its dynamic user;
//!   `systemd-analyze verify` accepts it where that tool exists;
//! - every YAML and JSON file parses;
//! - every metric the Grafana dashboard and the alerts use is in a running daemon's `/metrics`;
//! - the alerts of the compose stack and of the PrometheusRule are the same;
//! - ports, flags and environment variables of the Dockerfile, the compose file and the
//!   Kubernetes manifests are the CLI's, the probes use the gRPC port and the grace period is
//!   longer than the drain deadline;
//! - the Dockerfile's build stage runs `cargo build --release --locked` (whose lockfile check is
//!   run here) and copies only what the repository holds.

mod support;

use serde_json::Value as Json;
use serde_norway::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use support::{binary, manifest_path, scrape, Process, TestRules};

/// `[Section]` -> key -> values, in order (a key may repeat).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            unit.entry(section.clone()).or_default();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        assert!(!section.is_empty(), "{line} outside a section");
        unit.entry(section.clone())
            .or_default()
            .entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    unit
}

fn one<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    let v = unit
        .get(section)
        .and_then(|s| s.get(key))
        .unwrap_or_else(|| panic!("[{section}] {key}= missing"));
    assert_eq!(v.len(), 1, "[{section}] {key}= set {} times", v.len());
    &v[0]
}

/// An install step of the header: `install [-D] -m MODE SRC DEST`.
#[derive(Debug)]
struct Install {
    mode: u32,
    src: String,
    dest: String,
}

fn install_steps(text: &str) -> Vec<Install> {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.trim_start_matches('#').trim().strip_prefix("install "))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let m = words.iter().position(|w| *w == "-m")?;
            let mode = u32::from_str_radix(words[m + 1], 8).ok()?;
            let rest: Vec<&str> = words[m + 2..]
                .iter()
                .copied()
                .filter(|w| !w.starts_with('-'))
                .collect();
            (rest.len() == 2).then(|| Install {
                mode,
                src: rest[0].to_string(),
                dest: rest[1].to_string(),
            })
        })
        .collect()
}

#[test]
fn the_systemd_unit_can_start_and_installs_what_it_names() {
    let text = std::fs::read_to_string(manifest_path("deploy/mistguard.service")).unwrap();
    let unit = parse_unit(&text);
    let steps = install_steps(&text);
    let installed = |dest: &str| {
        steps
            .iter()
            .find(|s| s.dest == dest)
            .unwrap_or_else(|| panic!("no install step puts a file at {dest}: {steps:?}"))
    };

    // Readiness: systemd waits for READY=1 (the rulesets take a while to compile).
    assert_eq!(one(&unit, "Service", "Type"), "notify");
    assert!(matches!(
        one(&unit, "Service", "NotifyAccess"),
        "main" | "exec" | "all"
    ));

    // The binary and the configuration it starts with.
    let exec: Vec<&str> = one(&unit, "Service", "ExecStart")
        .split_whitespace()
        .collect();
    let binary = installed(exec[0]);
    assert_eq!(binary.src, "target/release/mistguard");
    assert_eq!(binary.mode & 0o111, 0o111, "{binary:?}");
    assert_eq!(exec[1], "serve");
    let config_at = exec
        .iter()
        .position(|w| *w == "--config")
        .map(|i| exec[i + 1])
        .expect("--config in ExecStart");
    let config = installed(config_at);
    assert!(manifest_path(&config.src).is_file(), "{config:?}");
    let dynamic_user = unit["Service"]
        .get("DynamicUser")
        .is_some_and(|v| v.iter().any(|v| v == "yes"));
    let group_access = unit["Service"].contains_key("SupplementaryGroups")
        || unit["Service"].contains_key("Group");
    if dynamic_user && !group_access {
        // The dynamic user owns nothing and is in no group of the file: it reads as "other".
        assert_eq!(
            config.mode & 0o004,
            0o004,
            "{config_at} is not readable by the service's dynamic user: {config:?}"
        );
    }
    // The example configuration is valid as installed.
    let file_text = std::fs::read_to_string(manifest_path(&config.src)).unwrap();
    let sources = mistguard::daemon::Sources::default()
        .with_file_text(Path::new(config_at), &file_text)
        .unwrap();
    mistguard::daemon::Config::from_sources(&sources).unwrap();

    // The documentation it names is installed.
    for doc in &unit["Unit"]["Documentation"] {
        for uri in doc.split_whitespace() {
            if let Some(path) = uri.strip_prefix("file://") {
                let step = installed(path);
                assert!(manifest_path(&step.src).is_file(), "{step:?}");
            }
        }
    }
    // The unit itself, from this repository.
    let me = steps
        .iter()
        .find(|s| s.src == "deploy/mistguard.service")
        .expect("an install step for the unit");
    assert!(me.dest.starts_with("/etc/systemd/system/"), "{me:?}");

    // Each commented credential comes with the variable that names it, and that variable is a
    // setting of the daemon.
    let settings: Vec<String> = mistguard::daemon::config::SETTINGS
        .iter()
        .map(|s| s.env_var())
        .collect();
    for line in text.lines() {
        let line = line.trim_start_matches('#');
        if let Some(cred) = line.strip_prefix("LoadCredential=") {
            let name = cred.split(':').next().unwrap();
            assert!(
                text.lines()
                    .any(|l| l.trim_start_matches('#').starts_with("Environment=")
                        && l.ends_with(&format!("=%d/{name}"))),
                "no Environment= names the credential {name}"
            );
        }
        if let Some(env) = line.strip_prefix("Environment=") {
            let var = env.split('=').next().unwrap();
            assert!(settings.iter().any(|s| s == var), "{var} is not a setting");
        }
    }
}

/// `systemd-analyze verify` on the unit, with ExecStart pointing at this build (it checks that
/// the binary exists). Skipped, and said so, where systemd-analyze is not installed.
#[test]
fn systemd_analyze_verifies_the_unit_where_available() {
    let Ok(version) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze not found: unit not verified by systemd");
        return;
    };
    assert!(version.status.success());
    let text = std::fs::read_to_string(manifest_path("deploy/mistguard.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mistguard.toml");
    std::fs::copy(manifest_path("deploy/mistguard.toml"), &config).unwrap();
    let text = text
        .replace("/usr/local/bin/mistguard", env!("CARGO_BIN_EXE_mistguard"))
        .replace("/etc/mistguard/mistguard.toml", config.to_str().unwrap());
    let unit = dir.path().join("mistguard.service");
    std::fs::write(&unit, text).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Warnings about the unit itself (unknown keys, bad values) fail the test too.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("mistguard.service"))
        .collect();
    assert!(ours.is_empty(), "{stderr}");
}

// ---- The container image, the compose stack, Kubernetes, Prometheus and Grafana ----

/// Every file under `deploy/`, relative to the repository root, sorted.
fn deploy_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let root = manifest_path("");
    let mut out = Vec::new();
    walk(&manifest_path("deploy"), &mut out);
    let mut rel: Vec<PathBuf> = out
        .into_iter()
        .map(|p| p.strip_prefix(&root).unwrap().to_path_buf())
        .collect();
    rel.sort();
    rel
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(manifest_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a YAML file (`---` separated).
fn yaml_docs(rel: &str) -> Vec<Yaml> {
    use serde::Deserialize;
    let text = read(rel);
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Yaml::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(rel: &str) -> Yaml {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: one document expected");
    docs.remove(0)
}

fn s(v: &Yaml) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn seq(v: &Yaml) -> &Vec<Yaml> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
}

/// The Kubernetes object of `kind` in the files of the kustomization.
fn k8s(kind: &str) -> Yaml {
    let kust = yaml("deploy/kubernetes/kustomization.yaml");
    let found: Vec<Yaml> = seq(&kust["resources"])
        .iter()
        .flat_map(|r| yaml_docs(&format!("deploy/kubernetes/{}", s(r))))
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} expected in the kustomization");
    found.into_iter().next().unwrap()
}

/// The `mistguard_*` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("mistguard_") {
        let start = i + at;
        let mut end = start;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        let word_start =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        if word_start {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Every `expr` (and variable query) of the dashboard.
fn dashboard_exprs(v: &Json, out: &mut Vec<String>) {
    match v {
        Json::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition", Json::String(e)) => out.push(e.clone()),
                    ("query", Json::String(e)) if e.contains("mistguard_") => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Json::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// (alert name, expr) of a Prometheus rule file's `groups`.
fn alert_exprs(groups: &Yaml) -> Vec<(String, String)> {
    seq(groups)
        .iter()
        .flat_map(|g| seq(&g["rules"]).iter())
        .map(|r| (s(&r["alert"]).to_string(), s(&r["expr"]).to_string()))
        .collect()
}

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let files = deploy_files();
    let (mut yamls, mut jsons) = (0, 0);
    for f in &files {
        let rel = f.to_str().unwrap();
        match f.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                assert!(!yaml_docs(rel).is_empty(), "{rel}: empty");
                yamls += 1;
            }
            Some("json") => {
                serde_json::from_str::<Json>(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
                jsons += 1;
            }
            _ => {}
        }
    }
    assert!(yamls >= 12 && jsons >= 1, "{files:?}");
    // Every Kubernetes object has its kind and name; every resource of the kustomization exists.
    let kust = yaml("deploy/kubernetes/kustomization.yaml");
    for r in seq(&kust["resources"]) {
        for d in yaml_docs(&format!("deploy/kubernetes/{}", s(r))) {
            assert!(
                d["apiVersion"].is_string() && d["kind"].is_string(),
                "{r:?}"
            );
            assert!(d["metadata"]["name"].is_string(), "{r:?}");
        }
    }
    // The generated ConfigMap's files exist, and the policies load as the daemon loads them.
    for g in seq(&kust["configMapGenerator"]) {
        for f in seq(&g["files"]) {
            assert!(
                manifest_path(&format!("deploy/kubernetes/{}", s(f))).is_file(),
                "{f:?}"
            );
        }
    }
    mistguard::load::policy_dir(&manifest_path("deploy/kubernetes/policies"))
        .unwrap_or_else(|e| panic!("deploy/kubernetes/policies: {e:?}"));
    // Grafana: the dashboard provider reads the folder compose mounts the dashboards at.
    let provider = yaml("deploy/grafana/provisioning/dashboards/mistguard.yaml");
    let compose = yaml("deploy/compose.yaml");
    let mounts: Vec<&str> = seq(&compose["services"]["grafana"]["volumes"])
        .iter()
        .map(s)
        .collect();
    let path = s(&provider["providers"][0]["options"]["path"]);
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./grafana/dashboards:") && m.contains(path)),
        "{mounts:?} {path}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_the_alerts_is_exported() {
    let dashboard: Json =
        serde_json::from_str(&read("deploy/grafana/dashboards/mistguard.json")).unwrap();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard["panels"], &mut exprs);
    dashboard_exprs(&dashboard["templating"], &mut exprs);
    let dash_names: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    let alerts = alert_exprs(&yaml("deploy/prometheus/alerts.yml")["groups"]);
    let alert_names: BTreeSet<String> = alerts.iter().flat_map(|(_, e)| metric_names(e)).collect();

    // What the issue asks the dashboard and the alerts to show.
    for want in [
        "mistguard_decisions_total",
        "mistguard_hits_total",
        "mistguard_request_duration_seconds_bucket",
        "mistguard_active_streams",
        "mistguard_escalation_subjects",
        "mistguard_escalation_level2_total",
        "mistguard_review_queue",
        "mistguard_escalation_alerts_total",
        "mistguard_tool_decisions_total",
        "mistguard_approvals_pending",
        "mistguard_moderation_requests_total",
        "mistguard_moderation_tokens_total",
        "mistguard_moderation_budget_tokens",
        "mistguard_moderation_breaker_state",
        "mistguard_moderation_fail_open_total",
        "mistguard_records_written_total",
        "mistguard_records_dropped_total",
    ] {
        assert!(dash_names.contains(want), "the dashboard shows no {want}");
    }
    assert!(exprs.iter().any(|e| e.contains("by (language)")));
    assert!(exprs.iter().any(|e| e.contains("by (rule)")));
    assert!(exprs.iter().any(|e| e.contains("by (action)")));
    for (alert, metric) in [
        ("MistguardLevel3Alert", "mistguard_escalation_alerts_total"),
        ("MistguardLevel2Rate", "mistguard_escalation_level2_total"),
        (
            "MistguardModerationBreakerOpen",
            "mistguard_moderation_breaker_state",
        ),
        ("MistguardStateDegraded", "mistguard_state_degraded"),
        ("MistguardRecordsDropped", "mistguard_records_dropped_total"),
        ("MistguardReloadFailed", "mistguard_ruleset_reloads_total"),
        ("MistguardErrorRate", "mistguard_requests_total"),
        (
            "MistguardLatencyP99",
            "mistguard_request_duration_seconds_bucket",
        ),
    ] {
        let (_, expr) = alerts
            .iter()
            .find(|(a, _)| a == alert)
            .unwrap_or_else(|| panic!("no alert {alert}"));
        assert!(expr.contains(metric), "{alert}: {expr}");
    }

    // Each name is one the daemon documents, and is in a running daemon's /metrics.
    let documented: BTreeSet<&str> = mistguard::daemon::metrics::METRICS
        .iter()
        .chain(mistguard::io::moderation::METRICS)
        .map(|(n, _)| *n)
        .collect();
    let rules = TestRules::new();
    let p = Process::spawn(rules.path(), &[]);
    let body = scrape(p.metrics_addr).await;
    let series: BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .chain(
            body.lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .filter_map(|l| l.split(' ').next()),
        )
        .collect();
    for name in dash_names.iter().chain(&alert_names) {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|sfx| name.strip_suffix(sfx).filter(|b| documented.contains(b)))
            .unwrap_or(name);
        assert!(
            documented.contains(base),
            "{name} is not a metric of the daemon"
        );
        assert!(
            series.contains(name.as_str()),
            "{name} is not in /metrics:\n{body}"
        );
    }
}

#[test]
fn the_compose_alerts_and_the_prometheus_rule_are_the_same() {
    let file = yaml("deploy/prometheus/alerts.yml");
    let rule = k8s("PrometheusRule");
    assert_eq!(s(&rule["apiVersion"]), "monitoring.coreos.com/v1");
    assert_eq!(
        file["groups"], rule["spec"]["groups"],
        "deploy/prometheus/alerts.yml and deploy/kubernetes/prometheusrule.yaml differ"
    );
    for (alert, expr) in alert_exprs(&file["groups"]) {
        assert!(!expr.trim().is_empty(), "{alert}");
    }
    // Compose's Prometheus loads that file where compose mounts it, and scrapes mistguard.
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let compose = yaml("deploy/compose.yaml");
    let mounts: Vec<&str> = seq(&compose["services"]["prometheus"]["volumes"])
        .iter()
        .map(s)
        .collect();
    for f in seq(&prom["rule_files"]) {
        assert!(
            mounts
                .iter()
                .any(|m| m.starts_with("./prometheus/alerts.yml:")
                    && m.split(':').nth(1) == Some(s(f))),
            "{f:?} is not mounted: {mounts:?}"
        );
    }
    assert_eq!(
        s(&prom["scrape_configs"][0]["static_configs"][0]["targets"][0]),
        format!("mistguard:{}", image_ports().1)
    );
    // The ServiceMonitor scrapes the Service's metrics port, at /metrics.
    let monitor = k8s("ServiceMonitor");
    let service = k8s("Service");
    let ep = &monitor["spec"]["endpoints"][0];
    assert_eq!(s(&ep["path"]), "/metrics");
    assert!(seq(&service["spec"]["ports"])
        .iter()
        .any(|p| p["name"] == ep["port"]));
}

/// The flags of `mistguard serve --help`.
fn serve_flags() -> BTreeSet<String> {
    let out = std::process::Command::new(binary())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let flags: BTreeSet<String> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect();
    assert!(
        flags.contains("--listen") && flags.contains("--policies"),
        "{help}"
    );
    flags
}

/// The value after `flag` in an argument list.
fn arg_after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// A duration setting's value in seconds (`20s`, `1m`, `500ms`, a bare number).
fn seconds(v: &str) -> f64 {
    let v = v.trim();
    let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = n.parse().unwrap();
    n * match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        u => panic!("unit {u}"),
    }
}

fn default_of(key: &str) -> &'static str {
    mistguard::daemon::config::SETTINGS
        .iter()
        .find(|s| s.key == key)
        .unwrap()
        .default
}

/// The image's ENTRYPOINT (exec form).
fn entrypoint() -> Vec<String> {
    let text = read("deploy/Dockerfile");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    serde_json::from_str(line).expect("ENTRYPOINT in exec form (distroless has no shell)")
}

/// The gRPC and metrics ports the image's ENTRYPOINT listens on.
fn image_ports() -> (u16, u16) {
    let ep = entrypoint();
    (
        port_of(arg_after(&ep, "--listen").expect("--listen")),
        port_of(arg_after(&ep, "--metrics-listen").expect("--metrics-listen")),
    )
}

#[test]
fn ports_flags_and_variables_match_the_cli() {
    let flags = serve_flags();
    let check_flags = |what: &str, args: &[String]| {
        for a in args.iter().filter(|a| a.starts_with("--")) {
            let flag = a.split('=').next().unwrap();
            assert!(
                flags.contains(flag),
                "{what}: {flag} is not a flag of mistguard serve"
            );
        }
    };
    let settings: BTreeSet<String> = mistguard::daemon::config::SETTINGS
        .iter()
        .map(|s| s.env_var())
        .chain(["MISTGUARD_CONFIG".to_string()])
        .collect();

    // Every MISTGUARD_* variable named anywhere in deploy/ is a setting's.
    for f in deploy_files() {
        let Ok(text) = std::fs::read_to_string(manifest_path(f.to_str().unwrap())) else {
            continue;
        };
        for (i, _) in text.match_indices("MISTGUARD_") {
            let var: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if var == "MISTGUARD_" {
                continue; // `MISTGUARD_*`, the family
            }
            assert!(
                settings.contains(&var),
                "{}: {var} is not a setting's variable",
                f.display()
            );
        }
    }

    // The Dockerfile: the entrypoint's flags, EXPOSE and the HEALTHCHECK's port.
    let ep = entrypoint();
    assert!(ep[0].ends_with("/mistguard") && ep[1] == "serve", "{ep:?}");
    check_flags("ENTRYPOINT", &ep);
    let (grpc, metrics) = image_ports();
    assert!(
        arg_after(&ep, "--listen").unwrap().starts_with("0.0.0.0:"),
        "{ep:?}"
    );
    let docker = read("deploy/Dockerfile");
    let exposed: BTreeSet<u16> = docker
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().map(|p| p.parse::<u16>().unwrap()))
        .collect();
    assert_eq!(exposed, BTreeSet::from([grpc, metrics]));
    let health = docker
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .find_map(|l| l.trim().strip_prefix("CMD "))
        .expect("HEALTHCHECK CMD");
    let health: Vec<String> = serde_json::from_str(health).expect("HEALTHCHECK CMD in exec form");
    assert!(
        health.contains(&format!("-addr=127.0.0.1:{grpc}")),
        "{health:?}"
    );

    // Compose: mistguard's environment, ports and grace period.
    let compose = yaml("deploy/compose.yaml");
    let mg = &compose["services"]["mistguard"];
    assert_eq!(s(&mg["build"]["dockerfile"]), "deploy/Dockerfile");
    assert!(manifest_path(&format!(
        "deploy/{}/deploy/Dockerfile",
        s(&mg["build"]["context"])
    ))
    .is_file());
    if let Some(cmd) = mg["command"].as_sequence() {
        let cmd: Vec<String> = cmd.iter().map(|v| s(v).to_string()).collect();
        check_flags("compose command", &cmd);
    }
    let env = mg["environment"]
        .as_mapping()
        .expect("environment as a map");
    for (k, _) in env {
        let k = s(k);
        assert!(
            settings.contains(k) || k == "MISTRAL_API_KEY",
            "compose: {k}"
        );
    }
    assert!(env.contains_key("MISTGUARD_REDIS_URL"));
    let key_file = s(&env["MISTGUARD_SUBJECT_KEY_FILE"]);
    for secret in seq(&mg["secrets"]) {
        assert!(
            compose["secrets"][s(secret)]["file"].is_string(),
            "{secret:?}"
        );
    }
    assert!(
        seq(&mg["secrets"])
            .iter()
            .any(|n| key_file == format!("/run/secrets/{}", s(n))),
        "the subject key file is not a compose secret: {key_file}"
    );
    let container_ports: BTreeSet<u16> = seq(&mg["ports"]).iter().map(|p| port_of(s(p))).collect();
    assert_eq!(container_ports, BTreeSet::from([grpc, metrics]));
    let drain = env
        .get("MISTGUARD_DRAIN_DEADLINE")
        .map_or(default_of("drain_deadline"), |v| s(v));
    assert!(seconds(s(&mg["stop_grace_period"])) > seconds(drain));
    let redis = s(&env["MISTGUARD_REDIS_URL"]);
    let host = redis
        .trim_start_matches("redis://")
        .split(':')
        .next()
        .unwrap();
    assert!(!compose["services"][host].is_null(), "no service {host}");

    // Kubernetes: the Deployment's mistguard container.
    let deploy = k8s("Deployment");
    let pod = &deploy["spec"]["template"]["spec"];
    let c = seq(&pod["containers"])
        .iter()
        .find(|c| c["name"] == "mistguard")
        .expect("a mistguard container");
    let args: Vec<String> = seq(&c["command"])
        .iter()
        .chain(seq(&c["args"]))
        .map(|v| s(v).to_string())
        .collect();
    assert!(
        args[0].ends_with("/mistguard") && args[1] == "serve",
        "{args:?}"
    );
    check_flags("Deployment", &args);
    let k_grpc = port_of(arg_after(&args, "--listen").expect("--listen"));
    let k_metrics = port_of(arg_after(&args, "--metrics-listen").expect("--metrics-listen"));
    let port_named = |name: &str| {
        seq(&c["ports"])
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {name}")) as u16
    };
    assert_eq!(port_named("grpc"), k_grpc);
    assert_eq!(port_named("metrics"), k_metrics);
    let mut k_env = BTreeMap::new();
    for e in seq(&c["env"]) {
        let name = s(&e["name"]);
        assert!(
            settings.contains(name) || name == "MISTRAL_API_KEY",
            "Deployment: {name}"
        );
        k_env.insert(name.to_string(), e["value"].as_str().map(str::to_string));
    }
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let port = c[probe]["grpc"]["port"].as_u64();
        assert_eq!(
            port,
            Some(k_grpc as u64),
            "{probe} is not a gRPC probe on the gRPC port"
        );
    }
    // Readiness asks for the Guard service (NOT_SERVING while the daemon drains).
    assert_eq!(
        c["readinessProbe"]["grpc"]["service"].as_str(),
        Some(mistguard::daemon::pb::guard_server::SERVICE_NAME)
    );
    let drain = arg_after(&args, "--drain-deadline")
        .map(str::to_string)
        .or_else(|| k_env.get("MISTGUARD_DRAIN_DEADLINE").cloned().flatten())
        .unwrap_or_else(|| default_of("drain_deadline").to_string());
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace as f64 > seconds(&drain),
        "grace {grace}s, drain {drain}"
    );
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    // The files the daemon is pointed at are on mounted volumes; the policies are the ConfigMap.
    let mounts: Vec<(&str, &str)> = seq(&c["volumeMounts"])
        .iter()
        .map(|m| (s(&m["name"]), s(&m["mountPath"])))
        .collect();
    let mount_of = |path: &str| {
        mounts
            .iter()
            .find(|(_, at)| path.starts_with(&format!("{at}/")) || path == *at)
            .map(|(name, _)| *name)
            .unwrap_or_else(|| panic!("{path} is on no volume: {mounts:?}"))
    };
    for (k, v) in &k_env {
        if let (true, Some(v)) = (k.ends_with("_FILE") || k.ends_with("_DIR"), v) {
            mount_of(v);
        }
    }
    let policies = arg_after(&args, "--policies").expect("--policies");
    let volume = mount_of(policies);
    let kust = yaml("deploy/kubernetes/kustomization.yaml");
    let cm = seq(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == volume)
        .map(|v| s(&v["configMap"]["name"]))
        .expect("the policies volume is a ConfigMap");
    assert!(seq(&kust["configMapGenerator"])
        .iter()
        .any(|g| g["name"] == cm));
    // The image the kustomization sets is the Deployment's.
    assert!(seq(&kust["images"]).iter().any(|i| i["name"] == c["image"]));

    // The Service sends its ports to the container's; the HPA and the PDB target the pods.
    let service = k8s("Service");
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(&labels[s(k)], v);
    }
    for p in seq(&service["spec"]["ports"]) {
        let target = s(&p["targetPort"]);
        assert_eq!(p["port"].as_u64(), Some(port_named(target) as u64), "{p:?}");
    }
    let hpa = k8s("HorizontalPodAutoscaler");
    assert_eq!(s(&hpa["apiVersion"]), "autoscaling/v2");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deploy["metadata"]["name"]
    );
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
    let pdb = k8s("PodDisruptionBudget");
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&labels[s(k)], v);
    }
    // The rulesets component patches in a setting's variable and a mount both containers share.
    let component = read("deploy/kubernetes/components/rulesets/kustomization.yaml");
    assert!(
        component.contains("MISTGUARD_RULESETS") && component.contains("/etc/mistguard/rulesets")
    );
}

/// `FROM image [AS name]` stages of the Dockerfile, each with its instructions (continuation
/// lines joined).
fn dockerfile_stages() -> Vec<(String, String, Vec<String>)> {
    let text = read("deploy/Dockerfile");
    let mut lines = Vec::new();
    let mut cur = String::new();
    for l in text.lines() {
        let t = l.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(part) = t.strip_suffix('\\') {
            cur.push_str(part);
            cur.push(' ');
        } else {
            cur.push_str(t);
            lines.push(std::mem::take(&mut cur));
        }
    }
    let mut stages: Vec<(String, String, Vec<String>)> = Vec::new();
    for l in lines {
        if let Some(from) = l.strip_prefix("FROM ") {
            let w: Vec<&str> = from.split_whitespace().collect();
            let name = if w.len() == 3 && w[1].eq_ignore_ascii_case("as") {
                w[2]
            } else {
                ""
            };
            stages.push((w[0].to_string(), name.to_string(), Vec::new()));
        } else if let Some(st) = stages.last_mut() {
            st.2.push(l);
        }
    }
    stages
}

#[test]
fn the_dockerfile_builds_locked_and_copies_what_the_repository_holds() {
    let stages = dockerfile_stages();
    let (image, _, build) = stages
        .iter()
        .find(|(_, name, _)| name == "build")
        .expect("a stage named build");
    // The Rust image is at least the crate's rust-version.
    let cargo_toml = read("Cargo.toml");
    let rust_version = cargo_toml
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    let tag = image
        .strip_prefix("rust:")
        .expect("the build stage is FROM rust:");
    let version: Vec<u32> = tag
        .split('-')
        .next()
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    let wanted: Vec<u32> = rust_version
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        version >= wanted,
        "rust:{tag} is older than rust-version {rust_version}"
    );
    assert!(
        build
            .iter()
            .any(|l| l.starts_with("RUN ") && l.contains("cargo build --release --locked")),
        "the build stage does not run cargo build --release --locked: {build:?}"
    );
    // What the build stage copies from the context exists, and the .dockerignore lets it in.
    let ignore = read("deploy/Dockerfile.dockerignore");
    let mut copied = Vec::new();
    for l in build.iter().filter_map(|l| l.strip_prefix("COPY ")) {
        let w: Vec<&str> = l
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in &w[..w.len() - 1] {
            assert!(
                manifest_path(src).exists(),
                "COPY {src}: not in the repository"
            );
            assert!(
                ignore.lines().any(|i| i == format!("!{src}")),
                "{src} is left out of the context by Dockerfile.dockerignore"
            );
            copied.push(src.to_string());
        }
    }
    // The build reads what build.rs and Cargo.toml name: sources, proto, rulesets, models, vendor.
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "src",
        "proto",
        "rulesets",
        "models",
        "vendor",
    ] {
        assert!(
            copied.iter().any(|c| c == needed),
            "the build stage does not copy {needed}"
        );
    }
    // Every `COPY --from=build` source: something the build stage copied (under its WORKDIR),
    // the binary cargo builds, or a directory a RUN of the build stage makes.
    let workdir = build
        .iter()
        .find_map(|l| l.strip_prefix("WORKDIR "))
        .expect("WORKDIR")
        .trim_end_matches('/');
    let mut from_build = Vec::new();
    for (_, _, lines) in &stages {
        for l in lines.iter().filter_map(|l| l.strip_prefix("COPY ")) {
            let w: Vec<&str> = l.split_whitespace().collect();
            let Some(from) = w.iter().find_map(|w| w.strip_prefix("--from=")) else {
                continue;
            };
            let srcs: Vec<&str> = w.iter().copied().filter(|w| !w.starts_with("--")).collect();
            let (srcs, dest) = srcs.split_at(srcs.len() - 1);
            for src in srcs {
                if from == "build" {
                    from_build.push((src.to_string(), dest[0].to_string()));
                } else {
                    let (_, _, other) = stages
                        .iter()
                        .find(|(_, n, _)| n == from)
                        .unwrap_or_else(|| panic!("no stage {from}"));
                    assert!(
                        other.iter().any(|l| l.contains(src)),
                        "stage {from} makes no {src}"
                    );
                }
            }
        }
    }
    assert!(!from_build.is_empty());
    for (src, _) in &from_build {
        match src.strip_prefix(&format!("{workdir}/")) {
            Some("target/release/mistguard") => {
                assert!(binary().is_file(), "the release binary");
            }
            Some(rel) => {
                assert!(
                    manifest_path(rel).exists(),
                    "COPY --from=build {src}: {rel} is not in the repository"
                );
                assert!(
                    copied
                        .iter()
                        .any(|c| rel == c || rel.starts_with(&format!("{c}/"))),
                    "{rel} is not copied into the build stage"
                );
            }
            None => assert!(
                build
                    .iter()
                    .any(|l| l.starts_with("RUN ") && l.contains(&format!("mkdir -p {src}"))),
                "COPY --from=build {src}: the build stage does not make it"
            ),
        }
    }
    // The image ships the rulesets, the policies and the model, and the binary.
    for shipped in ["rulesets", "policies", "models", "target/release/mistguard"] {
        assert!(
            from_build
                .iter()
                .any(|(s, _)| s == &format!("{workdir}/{shipped}")),
            "the image does not ship {shipped}"
        );
    }
    let runtime = stages.last().unwrap();
    assert!(
        runtime
            .2
            .iter()
            .any(|l| l == "USER nonroot" || l == "USER 65532"),
        "{runtime:?}"
    );
    // `--locked` holds: the lockfile satisfies Cargo.toml (what `cargo build --locked` checks
    // before building). The release build itself is this test's binary().
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .current_dir(manifest_path(""))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata --locked: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
