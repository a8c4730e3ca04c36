//! The systemd unit in `deploy/` can start: it is a `Type=notify` service whose install steps
//! (its header comments) put every file it names where it names it, readable by its dynamic
//! user; `systemd-analyze verify` accepts it where that tool exists.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use support::manifest_path;

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
